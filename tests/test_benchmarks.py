"""The benchmark scripts still run against the library's current code (tiny sizes, a
tiny random-weight model where one is needed): a benchmark that no longer runs reports
nothing. What they measure is not checked here (speed is never a test)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import hat
from hat.checkpoint import save_model

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TIMEOUT_S = 300


def _run(script: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.parametrize(
    ("script", "args", "printed"),
    [
        ("eval_memory.py", ["--images", "20", "--captions-total", "100", "--captions", "10"],
         "peak"),
        ("index_verify.py", ["--gb", "0.01", "--repeats", "1", "--out", "{tmp}"], "verify"),
        ("scorer.py", ["--images", "4", "--captions", "8", "--loop-captions", "2",
                       "--repeat", "1", "--threads", "1"], "level"),
        ("token_codec.py", ["--images", "16", "--captions", "8"], "| pq |"),
        ("rerank.py", ["--shapes", "demo", "--threads", "1", "--images", "4", "--captions",
                       "8", "--queries", "2", "--image-k", "3", "--caption-k", "4",
                       "--repeat", "1", "--rounds", "1"], "two-stage"),
    ],
)  # fmt: skip
def test_benchmark_runs(script: str, args: list[str], printed: str, tmp_path) -> None:
    """``{tmp}`` in an argument: a folder of the test's own."""
    assert printed in _run(script, *(a.replace("{tmp}", str(tmp_path / "out")) for a in args))


def test_index_search_benchmark_runs_and_counts_every_level(tmp_path) -> None:
    save_model(hat.create_model("tiny"), tmp_path / "model")
    stdout = _run("index_search.py", "--model", str(tmp_path / "model"), "--images", "40",
                  "--large", "3000")  # fmt: skip
    assert "== 40 images, real pipeline" in stdout
    assert "== 3000 images, synthetic features" in stdout
    levels = re.findall(r"level \d+: .* = ([\d.]+) KiB per image", stdout)
    assert len(levels) == 3 and all(float(v) > 0 for v in levels), stdout
    large = re.search(r"bytes per image per level: (.*)", stdout)
    # The coded levels too (pq trains on the synthetic segment): files levelK.codes.npy.
    assert large and all(float(v.split()[0]) > 0 for v in large.group(1).split(", ")), stdout
