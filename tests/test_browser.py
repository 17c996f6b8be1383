"""End to end in a real headless Chromium: search, results, an explanation, a screenshot.

Needs Debian's ``chromium`` (``make test`` installs it where it can) and the Python
``playwright`` package; skipped with the reason otherwise.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time

import pytest
from support import SCENES

from hat.config import ServeConfig
from hat.index import Index
from hat.serve import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags for a closed network: no background connections, no sandbox as root.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
TIMEOUT_MS = 60_000
SERVER_START_S = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(collection_index):
    uvicorn = pytest.importorskip("uvicorn")
    index = Index.open(collection_index)
    port = free_port()
    config = uvicorn.Config(
        create_app(index, ServeConfig(port=port)), host="127.0.0.1", port=port, log_level="warning"
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + SERVER_START_S
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "the server did not start"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join()
    index.close()


def test_search_and_explain_in_chromium(server, tmp_path):
    if CHROMIUM is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server)
        page.fill("#query", "a red circle left of a blue square")
        page.fill("#k", "6")
        page.click("#search")
        page.wait_for_selector(".card img.thumb[src^='blob:']")
        assert page.locator(".card").count() == min(6, SCENES)
        assert "result(s)" in page.inner_text("#status")
        # Every thumbnail loaded and decoded.
        page.wait_for_function(
            "[...document.querySelectorAll('.card img.thumb')]"
            ".every(i => i.complete && i.naturalWidth > 0)"
        )
        page.locator(".card button.explain").first.click()
        page.wait_for_function(
            "(() => { const i = document.querySelector('.explanation img');"
            " return i && i.complete && i.naturalWidth > 0; })()"
        )
        shot = tmp_path / "search.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 0
        browser.close()
