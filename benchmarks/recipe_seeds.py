"""Is the ``cpu`` recipe robust? Train it on several kinds of generated data, several
seeds each, and report the distribution of test results.

For every dataset kind (``hat.data.SCENE_STYLES``: the built-in scenes, textured
backgrounds with relation captions, free placement of 3-4 objects) and every seed,
the data are generated with that seed, then two models are trained with the ``cpu``
preset at its budget and tested on the test split:

- HAT (three levels summed; its top level alone is read from the same model);
- the pooled baseline: the top level only, mean-pooled tokens scored by cosine
  (``model.alignment=mean_pool``), trained the same way.

    .venv/bin/python benchmarks/recipe_seeds.py [KEY=VALUE ...] --out runs/recipe_seeds
        [--seeds 0 1 2] [--datasets scenes textured free]

``KEY=VALUE``: overrides of the ``cpu`` preset, given before the options (``--seeds`` and
``--datasets`` take every word after them). ``--models hat`` trains HAT alone, for a knob
that the pooled baseline does not read (e.g. ``model.lambda_softmax``).

Each finished run is appended to ``OUT/runs.jsonl`` and skipped when the script is run
again, so an interrupted benchmark continues. Prints, per dataset, min and median test
rSum of each model, chance, and whether the goals hold on every seed: HAT >= 1.5x the
pooled baseline, HAT >= 8x chance, and the sum above every level alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from hat.checkpoint import resolve_model
from hat.config import apply_overrides, get_preset
from hat.data import SCENE_STYLES, generate_scenes, load_records, select_split
from hat.demo import SCENE_SIZE
from hat.encoder import Encoder
from hat.evaluate import evaluate
from hat.metrics import chance_metrics
from hat.train import Trainer

BASELINE_RATIO = 1.5  # HAT must beat the pooled baseline by this factor
CHANCE_RATIO = 8.0  # and chance rSum by this one
MODELS = ("hat", "pooled")


def _data(out: Path, dataset: str, seed: int) -> Path:
    folder = out / "data" / f"{dataset}-{seed}"
    annotations = folder / "dataset_synth.json"
    if not annotations.is_file():
        generate_scenes(folder, image_size=SCENE_SIZE, seed=seed, style=SCENE_STYLES[dataset])
    return annotations


def _train_and_test(run: Path, overrides: list[str]) -> dict:
    cfg = apply_overrides(get_preset("cpu"), overrides)
    start = time.perf_counter()
    Trainer(cfg, run, device="cpu", progress=False).fit()
    seconds = time.perf_counter() - start
    test = select_split(load_records(cfg.data), "test")
    report = evaluate(Encoder(resolve_model(run, "best")), test, progress=False)
    rsums = {name: m["rsum"] for name, m in report.metrics.items()}
    return {"rsum": rsums, "train_seconds": seconds, "test_images": len(test)}


def _runs(out: Path) -> dict[tuple[str, int, str], dict]:
    path = out / "runs.jsonl"
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            done[(row["dataset"], row["seed"], row["model"])] = row
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/recipe_seeds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=list(SCENE_STYLES))
    parser.add_argument(
        "--models", nargs="+", choices=MODELS, default=list(MODELS),
        help="train these only (a knob of HAT's alignment leaves the pooled baseline as is)",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    top = get_preset("cpu").model.levels[-1]
    pooled = [
        "model.alignment=mean_pool",
        f"model.levels=[{{image_stage: {top.image_stage}, text_layer: {top.text_layer}}}]",
    ]
    done = _runs(out)
    for dataset in args.datasets:
        for seed in args.seeds:
            annotations = _data(out, dataset, seed)
            common = [
                f"data.annotations={annotations}", f"data.image_root={annotations.parent}",
                f"train.seed={seed}", *args.overrides,
            ]  # fmt: skip
            for model, extra in (("hat", []), ("pooled", pooled)):
                if model not in args.models or (dataset, seed, model) in done:
                    continue
                result = _train_and_test(out / "runs" / f"{dataset}-{seed}-{model}", common + extra)
                row = {"dataset": dataset, "seed": seed, "model": model, **result}
                with open(out / "runs.jsonl", "a") as handle:
                    handle.write(json.dumps(row) + "\n")
                done[(dataset, seed, model)] = row
                print(json.dumps(row), flush=True)
    print(report(done, args.datasets, args.seeds))


def _spread(values: list[float]) -> str:
    return f"{min(values):.1f} / {statistics.median(values):.1f}" if values else "-"


def _check(value: float, goal: float) -> str:
    return f"{value:.2f}x {'ok' if value >= goal else 'MISSED'}"


def report(done: dict, datasets: list[str], seeds: list[int]) -> str:
    """The Markdown table of min / median test rSum per dataset, and the goal checks."""
    lines = [
        f"`cpu` preset at its budget, {date.today()}, {platform.machine()}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, seeds {seeds}",
        "",
        "| dataset | HAT summed min / median | top level alone | pooled baseline | chance "
        "| HAT / pooled (min) | HAT / chance (min) | sum > every level | train s (HAT) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for dataset in datasets:
        hat = [done[(dataset, s, "hat")] for s in seeds if (dataset, s, "hat") in done]
        base = {s: done[(dataset, s, "pooled")] for s in seeds if (dataset, s, "pooled") in done}
        if not hat:
            continue
        chance = chance_metrics(hat[0]["test_images"])["rsum"]
        top = max(k for k in hat[0]["rsum"] if k.startswith("level"))
        summed = [r["rsum"]["hat"] for r in hat]
        paired = [r for r in hat if r["seed"] in base]
        ratios = [r["rsum"]["hat"] / base[r["seed"]]["rsum"]["hat"] for r in paired]
        above = all(
            r["rsum"]["hat"] > v for r in hat for k, v in r["rsum"].items() if k.startswith("level")
        )
        cells = [
            f"{dataset} ({len(hat)} seeds)",
            _spread(summed),
            _spread([r["rsum"][top] for r in hat]),
            _spread([b["rsum"]["hat"] for b in base.values()]),
            f"{chance:.1f}",
            _check(min(ratios), BASELINE_RATIO) if ratios else "-",
            _check(min(summed) / chance, CHANCE_RATIO),
            "yes" if above else "NO",
            f"{statistics.median(r['train_seconds'] for r in hat):.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
