"""End to end through the CLI entry point: generate scenes, train a tiny preset for one
epoch, evaluate, resume exactly, export, and two-stage evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import data_args

from hat.checkpoint import load_model, load_training_checkpoint, resolve_model
from hat.cli import main
from hat.config import apply_overrides, get_preset
from hat.data import CaptionTokenizer, load_records, select_split
from hat.encoder import Encoder
from hat.evaluate import evaluate
from hat.model import HAT


def _train(run: Path, annotations: Path, *extra: str) -> int:
    return main(
        ["train", "--preset", "tiny", "--run", str(run), "--device", "cpu",
         *data_args(annotations), *extra]
    )  # fmt: skip


def test_train_evaluate_export(tmp_path: Path, scenes: Path, capsys) -> None:
    run = tmp_path / "run"
    assert _train(run, scenes, "train.epochs=1") == 0
    for name in ("config.yaml", "metrics.jsonl", "checkpoints/latest.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in records) and any("val_rsum" in r for r in records)

    out_json = tmp_path / "eval.json"
    status = main(
        ["evaluate", str(run), "--annotations", str(scenes), "--image-root", str(scenes.parent),
         "--split", "test", "--num-workers", "0", "--device", "cpu", "--json", str(out_json)]
    )  # fmt: skip
    assert status == 0
    report = json.loads(out_json.read_text())
    assert report["num_images"] == 8 and report["num_captions"] == 40
    assert set(report["all"]) == {"hat", "level1", "level2", "level3"}
    assert "rsum" in capsys.readouterr().out

    model_dir = tmp_path / "model"
    assert main(["export", str(run), "--out", str(model_dir)]) == 0
    exported = load_model(model_dir)
    from_run = resolve_model(run, "best")
    for a, b in zip(exported.state_dict().values(), from_run.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_resume_is_exact(tmp_path: Path, scenes: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train(straight, scenes, "train.epochs=2") == 0
    assert _train(resumed, scenes, "train.epochs=1") == 0
    assert main(["train", "--run", str(resumed), "--resume", "train.epochs=2"]) == 0
    a = load_training_checkpoint(straight / "checkpoints" / "latest.pt")
    b = load_training_checkpoint(resumed / "checkpoints" / "latest.pt")
    assert a["state"] == b["state"]
    for key, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][key], rtol=0, atol=0, msg=key)


def test_two_stage_with_full_shortlist_equals_exhaustive(scenes: Path) -> None:
    cfg = apply_overrides(get_preset("tiny"), data_args(scenes))
    model = HAT(cfg.model).eval()
    test = select_split(load_records(cfg.data), "test")
    encoder = Encoder(model)
    everything = apply_overrides(cfg.retrieval, ["shortlist_k=40", "storage_dtype=float32"])
    report = evaluate(encoder, test, retrieval=everything)
    assert report.metrics["hat_two_stage"] == pytest.approx(report.metrics["hat"])
    small = apply_overrides(cfg.retrieval, ["shortlist_k=1", "storage_dtype=float32"])
    short = evaluate(encoder, test, retrieval=small)
    # With one candidate per query, R@10 can only be as good as the shortlist's R@1.
    assert short.metrics["hat_two_stage"]["t2i_r10"] <= short.metrics["hat"]["t2i_r10"] + 1e-9


def test_bad_override_is_a_clear_cli_error(tmp_path: Path, scenes: Path, capsys) -> None:
    assert _train(tmp_path / "x", scenes, "train.epochz=1") == 2
    assert "epochz" in capsys.readouterr().err


def test_unreadable_training_images_stop_or_are_skipped(tmp_path: Path, scenes: Path, capsys):
    import shutil

    data = Path(shutil.copytree(scenes.parent, tmp_path / "data"))
    annotations = data / scenes.name
    train = [r for r in load_records(apply_overrides(get_preset("tiny").data, [
        f"annotations={annotations}", f"image_root={data}"])) if r.split == "train"]  # fmt: skip
    for record in train[:3]:
        record.path.write_bytes(b"")
    assert _train(tmp_path / "strict", annotations, "train.epochs=1") == 2
    assert train[0].path.name in capsys.readouterr().err
    assert _train(tmp_path / "lenient", annotations, "train.epochs=1", "data.skip_bad=true") == 0
    logged = (tmp_path / "lenient" / "metrics.jsonl").read_text().splitlines()
    skipped = sum(json.loads(r).get("skipped_pairs", 0) for r in logged)
    assert skipped == 3 * len(train[0].captions)  # every caption of the 3 images


def test_evaluate_an_ensemble_of_two_directions(tmp_path: Path, scenes: Path, capsys) -> None:
    """`hat evaluate A B`: each model in its own direction, then the sum of their scores."""
    import dataclasses

    from hat.checkpoint import save_model
    from hat.metrics import retrieval_metrics

    cfg = apply_overrides(get_preset("tiny"), data_args(scenes))
    test = select_split(load_records(cfg.data), "test")
    tokenizer = CaptionTokenizer.from_config(cfg.model.text)
    float32 = apply_overrides(cfg.retrieval, ["storage_dtype=float32"])
    reports, paths = [], []
    for seed, direction in ((1, "i2t"), (2, "t2i")):
        torch.manual_seed(seed)
        model = HAT(dataclasses.replace(cfg.model, direction=direction)).eval()
        paths.append(tmp_path / direction)
        save_model(model, paths[-1], tokenizer=tokenizer.tokenizer)
        reports.append(evaluate(Encoder(model, tokenizer=tokenizer), test, retrieval=float32))
    out_json = tmp_path / "ensemble.json"
    status = main(
        ["evaluate", *map(str, paths), "data.captions_per_image=5", "--annotations", str(scenes),
         "--image-root", str(scenes.parent), "--split", "test", "--num-workers", "0",
         "--device", "cpu", "--storage-dtype", "float32", "--json", str(out_json)]
    )  # fmt: skip
    assert status == 0
    body = json.loads(out_json.read_text())
    assert [m["direction"] for m in body["models"]] == ["i2t", "t2i"]
    for got, want in zip(body["models"], reports):
        assert got["all"]["hat"] == pytest.approx(want.metrics["hat"])
    summed = reports[0].scores + reports[1].scores  # (N, M)
    assert body["ensemble"]["all"]["ensemble"] == pytest.approx(retrieval_metrics(summed, 5))
    assert "ensemble: the sum of the 2 models' HAT scores" in capsys.readouterr().out
