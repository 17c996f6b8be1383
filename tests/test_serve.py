"""The HTTP API: searches, thumbnails, explanations, limits and the bearer token."""

from __future__ import annotations

import dataclasses
import io
import os
import socket
import struct
import subprocess
import sys
import time
import zlib

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from support import SCENES

from hat.config import ServeConfig
from hat.index import Index
from hat.serve import create_app

LIMITS = ServeConfig(max_query_chars=50, max_k=5, max_upload_bytes=50_000, max_pixels=100_000)


@pytest.fixture(scope="module")
def index(collection_index):
    with Index.open(collection_index) as reader:
        yield reader


@pytest.fixture(scope="module")
def client(index):
    return TestClient(create_app(index, LIMITS))


def png_bytes(size=(64, 64), color="red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (1-bit, compressed)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * ((width + 7) // 8 + 1) * 8)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def test_health_page_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok", "images": SCENES, "captions": 0}
    page = client.get("/")
    assert page.status_code == 200 and "<form" in page.text
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/search/text", "/search/image", "/images/{image_id}", "/explain/{image_id}"} <= set(
        paths
    )


def test_search_text_and_image(client, index):
    response = client.post("/search/text", json={"query": "a red circle", "k": 3})
    assert response.status_code == 200
    body = response.json()
    expected = index.search_text("a red circle", 3)
    assert [h["id"] for h in body["hits"]] == [h.id for h in expected]
    assert body["hits"][0]["score"] == pytest.approx(expected[0].score)
    files = {"file": ("q.png", png_bytes(), "image/png")}
    response = client.post("/search/image", files=files, data={"k": "2"})
    assert response.status_code == 200
    assert [h["kind"] for h in response.json()["hits"]] == ["image", "image"]


def test_thumbnails_by_id_only(client, index):
    image_id = index.search_text("a shape", 1)[0].id
    response = client.get(f"/images/{image_id}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(response.content))
    assert max(thumb.size) <= LIMITS.thumbnail_size
    assert client.get("/images/999999").status_code == 404
    for bad in ("abc", "..%2F..%2Fetc%2Fpasswd", "-1.5"):
        assert client.get(f"/images/{bad}").status_code in (404, 422)
    assert client.get("/images/../../etc/passwd").status_code == 404


def test_explain_png_and_json(client, index):
    image_id = index.search_text("a shape", 1)[0].id
    response = client.get(f"/explain/{image_id}", params={"q": "a red circle"})
    assert response.status_code == 200 and response.content.startswith(b"\x89PNG")
    maps = client.get(f"/explain/{image_id}", params={"q": "a red circle", "format": "json"}).json()
    assert maps["words"] == ["a", "red", "circle"]
    assert [len(level["weights"][0]) for level in maps["levels"]] == [8, 4, 2]
    assert client.get("/explain/999999", params={"q": "x"}).status_code == 404
    assert client.get(f"/explain/{image_id}").status_code == 422


@pytest.mark.parametrize(
    "body",
    [
        {"query": "x" * 51, "k": 3},
        {"query": "   ", "k": 3},
        {"query": "", "k": 3},
        {"query": "ok", "k": 6},
        {"query": "ok", "k": 0},
        {"query": "ok", "k": "many"},
        {"query": 5},
        {},
        [],
    ],
)
def test_bad_text_requests_are_4xx(client, body):
    assert client.post("/search/text", json=body).status_code == 422


def test_bad_uploads_are_4xx(client):
    def post(data: bytes, k: str = "2") -> int:
        files = {"file": ("q.png", data, "image/png")}
        return client.post("/search/image", files=files, data={"k": k}).status_code

    assert post(png_bytes(), k="6") == 422
    assert post(b"not an image") == 415
    assert post(b"") == 415
    assert post(png_bytes()[:40]) == 415  # truncated
    assert post(bytes(LIMITS.max_upload_bytes + 1)) == 413
    assert post(png_bytes(size=(400, 400))) == 413  # 160,000 pixels > 100,000
    assert post(bomb_png(50_000, 50_000)) == 413
    assert client.post("/search/image", data={"k": "2"}).status_code == 422
    assert client.post("/search/text", content=b"{not json",
                       headers={"content-type": "application/json"}).status_code == 422  # fmt: skip


def test_bearer_token(index):
    guarded = TestClient(create_app(index, dataclasses.replace(LIMITS, token="s3cret")))
    assert guarded.get("/healthz").status_code == 200
    assert guarded.post("/search/text", json={"query": "a", "k": 1}).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (
        guarded.post("/search/text", json={"query": "a", "k": 1}, headers=wrong).status_code == 401
    )
    right = {"Authorization": "Bearer s3cret"}
    assert (
        guarded.post("/search/text", json={"query": "a", "k": 1}, headers=right).status_code == 200
    )
    assert guarded.get("/images/1", headers=right).status_code == 200
    assert guarded.get("/images/1").status_code == 401


def test_hat_serve_command_binds_loopback_with_token(index, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HAT_TOKEN": "tok"}
    server = subprocess.Popen(
        [sys.executable, "-m", "hat", "serve", str(index.store.root), "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz")
                break
            except httpx.TransportError:
                assert time.time() < deadline and server.poll() is None, "server did not start"
                time.sleep(0.2)
        assert health.json()["images"] == SCENES
        url = f"http://127.0.0.1:{port}/search/text"
        assert httpx.post(url, json={"query": "a", "k": 1}).status_code == 401
        ok = httpx.post(url, json={"query": "a", "k": 1}, headers={"Authorization": "Bearer tok"})
        assert ok.status_code == 200
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0]
    assert f"on http://127.0.0.1:{port}/ (bearer token required)" in output


@pytest.mark.parametrize(
    "raw",
    [
        b'{"query": "a", "k": NaN}',
        b'{"query": "a", "k": Infinity}',
        b'{"query": "a", "k": -Infinity}',
        b'{"query": "a", "k": 1e400}',
        b'{"query": NaN}',
        b'{"query": "a", "k": 3, "exhaustive": NaN}',
        b'{"query": "\\ud800 x"}',
        b'{"query": "a", "k": true}',
        b'{"query": "a", "k": "3"}',
        b'{"query": "a", "k": 3.0}',
        b'{"query": "a", "exhaustive": "yes"}',
        b'{"query": "a", "limit": 3}',
    ],
)
def test_hostile_json_is_a_clear_4xx(client, raw):
    """Values JSON cannot encode back (NaN, infinities, lone surrogates) and lax types
    are refused with a 422 whose body is valid JSON naming the field, never a 500."""
    response = client.post(
        "/search/text", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail and all("loc" in d and "msg" in d and "input" not in d for d in detail)
