"""Fault injection for training: SIGTERM at a random step (saved mid-epoch, resumed to
the weights of an uninterrupted run), kill -9 at a random moment (the previous
checkpoint still loads and resumes), and a NaN loss (a clear error, the last good
checkpoint untouched)."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import hat.train
from hat.checkpoint import load_training_checkpoint, resolve_model
from hat.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"
STEPS = 8  # per epoch
EPOCHS = 2
BATCH = 4
LAST_SIGNAL_STEP = STEPS // 2  # leaves half an epoch for the signal to arrive mid-epoch
POLL_S = 0.02
TIMEOUT_S = 300


def _train_args(run: Path, annotations: Path, epochs: int = EPOCHS) -> list[str]:
    return [
        "train", "--preset", "tiny", "--run", str(run), "--device", "cpu",
        f"data.annotations={annotations}", f"data.image_root={annotations.parent}",
        "data.num_workers=0", f"train.batch_size={BATCH}",
        f"train.max_steps_per_epoch={STEPS}", f"train.epochs={epochs}",
    ]  # fmt: skip


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """``python -m hat ARGS`` in a new process, its output (progress bars included) in ``log``."""
    paths = [str(SRC), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "hat", *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _wait_for(process: subprocess.Popen, ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not ready():
        if process.poll() is not None:
            raise AssertionError(f"training ended before {what} (exit {process.returncode})")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(POLL_S)


def _logged_steps(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    return metrics.read_text().count('"loss"') if metrics.is_file() else 0


def test_sigterm_saves_mid_epoch_and_resume_is_exact(tmp_path: Path, scenes: Path) -> None:
    step = random.randint(1, LAST_SIGNAL_STEP)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    log = tmp_path / "stopped.log"
    process = _start(_train_args(stopped, scenes), log)
    _wait_for(process, lambda: _logged_steps(stopped) >= step, f"step {step}")
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=TIMEOUT_S)
    err = log.read_text()
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM" in err and "--resume" in err
    saved = load_training_checkpoint(stopped / "checkpoints" / "latest.pt")["state"]
    assert saved["epoch"] == 0 and step <= saved["step_in_epoch"] < STEPS, (step, saved)

    assert main(["train", "--run", str(stopped), "--resume"]) == 0
    assert main(_train_args(straight, scenes)) == 0
    a = load_training_checkpoint(straight / "checkpoints" / "latest.pt")
    b = load_training_checkpoint(stopped / "checkpoints" / "latest.pt")
    assert a["state"] == b["state"] and a["state"]["global_step"] == EPOCHS * STEPS
    for key, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][key], rtol=0, atol=0, msg=key)
    for key, value in a["optimizer"]["state"].items():
        torch.testing.assert_close(value, b["optimizer"]["state"][key], rtol=0, atol=0)


def test_kill_9_keeps_the_previous_checkpoint(tmp_path: Path, scenes: Path) -> None:
    run = tmp_path / "run"
    latest = run / "checkpoints" / "latest.pt"
    epochs = EPOCHS + 1
    process = _start(_train_args(run, scenes, epochs), tmp_path / "run.log")
    _wait_for(process, latest.is_file, "the first checkpoint")
    # Any moment after it, the next checkpoint's writing included.
    target = _logged_steps(run) + random.randint(0, STEPS)
    _wait_for(process, lambda: _logged_steps(run) >= target, f"step {target}")
    process.kill()
    process.wait(timeout=TIMEOUT_S)
    assert process.returncode == -signal.SIGKILL

    saved = load_training_checkpoint(latest)["state"]
    assert saved["epoch"] >= 1 and saved["step_in_epoch"] == 0
    resolve_model(run, "latest")
    assert main(["train", "--run", str(run), "--resume"]) == 0
    assert load_training_checkpoint(latest)["state"]["global_step"] == epochs * STEPS


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(
    tmp_path: Path, scenes: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    run = tmp_path / "run"
    assert main(_train_args(run, scenes, epochs=1)) == 0
    latest = run / "checkpoints" / "latest.pt"
    before = hashlib.sha256(latest.read_bytes()).hexdigest()
    capsys.readouterr()

    bad_step = random.randint(1, STEPS)
    calls = []
    real = hat.train.triplet_loss

    def poisoned(*args, **kwargs) -> torch.Tensor:
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == bad_step else loss

    monkeypatch.setattr(hat.train, "triplet_loss", poisoned)
    assert main(["train", "--run", str(run), "--resume", f"train.epochs={EPOCHS}"]) == 2
    err = capsys.readouterr().err
    assert f"loss is nan at epoch 1 step {bad_step - 1}" in err, err
    assert str(latest) in err and "kept" in err
    assert hashlib.sha256(latest.read_bytes()).hexdigest() == before
