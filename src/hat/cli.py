"""The ``hat`` command: subcommands over plain library functions.

hat data synth OUT                      generate the built-in captioned scenes
hat train --preset cpu KEY=VALUE ...    train (dotted config overrides)
hat evaluate MODEL --split test         recall table for each level and the sum
hat export RUN --out DIR                a run's best checkpoint as a model directory
hat import-checkpoint CKPT --out DIR    the authors' released checkpoint as a model directory
hat demo --out DIR                      scenes -> train -> evaluate -> example queries
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _experiment_config(args: argparse.Namespace):
    from hat.config import apply_overrides, get_preset, load_config

    if args.config:
        cfg = load_config(args.config)
    else:
        cfg = get_preset(args.preset)
    return apply_overrides(cfg, args.overrides)


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from hat.data import generate_scenes

    path = generate_scenes(
        args.out, n_train=args.train, n_val=args.val, n_test=args.test,
        image_size=args.image_size, seed=args.seed,
    )  # fmt: skip
    print(f"wrote {path}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from hat.config import apply_overrides, load_config
    from hat.train import Trainer

    run = Path(args.run)
    if args.resume:
        cfg = apply_overrides(load_config(run / "config.yaml"), args.overrides)
    else:
        cfg = _experiment_config(args)
    summary = Trainer(cfg, run, device=args.device, resume=args.resume).fit()
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from hat.checkpoint import resolve_model
    from hat.config import DataConfig, RetrievalConfig, apply_overrides
    from hat.data import CaptionTokenizer, load_records, select_split
    from hat.evaluate import evaluate, format_report
    from hat.train import pick_device

    data = DataConfig(
        format=args.format, annotations=args.annotations, image_root=args.image_root,
        use_restval=not args.no_restval, num_workers=args.num_workers,
    )  # fmt: skip
    data = apply_overrides(data, args.overrides)
    device = pick_device(args.device)
    model = resolve_model(args.model, args.which).to(device)
    records = select_split(load_records(data), args.split)
    tokenizer = CaptionTokenizer.from_config(model.config.text)
    retrieval = RetrievalConfig(shortlist_k=args.shortlist_k, storage_dtype=args.storage_dtype)
    report = evaluate(
        model, records, tokenizer, device, captions_per_image=data.captions_per_image,
        batch_size=args.batch_size, num_workers=data.num_workers, folds=args.folds,
        retrieval=retrieval,
    )  # fmt: skip
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from hat.checkpoint import resolve_model, save_model

    out = save_model(resolve_model(args.run, args.which), args.out)
    print(f"wrote model directory {out}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from hat.official import import_official_checkpoint

    import_official_checkpoint(args.checkpoint, out_dir=args.out, trust=args.trust_checkpoint)
    print(f"wrote model directory {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from hat.demo import run_demo

    run_demo(args.out, device=args.device, overrides=args.overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``hat`` command."""
    from hat.config import RetrievalConfig, list_presets

    parser = argparse.ArgumentParser(prog="hat", description="HAT image-text retrieval")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="datasets").add_subparsers(
        dest="data_command", required=True
    )
    synth = data.add_parser("synth", help="generate the built-in captioned scenes")
    synth.add_argument("out", help="output folder")
    synth.add_argument("--train", type=int, default=1200, help="training images")
    synth.add_argument("--val", type=int, default=100, help="validation images")
    synth.add_argument("--test", type=int, default=100, help="test images")
    synth.add_argument("--image-size", type=int, default=128)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_cmd_data_synth)

    def add_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--preset", default="cpu", choices=list_presets())
        p.add_argument("--config", help="YAML/JSON config file (overrides --preset)")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
        p.add_argument("--device", help="cuda, cuda:1, mps or cpu (default: best available)")

    train = sub.add_parser("train", help="train a model")
    add_config(train)
    train.add_argument("--run", default="runs/train", help="run folder")
    train.add_argument("--resume", action="store_true", help="continue the run in --run")
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser("evaluate", help="retrieval metrics of a model on a split")
    ev.add_argument("model", help="model directory, run folder or training checkpoint")
    ev.add_argument("--which", default="best", choices=["best", "latest"])
    ev.add_argument("--format", default="karpathy", choices=["karpathy", "jsonl", "csv"])
    ev.add_argument("--annotations", required=True, help="Karpathy JSON / JSONL / CSV file")
    ev.add_argument("--image-root", required=True, help="folder the image paths are relative to")
    ev.add_argument("--split", default="test")
    ev.add_argument("--no-restval", action="store_true", help="keep MSCOCO restval separate")
    ev.add_argument("--folds", type=int, default=0, help="5 for the MSCOCO 1K protocol")
    ev.add_argument(
        "--shortlist-k", type=int, default=RetrievalConfig.shortlist_k,
        help="also report two-stage retrieval: k candidates by global embedding, reranked",
    )  # fmt: skip
    ev.add_argument(
        "--storage-dtype", default=RetrievalConfig.storage_dtype,
        choices=typing.get_args(typing.get_type_hints(RetrievalConfig)["storage_dtype"]),
        help="precision of the encoded tokens kept in host memory",
    )  # fmt: skip
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--num-workers", type=int, default=2)
    ev.add_argument("--json", help="also write the report as JSON here")
    ev.add_argument("--device")
    ev.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="DataConfig overrides")
    ev.set_defaults(func=_cmd_evaluate)

    export = sub.add_parser("export", help="write a run's checkpoint as a model directory")
    export.add_argument("run", help="run folder or training checkpoint")
    export.add_argument("--out", required=True)
    export.add_argument("--which", default="best", choices=["best", "latest"])
    export.set_defaults(func=_cmd_export)

    imp = sub.add_parser("import-checkpoint", help="import an official HAT release checkpoint")
    imp.add_argument("checkpoint", help="the authors' .ckpt file")
    imp.add_argument("--out", required=True, help="model directory to write")
    imp.add_argument(
        "--trust-checkpoint", action="store_true",
        help="allow arbitrary unpickling (only for files from a source you trust)",
    )  # fmt: skip
    imp.set_defaults(func=_cmd_import)

    demo = sub.add_parser("demo", help="the built-in demo, offline on a CPU")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--device")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``hat`` command; returns the exit status."""
    import torch

    from hat.checkpoint import CheckpointError
    from hat.config import ConfigError

    args = build_parser().parse_args(argv)
    # Denormal floats are ~100x slower on x86 CPUs; flush them for every command.
    torch.set_flush_denormal(True)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"hat: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
