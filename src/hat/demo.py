"""The built-in demo: generated scenes -> train the ``cpu`` preset -> evaluate -> queries.

Runs offline on a CPU. Re-running continues (or reuses) the run already in the
output folder instead of starting over.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hat.checkpoint import resolve_model, save_model
from hat.config import apply_overrides, get_preset
from hat.data import CaptionTokenizer, generate_scenes, load_records, select_split
from hat.evaluate import encode_captions, encode_images, evaluate, format_report, score_all
from hat.train import Trainer, pick_device

__all__ = ["DEMO_QUERIES", "run_demo"]

DEMO_QUERIES = 3
SCENE_SIZE = 96
TOP_K = 3


def run_demo(
    out: str | Path, device: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> dict:
    """Run the whole demo under ``out``; returns the test metrics of HAT's summed score."""
    out = Path(out)
    data_dir = out / "data"
    annotations = data_dir / "dataset_synth.json"
    if not annotations.is_file():
        print(f"[1/4] generating scenes in {data_dir}")
        generate_scenes(data_dir, image_size=SCENE_SIZE)
    else:
        print(f"[1/4] using the scenes in {data_dir}")
    cfg = apply_overrides(
        get_preset("cpu"),
        [f"data.annotations={annotations}", f"data.image_root={data_dir}", *overrides],
    )
    run = out / "run"
    resume = (run / "checkpoints" / "latest.pt").is_file()
    print(f"[2/4] training the cpu preset in {run}" + (" (resuming)" if resume else ""))
    Trainer(cfg, run, device=device, resume=resume).fit()

    dev = pick_device(device)
    model = resolve_model(run, "best").to(dev)
    tokenizer = CaptionTokenizer.from_config(model.config.text)
    save_model(model, out / "model", tokenizer=tokenizer.tokenizer)
    test = select_split(load_records(cfg.data), "test")
    print(f"[3/4] evaluating on the test split ({len(test)} images)")
    report = evaluate(model, test, tokenizer, dev, cfg.data.captions_per_image, progress=False)
    print(format_report(report))
    (out / "test_metrics.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")

    print(f"[4/4] example text queries against the {len(test)} test images")
    step = max(1, len(test) // DEMO_QUERIES)
    targets = test[::step][:DEMO_QUERIES]
    queries = [r.captions[0] for r in targets]
    images = encode_images(model, test, cfg.train.eval_batch_size, dev, progress=False)
    texts = encode_captions(model, queries, tokenizer, len(queries), dev, progress=False)
    scores = score_all(model.config, images, texts, dev).total  # (N, Q)
    for q, (query, target) in enumerate(zip(queries, targets)):
        column = scores[:, q]  # (N,)
        top = torch.topk(column, k=min(TOP_K, len(test)))
        target_index = test.index(target)
        target_rank = int((column > column[target_index]).sum()) + 1
        print(f'\n  "{query}"  (written for {target.path.name}, which ranks #{target_rank})')
        for rank, (value, index) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            mark = "  <- the image it was written for" if index == target_index else ""
            print(f"    {rank + 1}. {test[index].path}  score {value:.3f}{mark}")
    print(f"\nmodel directory: {out / 'model'}   metrics: {out / 'test_metrics.json'}")
    return report.metrics["hat"]
