"""Light imports and optional extras: the package and its light modules load no heavy
library, the index commands load only what they use, and a missing extra is one clear
error naming it (the CLI: ``hat: error: ...``, exit 2; the API: an ImportError)."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support import data_args

import hat
from hat._optional import MissingExtraError, needs_extra
from hat.cli import main
from hat.index import Index

# Libraries that only some features use: importing hat, or running a command that does
# not use them, must not load them.
HEAVY = ("timm", "transformers", "faiss", "fastapi", "matplotlib", "tensorboard")
LIGHT_MODULES = ("hat", "hat.config", "hat.metrics", "hat.align", "hat.index.store")
SRC = Path(hat.__file__).resolve().parent.parent
ERROR_EXIT = 2


def _loaded_after_each(steps: dict[str, str]) -> dict[str, list[str]]:
    """Run each step's code in order in one fresh interpreter; for each, the modules of
    ``HEAVY`` (and torch) that it was the first to load."""
    body = "".join(
        f"{code}\nloaded[{name!r}] = [m for m in WATCH if m in sys.modules and m not in seen]\n"
        f"seen.update(loaded[{name!r}])\n"
        for name, code in steps.items()
    )
    script = (
        f"import json, sys\nWATCH = {(*HEAVY, 'torch')!r}\nloaded, seen = {{}}, set()\n"
        f"{body}print(json.dumps(loaded))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def _cli(argv: list[str]) -> str:
    """Code that runs ``hat ARGV`` and fails unless it exits 0."""
    return textwrap.dedent(f"""
        from hat import cli
        try:
            status = cli.main({argv!r})
        except SystemExit as stop:
            status = stop.code
        assert status in (0, None), status
    """)


def test_light_modules_load_no_heavy_library() -> None:
    loaded = _loaded_after_each({m: f"import {m}" for m in LIGHT_MODULES})
    heavy = {m: [lib for lib in libs if lib in HEAVY] for m, libs in loaded.items()}
    assert heavy == {m: [] for m in LIGHT_MODULES}
    # The package itself and its config load not even torch.
    assert loaded["hat"] == loaded["hat.config"] == []


def test_lazy_public_names() -> None:
    assert set(hat.__all__) <= set(dir(hat))
    for name in hat.__all__:
        assert getattr(hat, name) is not None, name
    assert hat.Index is Index
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hat.nope  # noqa: B018


def test_help_loads_nothing_heavy() -> None:
    assert _loaded_after_each({"--help": _cli(["--help"])}) == {"--help": []}


def test_index_commands_load_only_what_they_use(collection_index: Path, tmp_path: Path) -> None:
    root = str(shutil.copytree(collection_index, tmp_path / "index"))
    commands = {
        "info": ["index", "info", root],
        "verify": ["index", "verify", root],
        "remove": ["index", "remove", root, "--all-captions"],
    }
    loaded = _loaded_after_each({name: _cli(argv) for name, argv in commands.items()})
    # They read (info, verify) and rewrite (remove) the faiss files; none loads the model.
    heavy = {
        name: [lib for lib in libs if lib in HEAVY and lib != "faiss"]
        for name, libs in loaded.items()
    }
    assert heavy == {name: [] for name in commands}


def _missing(monkeypatch: pytest.MonkeyPatch, top: str, *loaded: str) -> None:
    """Make ``top`` unimportable, as if not installed; ``loaded`` modules that import it
    are forgotten so that their next import fails too."""
    monkeypatch.setitem(sys.modules, top, None)
    for name in loaded:
        monkeypatch.delitem(sys.modules, name, raising=False)


def _message(extra: str, module: str) -> str:
    return f"hat {extra} needs {module}: pip install 'hat-retrieval[{extra}]'"


def test_needs_extra_names_the_missing_module_and_the_extra(monkeypatch) -> None:
    _missing(monkeypatch, "faiss")
    with pytest.raises(MissingExtraError) as caught, needs_extra("index"):
        import faiss  # noqa: F401
    assert str(caught.value) == _message("index", "faiss")
    assert isinstance(caught.value, ImportError) and caught.value.name == "faiss"
    with pytest.raises(ImportError, match="cannot import name"), needs_extra("index"):
        from json import no_such_name  # noqa: F401 -- not a missing module: unchanged


def test_index_build_without_faiss_fails_before_encoding(collection, tmp_path, capsys) -> None:
    out = tmp_path / "index"
    with pytest.MonkeyPatch.context() as monkeypatch:
        _missing(monkeypatch, "faiss")
        argv = ["index", "build", str(collection["model"]), str(collection["images"])]
        assert main([*argv, "--out", str(out)]) == ERROR_EXIT
    assert capsys.readouterr().err == f"hat: error: {_message('index', 'faiss')}\n"
    assert not out.exists()


def test_search_without_faiss_is_an_import_error(collection_index, monkeypatch) -> None:
    _missing(monkeypatch, "faiss")
    with Index.open(collection_index) as index:
        with pytest.raises(ImportError) as caught:
            index.search_text("a red circle")
    assert str(caught.value) == _message("index", "faiss")


def test_serve_without_fastapi(collection_index, monkeypatch, capsys) -> None:
    _missing(monkeypatch, "fastapi", "hat.serve")
    with pytest.raises(ImportError) as caught:
        importlib.import_module("hat.serve")
    assert str(caught.value) == _message("serve", "fastapi")
    assert main(["serve", str(collection_index)]) == ERROR_EXIT
    assert capsys.readouterr().err == f"hat: error: {_message('serve', 'fastapi')}\n"


def test_explain_without_matplotlib(collection, tmp_path, monkeypatch, capsys) -> None:
    _missing(monkeypatch, "matplotlib", "matplotlib.figure")
    image = sorted(collection["images"].glob("*.png"))[0]
    argv = ["explain", str(collection["model"]), str(image), "a red circle"]
    assert main([*argv, "--out", str(tmp_path / "map.png")]) == ERROR_EXIT
    assert capsys.readouterr().err == f"hat: error: {_message('explain', 'matplotlib')}\n"


def test_train_without_tensorboard(scenes, tmp_path, monkeypatch, capsys) -> None:
    _missing(monkeypatch, "tensorboard", "torch.utils.tensorboard")
    argv = ["train", "--preset", "tiny", "--run", str(tmp_path / "run"), "--device", "cpu"]
    assert main([*argv, *data_args(scenes), "train.epochs=1"]) == ERROR_EXIT
    # At the first log, a step in: the progress bar is on stderr too.
    assert f"hat: error: {_message('train', 'tensorboard')}\n" in capsys.readouterr().err
