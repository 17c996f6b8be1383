"""The ``hat`` command: subcommands over plain library functions.

hat data synth OUT                      generate the built-in captioned scenes
hat train --preset cpu KEY=VALUE ...    train (dotted config overrides)
hat evaluate MODEL --split test         recall table for each level and the sum
hat export RUN --out DIR                a run's best checkpoint as a model directory
hat import-checkpoint CKPT --out DIR    the authors' released checkpoint as a model directory
hat demo --out DIR                      scenes -> train -> evaluate -> example queries
hat index build MODEL IMAGES --out IDX  index a folder of images (add / remove / info / verify)
hat search IDX "a dog on a beach"       search by text (or --image FILE)
hat explain MODEL IMAGE "caption"       per-level word-region attention maps as a PNG
hat serve IDX                           the web app (FastAPI) on 127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import typing
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

TIMING_REPEATS = 5


def _output_folder(path: str | Path, flag: str) -> Path:
    """``path`` as a folder to write in (made with its parents where missing); refused
    (ValueError, one line) when it, or the nearest of its parents that exists, is not
    a folder."""
    path = Path(path)
    for there in (path, *path.parents):
        if there.is_dir():
            return path
        if there.exists() or there.is_symlink():
            where = "is" if there == path else f"is inside {there}, which is"
            kind = "a file, not a folder" if there.is_file() else "not a folder"
            raise ValueError(f"{flag} {path} {where} {kind}")
    return path


def _output_file(path: str | Path, flag: str) -> Path:
    """``path`` as a file to write: refused (ValueError, one line) when it is a folder or
    its folder does not exist."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name in it, e.g. {path / 'out'}")
    if not path.parent.is_dir():
        what = "is not a folder" if path.parent.exists() else "does not exist"
        raise ValueError(f"{flag} {path}: {path.parent} {what}")
    return path


