"""The built-in demo: generated scenes -> train the ``cpu`` preset -> fit the global heads
(towers frozen) -> evaluate -> index the test images and search them.

Runs offline on a CPU. Re-running continues (or reuses) the run already in the
output folder instead of starting over.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from hat.checkpoint import resolve_model, save_model
from hat.config import ExperimentConfig, get_preset
from hat.data import ImageRecord, generate_scenes, load_records, select_split
from hat.encoder import Encoder, TextCache
from hat.evaluate import evaluate, format_report
from hat.global_heads import fit_global_heads
from hat.index import Index
from hat.train import Trainer, pick_device

__all__ = ["DEMO_QUERIES", "run_demo", "write_captions"]

DEMO_QUERIES = 3
STEPS = 5
SCENE_SIZE = 96
TOP_K = 3


def write_captions(path: str | Path, records: Sequence[ImageRecord]) -> Path:
    """Write the captions of ``records`` as a JSONL caption file for ``hat index add
    --captions``, each image path relative to the file's own folder (the rule every
    caption file follows)."""
    path = Path(path)
    folder = os.path.abspath(path.parent)
    path.write_text(
        "".join(
            json.dumps({"caption": c, "image": os.path.relpath(os.path.abspath(r.path), folder)})
            + "\n"
            for r in records
            for c in r.captions
        )
    )
    return path


def _train(cfg: ExperimentConfig, run: Path, resume: bool) -> TextCache | None:
    """Train (or finish training) the run; return its text cache, letting go of the rest
    of the trainer (model, optimiser, decoded images)."""
    trainer = Trainer(cfg, run, resume=resume)
    trainer.fit()
    return trainer.text_cache


def run_demo(out: str | Path, cfg: ExperimentConfig | None = None) -> dict:
    """Run the whole demo under ``out`` with ``cfg`` (default: the ``cpu`` preset; its
    data, where it names none, are the scenes generated in ``out``, its ``device`` the
    one of every step); returns the test metrics of HAT's summed score."""
    out = Path(out)
    data_dir = out / "data"
    annotations = data_dir / "dataset_synth.json"
    if not annotations.is_file():
        print(f"[1/{STEPS}] generating scenes in {data_dir}")
        generate_scenes(data_dir, image_size=SCENE_SIZE)
    else:
        print(f"[1/{STEPS}] using the scenes in {data_dir}")
    cfg = cfg or get_preset("cpu")
    if cfg.data.annotations is None:
        data = dataclasses.replace(cfg.data, annotations=str(annotations), image_root=str(data_dir))
        cfg = dataclasses.replace(cfg, data=data)
    dev = pick_device(cfg.device)
    run = out / "run"
    resume = (run / "checkpoints" / "latest.pt").is_file()
    print(
        f"[2/{STEPS}] training the {cfg.model.name} preset in {run}"
        + (" (resuming)" if resume else "")
    )
    text_cache = _train(cfg, run, resume)  # on cfg.device

    encoder = Encoder(resolve_model(run, "best"), dev)
    records = load_records(cfg.data)
    train = select_split(records, "train")
    # The heads trained beside the towers shortlist worse than heads fitted to the final
    # towers (README, "Two-stage retrieval"): what the index's two-stage search uses.
    print(f"[3/{STEPS}] fitting the global heads on the {len(train)} training images")
    # The frozen text backbone's states of the training captions, computed once for
    # training: the fit reads them instead of running the backbone again.
    encoder.use_text_cache(text_cache)
    fit_global_heads(encoder, train, cfg.fit, progress=False)
    encoder.use_text_cache(None)
    del text_cache  # hundreds of MiB of caption states, of no use to the steps below
    save_model(encoder.model, out / "model", tokenizer=encoder.tokenizer.tokenizer)
    test = select_split(records, "test")
    print(f"[4/{STEPS}] evaluating on the test split ({len(test)} images)")
    report = evaluate(encoder, test, cfg.data.captions_per_image, progress=False)
    print(format_report(report))
    (out / "test_metrics.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")

    print(f"[{STEPS}/{STEPS}] indexing the {len(test)} test images, then searching them by text")
    index_dir = out / "index"
    shutil.rmtree(index_dir, ignore_errors=True)  # the model may have changed since
    captions = write_captions(out / "test_captions.jsonl", test)
    Index.create(index_dir, out / "model", cfg.index).close()
    with Index.open(index_dir, cfg=cfg.index, device=dev, writable=True) as index:
        index.add_images(*[r.path for r in test], progress=False)
        index.add_captions(captions, progress=False)
        step = max(1, len(test) // DEMO_QUERIES)
        ranks = []
        for target in test[::step][:DEMO_QUERIES]:
            query = target.captions[0]
            ranking = [h.path for h in index.search_text(query, k=len(test), exhaustive=True)]
            target_rank = ranking.index(os.path.abspath(target.path)) + 1
            ranks.append(target_rank)
            print(f'\n  "{query}"  (written for {target.path.name}, which ranks #{target_rank})')
            for rank, hit in enumerate(index.search_text(query, k=TOP_K), start=1):
                mark = "  <- the image it was written for" if rank == target_rank else ""
                print(f"    {rank}. {hit.path}  score {hit.score:.3f}{mark}")
    listed = ", ".join(f"#{r}" for r in ranks)
    print(f"\nthe example queries rank the image each was written for {listed} of {len(test)}")
    print(f"model directory: {out / 'model'}   metrics: {out / 'test_metrics.json'}")
    print(f'index: {index_dir}  try:  hat search {index_dir} "{test[0].captions[0]}"')
    print(f"                        hat serve {index_dir}   (then open http://127.0.0.1:8000/)")
    return report.metrics["hat"]
