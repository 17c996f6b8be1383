"""Train the CPU preset on the built-in scenes under a fixed budget and compare, on the
test split: HAT's three levels summed, HAT's top level alone, and a pooled
global-embedding baseline (mean of the top level's tokens, cosine) trained the same way.

    .venv/bin/python benchmarks/train_cpu.py --out runs/bench_train [--epochs 8]

Prints a Markdown table (R@1/5/10 both ways and rSum) and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from hat.checkpoint import resolve_model
from hat.config import apply_overrides, get_preset
from hat.data import CaptionTokenizer, generate_scenes, load_records, select_split
from hat.evaluate import evaluate
from hat.train import Trainer

COLUMNS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def train_and_test(name: str, overrides: list[str], out: Path, progress: bool) -> dict:
    cfg = apply_overrides(get_preset("cpu"), overrides)
    run = out / name
    start = time.perf_counter()
    Trainer(cfg, run, device="cpu", progress=progress).fit()
    seconds = time.perf_counter() - start
    model = resolve_model(run, "best")
    test = select_split(load_records(cfg.data), "test")
    tokenizer = CaptionTokenizer.from_config(model.config.text)
    report = evaluate(model, test, tokenizer, torch.device("cpu"), progress=False)
    return {"metrics": report.metrics, "train_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/bench_train")
    parser.add_argument("--epochs", type=int, default=get_preset("cpu").train.epochs)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    data_dir = out / "data"
    annotations = data_dir / "dataset_synth.json"
    if not annotations.is_file():
        generate_scenes(data_dir, seed=args.seed)
    common = [
        f"data.annotations={annotations}", f"data.image_root={data_dir}",
        f"train.epochs={args.epochs}", f"train.seed={args.seed}",
    ]  # fmt: skip
    top = get_preset("cpu").model.levels[-1]
    top_only = f"model.levels=[{{image_stage: {top.image_stage}, text_layer: {top.text_layer}}}]"
    hat_run = train_and_test("hat", common, out, args.progress)
    pooled_run = train_and_test(
        "pooled", [*common, "model.alignment=mean_pool", top_only], out, args.progress
    )
    rows = {
        "HAT, 3 levels summed": hat_run["metrics"]["hat"],
        "HAT, top level alone (same model)": hat_run["metrics"][
            f"level{len(hat_run['metrics']) - 1}"
        ],
        "pooled baseline (mean tokens, cosine)": pooled_run["metrics"]["hat"],
    }
    test_images = len(
        select_split(load_records(apply_overrides(get_preset("cpu"), common).data), "test")
    )
    chance = 100 * 10 / test_images
    lines = [
        f"CPU preset, {args.epochs} epochs, {test_images} test images x 5 captions, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; train time HAT {hat_run['train_seconds']:.0f} s, "
        f"pooled {pooled_run['train_seconds']:.0f} s; chance R@10 = {chance:.1f}",
        "",
        "| model | " + " | ".join(COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[c]:.1f}" for c in COLUMNS) + " |")
    print("\n".join(lines))
    (out / "results.json").write_text(
        json.dumps(
            {"rows": rows, "epochs": args.epochs, "hat": hat_run, "pooled": pooled_run}, indent=2
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