def _check_address(host: str, port: int) -> None:
    """Refuse (ValueError, one line) an address the server could not listen on: not a
    valid IP address or name, or one this machine cannot bind (not its own, port in use
    or privileged)."""
    import ipaddress
    import socket

    if host.replace(".", "").isdigit():  # digits and dots: must be an IPv4 address
        try:
            ipaddress.IPv4Address(host)
        except ValueError as err:
            raise ValueError(f"host {host} is not a valid IPv4 address: {err}") from None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise ValueError(f"host {host}: no such address on this network ({err})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            raise ValueError(f"cannot serve on {host}:{port}: {err.strerror or err}") from None


def _experiment_config(args: argparse.Namespace):
    from hat.config import apply_overrides, get_preset, load_config

    if args.config:
        cfg = load_config(args.config)
    else:
        cfg = get_preset(args.preset)
    return apply_overrides(cfg, args.overrides)


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from hat.data import SCENE_STYLES, generate_scenes

    _output_folder(args.out, "OUT")
    path = generate_scenes(
        args.out, n_train=args.train, n_val=args.val, n_test=args.test,
        image_size=args.image_size, seed=args.seed, style=SCENE_STYLES[args.style],
    )  # fmt: skip
    print(f"wrote {path}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from hat import distributed
    from hat.config import apply_overrides, load_config
    from hat.train import Trainer, TrainingDiverged, TrainingInterrupted

    run = _output_folder(args.run, "--run")
    if args.resume:
        cfg = apply_overrides(load_config(run / "config.yaml"), args.overrides)
    else:
        cfg = _experiment_config(args)
    try:
        summary = Trainer(cfg, run, device=args.device, resume=args.resume).fit()
        if distributed.is_main_process():
            print(json.dumps(summary, indent=2))
    except TrainingInterrupted as stop:
        print(f"hat: {stop}", file=sys.stderr)
        # The shell's status for "killed by this signal": the run is not finished.
        return 128 + stop.signal_number
    except TrainingDiverged as err:
        print(f"hat: error: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown()
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from hat import distributed
    from hat.checkpoint import resolve_model
    from hat.config import DataConfig, RetrievalConfig, apply_overrides
    from hat.data import CaptionTokenizer, load_records, select_split
    from hat.evaluate import ensemble_report, evaluate, format_report
    from hat.train import pick_device

    models = [m for m in args.model if "=" not in m or Path(m).exists()]
    overrides = [m for m in args.model if m not in models]
    data = DataConfig(
        format=args.format, annotations=args.annotations, image_root=args.image_root,
        use_restval=not args.no_restval, num_workers=args.num_workers,
    )  # fmt: skip
    data = apply_overrides(data, overrides)
    # Under torchrun every process shares the work and gets the report; rank 0 writes it.
    device = distributed.init_from_env(pick_device(args.device))
    try:
        records = select_split(load_records(data), args.split)
        retrieval = RetrievalConfig(shortlist_k=args.shortlist_k, storage_dtype=args.storage_dtype)
        reports = []
        for path in models:
            # Each model scores in the direction it was trained with (its config).
            model = resolve_model(path, args.which).to(device)
            tokenizer = CaptionTokenizer.from_config(model.config.text)
            report = evaluate(
                model, records, tokenizer, device, captions_per_image=data.captions_per_image,
                batch_size=args.batch_size, num_workers=data.num_workers, folds=args.folds,
                retrieval=retrieval,
            )  # fmt: skip
            reports.append((path, model.config.direction, report))
            del model
        ensemble = (
            ensemble_report([r for _, _, r in reports], data.captions_per_image)
            if len(reports) > 1
            else None
        )
        if distributed.is_main_process():
            for path, direction, report in reports:
                if ensemble is not None:
                    print(f"\n== {path} (direction {direction})")
                print(format_report(report))
            if ensemble is not None:
                print(f"\n== ensemble: the sum of the {len(reports)} models' HAT scores")
                print(format_report(ensemble))
            if args.json:
                body = reports[0][2].to_dict()
                if ensemble is not None:
                    body = {
                        "models": [
                            {"model": p, "direction": d, **r.to_dict()} for p, d, r in reports
                        ],
                        "ensemble": ensemble.to_dict(),
                    }
                Path(args.json).write_text(json.dumps(body, indent=2) + "\n")
                print(f"wrote {args.json}")
    finally:
        distributed.teardown()
    return 0


def _cmd_fit_global(args: argparse.Namespace) -> int:
    from hat.checkpoint import resolve_model, save_model
    from hat.config import DataConfig, GlobalFitConfig, apply_overrides
    from hat.data import CaptionTokenizer, load_records, select_split
    from hat.global_heads import fit_global_heads
    from hat.train import pick_device

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty; give a new folder for the fitted model")
    data = DataConfig(format=args.format, annotations=args.annotations, image_root=args.image_root)
    cfg = apply_overrides(GlobalFitConfig(), args.overrides)
    device = pick_device(args.device)
    model = resolve_model(args.model, args.which).to(device)
    records = select_split(load_records(data), args.split)
    tokenizer = CaptionTokenizer.from_config(model.config.text)
    report = fit_global_heads(model, records, tokenizer, device, cfg)
    save_model(model.cpu(), out, tokenizer=tokenizer.tokenizer)
    print(json.dumps(report.to_dict(), indent=2))
    print(f"wrote model directory {out}")
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


def _needs_faiss() -> None:
    """Fail at once, not after minutes of encoding or training, where the index extra
    (faiss, which writes an index's last files) is missing."""
    from hat._optional import needs_extra

    with needs_extra("index"):
        import faiss  # noqa: F401


def _cmd_demo(args: argparse.Namespace) -> int:
    from hat.demo import run_demo

    _needs_faiss()
    run_demo(args.out, device=args.device, overrides=args.overrides)
    return 0


def _index_config(overrides: Sequence[str]):
    from hat.config import IndexConfig, apply_overrides

    return apply_overrides(IndexConfig(), list(overrides))


def _cmd_index_build(args: argparse.Namespace) -> int:
    from hat.index import Index

    _output_folder(args.out, "--out")

    def create(cfg, device) -> None:
        Index.create(args.out, args.model, cfg, device=device).close()

    return _index_images(args, args.out, create)


def _cmd_index_add(args: argparse.Namespace) -> int:
    return _index_images(args, args.index, None, model=args.model)


def _index_images(args: argparse.Namespace, root: str, create, model: str | None = None) -> int:
    """Create (with ``create``) or open an index and add images and captions to it
    (encoded by ``model``, default: the one the index names).

    Under ``torchrun`` every rank reads and encodes a share of the images and rank 0
    writes; captions are encoded by rank 0 alone.
    """
    import torch

    from hat import distributed
    from hat.index import AddReport, Index

    _needs_faiss()
    cfg = _index_config(args.overrides)
    device = distributed.init_from_env(torch.device(args.device or "cpu"))
    main = distributed.is_main_process()
    try:
        if main and create is not None:
            create(cfg, device)
        distributed.barrier()
        with Index.open(root, model=model, cfg=cfg, device=device, writable=main) as index:
            if args.images or args.captions:
                index.model  # noqa: B018 -- a model that cannot be loaded fails before any work
            report = index.add_images(*args.images) if args.images else AddReport()
            if main and args.captions:
                report.captions = index.add_captions(args.captions)
            if main:
                print(report.summary())
                info = index.info()
                size = info["bytes_on_disk"] / 2**20
                print(f"index {info['path']}: {info['images']} images, "
                      f"{info['captions']} captions, {size:.1f} MiB")  # fmt: skip
    finally:
        distributed.teardown()
    return 0


def _cmd_index_remove(args: argparse.Namespace) -> int:
    from hat.index import Index, read_caption_file

    if not (args.paths or args.captions or args.all_captions):
        raise ValueError("index remove: name image files or folders, --captions or --all-captions")
    listed = read_caption_file(args.captions) if args.captions else None  # before any write
    with Index.open(args.index, writable=True) as index:
        before = index.store.count("caption")
        if listed is not None or args.all_captions:
            dropped = index.remove_captions(listed, all_captions=args.all_captions)
            missing = len({(e.text, e.image_path) for e in listed or ()}) - dropped
            if listed is not None and missing:
                print(f"{missing} caption(s) of {args.captions} were not in the index")
        images = index.remove(args.paths) if args.paths else 0
        left = index.store.count("caption")
        print(f"removed {images} image(s), {before - left} caption(s); "
              f"{len(index)} left, {left} caption(s) left")  # fmt: skip
    return 0


def _cmd_index_verify(args: argparse.Namespace) -> int:
    from hat.index import Index

    with Index.open(args.index, writable=args.repair, strict=False) as index:
        report = index.verify(repair=args.repair)
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_index_info(args: argparse.Namespace) -> int:
    from hat.index import Index

    with Index.open(args.index) as index:
        print(json.dumps(index.info(), indent=2))
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from hat import IMPORT_STARTED
    from hat.index import Index

    if (args.query is None) == (args.image is None):
        raise ValueError("give either a text query or --image FILE")
    opened = time.perf_counter()
    cfg = _index_config(args.overrides)
    index = Index.open(args.index, model=args.model, cfg=cfg, device=args.device or "cpu")
    with index:
        ready = time.perf_counter()

        def run():
            if args.image is not None:
                return index.search_image(args.image, args.k, args.exhaustive)
            return index.search_text(args.query, args.k, args.exhaustive)

        hits = run()
        answered = time.perf_counter()
        latencies = []
        if args.timing:
            for _ in range(TIMING_REPEATS):
                start = time.perf_counter()
                run()
                latencies.append((time.perf_counter() - start) * 1e3)
    if args.json:
        print(json.dumps([h.to_dict() for h in hits], indent=2))
    else:
        for rank, hit in enumerate(hits, start=1):
            levels = " ".join(f"{s:.3f}" for s in hit.level_scores)
            what = hit.path if hit.kind == "image" else f'"{hit.text}"  ({hit.path or "-"})'
            print(f"{rank:3d}. {hit.score:7.3f}  [{levels}]  {what}")
    if args.timing:
        sys.stdout.flush()
        print(
            f"timing: cold start to first answer {answered - IMPORT_STARTED:.2f} s "
            f"(imports {opened - IMPORT_STARTED:.2f} s, open index + model {ready - opened:.2f} s, "
            f"first query {1e3 * (answered - ready):.1f} ms); warm query median "
            f"{statistics.median(latencies):.1f} ms over {TIMING_REPEATS}",
            file=sys.stderr,
        )
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from hat.checkpoint import resolve_model
    from hat.data import CaptionTokenizer, load_image
    from hat.explain import explain, render_png

    _output_file(args.out, "--out")
    if args.json:
        _output_file(args.json, "--json")
    model = resolve_model(args.model)
    explanation = explain(
        model, CaptionTokenizer.from_config(model.config.text), load_image(args.image),
        args.caption,
    )  # fmt: skip
    render_png(explanation, args.out)
    levels = ", ".join(f"{lv.score:.3f}" for lv in explanation.levels)
    print(f"HAT score {explanation.score:.3f} (levels {levels}); wrote {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps(explanation.to_dict()) + "\n")
        print(f"wrote {args.json}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from hat.config import ServeConfig, apply_overrides
    from hat.index import Index
    from hat.serve import serve

    cfg = apply_overrides(ServeConfig(), args.overrides)
    given = {
        "host": args.host,
        "port": args.port,
        # An empty --token is refused by ServeConfig; an empty HAT_TOKEN means unset.
        "token": args.token if args.token is not None else os.environ.get("HAT_TOKEN") or None,
    }
    cfg = dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None})
    _check_address(cfg.host, cfg.port)
    index = Index.open(args.index, model=args.model, device=args.device or "cpu")
    try:
        index.model  # noqa: B018 -- a model that cannot be loaded fails before "serving on"
    except BaseException:
        index.close()
        raise
    print(f"serving {args.index} ({len(index)} images) on http://{cfg.host}:{cfg.port}/"
          + (" (bearer token required)" if cfg.token else ""))  # fmt: skip
    serve(index, cfg)
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
    synth.add_argument(
        "--style", default="scenes", choices=["scenes", "textured", "free"],
        help="kind of scenes: the built-in ones (grid, sibling groups, rich captions), "
        "textured backgrounds with relation captions, or free placement of 3-4 objects",
    )  # fmt: skip
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

    ev = sub.add_parser(
        "evaluate",
        help="retrieval metrics of a model (or of an ensemble of models) on a split",
        description="Recall per level and for HAT's sum. Several models: each is reported "
        "in its own direction, then their ensemble (the sum of their score matrices).",
    )
    ev.add_argument(
        "model", nargs="+", metavar="MODEL",
        help="model directories, run folders or training checkpoints (several: an "
        "ensemble), then any KEY=VALUE DataConfig overrides",
    )  # fmt: skip
    ev.add_argument("--which", default="best", choices=["best", "latest"])
    ev.add_argument("--format", default="karpathy", choices=["karpathy", "jsonl", "csv"])
    ev.add_argument("--annotations", required=True, help="Karpathy JSON / JSONL / CSV file")
    ev.add_argument("--image-root", required=True, help="folder the image paths are relative to")
    ev.add_argument("--split", default="test")
    ev.add_argument("--no-restval", action="store_true", help="keep MSCOCO restval separate")
    ev.add_argument("--folds", type=int, default=0, help="5 for the MSCOCO 1K protocol")
    ev.add_argument(
        "--shortlist-k", type=int, default=RetrievalConfig.shortlist_k,
        help="also report two-stage retrieval: each caption's k images and each image's "
        "k x captions-per-image captions by global embedding, reranked exactly",
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
    ev.set_defaults(func=_cmd_evaluate)

    fit = sub.add_parser(
        "fit-global",
        help="fit the global-embedding heads (two-stage search) of a trained model, towers frozen",
    )  # fmt: skip
    fit.add_argument("model", help="model directory, run folder or training checkpoint")
    fit.add_argument("--which", default="best", choices=["best", "latest"])
    fit.add_argument("--out", required=True, help="new model directory to write")
    fit.add_argument("--format", default="karpathy", choices=["karpathy", "jsonl", "csv"])
    fit.add_argument("--annotations", required=True, help="Karpathy JSON / JSONL / CSV file")
    fit.add_argument("--image-root", required=True, help="folder the image paths are relative to")
    fit.add_argument("--split", default="train")
    fit.add_argument("--device")
    fit.add_argument(
        "--set", dest="overrides", nargs="+", metavar="KEY=VALUE", default=[],
        help="GlobalFitConfig fields, e.g. --set epochs=20 batch_size=256",
    )  # fmt: skip
    fit.set_defaults(func=_cmd_fit_global)

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

    def index_overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--set", dest="overrides", nargs="+", metavar="KEY=VALUE", default=[],
            help="IndexConfig fields, e.g. --set batch_size=64 num_workers=2 shortlist=300",
        )  # fmt: skip
        p.add_argument("--device", help="cpu (default), cuda, cuda:1, mps")

    index = sub.add_parser("index", help="index a collection of images").add_subparsers(
        dest="index_command", required=True
    )
    build = index.add_parser("build", help="create an index of image files and folders")
    build.add_argument("model", help="model directory, run folder or training checkpoint")
    build.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    build.add_argument("--out", required=True, help="new index folder")
    build.add_argument(
        "--captions", help="captions to index too (Karpathy .json, .jsonl, .csv or .txt)"
    )
    index_overrides(build)
    build.set_defaults(func=_cmd_index_build)
    add = index.add_parser("add", help="index new or changed files (and captions)")
    add.add_argument("index", help="index folder")
    add.add_argument("images", nargs="*", help="image files or folders")
    add.add_argument(
        "--captions", help="captions to index too (Karpathy .json, .jsonl, .csv or .txt)"
    )
    add.add_argument("--model", help="model to encode with (default: the one the index names)")
    index_overrides(add)
    add.set_defaults(func=_cmd_index_add)
    remove = index.add_parser("remove", help="remove images (files or whole folders), captions")
    remove.add_argument("index", help="index folder")
    remove.add_argument(
        "paths", nargs="*", help="image files or folders to forget, with their captions"
    )
    which = remove.add_mutually_exclusive_group()
    which.add_argument(
        "--captions", metavar="FILE", help="forget the captions listed in FILE (any caption file)"
    )
    which.add_argument("--all-captions", action="store_true", help="forget every caption")
    remove.set_defaults(func=_cmd_index_remove)
    info = index.add_parser("info", help="what an index holds")
    info.add_argument("index", help="index folder")
    info.set_defaults(func=_cmd_index_info)
    verify = index.add_parser(
        "verify", help="check every file against its checksum (exit 1 if damaged)"
    )
    verify.add_argument("index", help="index folder")
    verify.add_argument(
        "--repair", action="store_true",
        help="drop damaged segments (re-add their images), restore the manifest, remove "
        "leftovers of interrupted writes, rewrite the faiss files",
    )  # fmt: skip
    verify.set_defaults(func=_cmd_index_verify)

    search = sub.add_parser("search", help="search an index by text or by image")
    search.add_argument("index", help="index folder")
    search.add_argument("query", nargs="?", help="text query")
    search.add_argument("--image", help="query image: finds captions, or images if none")
    search.add_argument("-k", type=int, default=10, help="number of results")
    search.add_argument("--exhaustive", action="store_true", help="score every item exactly")
    search.add_argument("--json", action="store_true", help="print the hits as JSON")
    search.add_argument("--timing", action="store_true", help="print cold start and latency")
    search.add_argument("--model", help="model to use (default: the one the index names)")
    index_overrides(search)
    search.set_defaults(func=_cmd_search)

    expl = sub.add_parser("explain", help="draw which regions each word matched, per level")
    expl.add_argument("model", help="model directory, run folder or training checkpoint")
    expl.add_argument("image", help="image file")
    expl.add_argument("caption", help="the caption to explain")
    expl.add_argument("--out", default="explain.png", help="PNG to write")
    expl.add_argument("--json", help="also write the attention weights as JSON here")
    expl.set_defaults(func=_cmd_explain)

    srv = sub.add_parser("serve", help="the web app over an index")
    srv.add_argument("index", help="index folder")
    srv.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, help="port (default 8000)")
    srv.add_argument("--token", help="require 'Authorization: Bearer TOKEN' (or set HAT_TOKEN)")
    srv.add_argument("--model", help="model to use (default: the one the index names)")
    srv.add_argument("--device", help="cpu (default), cuda, mps")
    srv.add_argument(
        "--set", dest="overrides", nargs="+", metavar="KEY=VALUE", default=[],
        help="ServeConfig limits, e.g. --set max_k=50 max_upload_bytes=5000000",
    )  # fmt: skip
    srv.set_defaults(func=_cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``hat`` command; returns the exit status."""
    args = build_parser().parse_args(argv)  # --help and usage errors exit here, importing little
    import torch

    from hat._optional import MissingExtraError
    from hat.checkpoint import CheckpointError
    from hat.config import ConfigError
    from hat.index.store import IndexFormatError

    # Denormal floats are ~100x slower on x86 CPUs; flush them for every command.
    torch.set_flush_denormal(True)
    try:
        return args.func(args)
    except (
        ConfigError,
        CheckpointError,
        IndexFormatError,
        MissingExtraError,
        OSError,
        ValueError,
    ) as err:
        # OSError: a path of the wrong kind or without permission that no check caught.
        print(f"hat: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
