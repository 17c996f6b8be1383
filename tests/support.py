"""Constants and helpers shared by several test files (fixtures live in conftest.py)."""

from __future__ import annotations

import dataclasses
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import torch

from hat.config import IndexConfig

# The scene collection of the ``collection`` fixture.
SCENES = 12
SCENE_SIZE = 64


def data_args(annotations: Path) -> list[str]:
    """Dotted overrides that point a run at generated scenes, read in-process."""
    return [
        f"data.annotations={annotations}",
        f"data.image_root={annotations.parent}",
        "data.num_workers=0",
    ]


# The parameters of the global-embedding heads, by state-dict prefix.
HEADS = ("image_global.", "text_global.")


def assert_only_heads_changed(after: dict, before: dict) -> None:
    """Every global-head tensor of state dict ``after`` differs from ``before``; every
    other tensor (the towers, the level projections) is equal to it."""
    for key, value in after.items():
        if key.startswith(HEADS):
            assert not torch.equal(value, before[key]), f"{key}: the heads were not fitted"
        elif key != "global_trained":
            assert torch.equal(value, before[key]), f"{key} changed: the towers stay frozen"


# A process that adds a folder of images to an index, with an IndexConfig given as JSON.
ADD_SCRIPT = """
import json, sys
from hat.config import IndexConfig
from hat.index import Index
cfg = IndexConfig(**json.loads(sys.argv[3]))
index = Index.open(sys.argv[1], cfg=cfg, writable=True)
index.add_images(sys.argv[2], progress=False)
"""
# How long a killed add may take to commit what the test waits for.
KILL_DEADLINE_S = 120
POLL_S = 0.05


def start_add(root: Path, images: Path, cfg: IndexConfig) -> subprocess.Popen:
    """A process adding ``images`` to the index at ``root`` with ``cfg``."""
    fields = json.dumps({k: list(v) if isinstance(v, tuple) else v
                         for k, v in dataclasses.asdict(cfg).items()})  # fmt: skip
    return subprocess.Popen([sys.executable, "-c", ADD_SCRIPT, str(root), str(images), fields])


def add_then_kill(root: Path, images: Path, cfg: IndexConfig, committed: int = 2) -> int:
    """kill -9 an add of ``images`` once ``committed`` images are committed; checks the
    survivors are searchable and that a rerun adds the rest. Returns the survivors."""
    from hat.index import Index

    proc = start_add(root, images, cfg)
    deadline = time.time() + KILL_DEADLINE_S
    count = 0
    while time.time() < deadline and count < committed and proc.poll() is None:
        time.sleep(POLL_S)
        with sqlite3.connect(root / "index.sqlite") as db:
            count = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with Index.open(root) as index:
        survivors = len(index)
        assert 0 < survivors <= SCENES
        assert len(index.search_text("a shape", k=SCENES)) == survivors
    with Index.open(root, cfg=cfg, writable=True) as index:
        report = index.add_images(images, progress=False)
        assert report.added == SCENES - survivors and report.unchanged == survivors
        assert len(index.search_text("a shape", k=SCENES)) == SCENES
    return survivors
