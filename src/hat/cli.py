"""The ``hat`` command: subcommands over plain library functions.

Every command reads the one config tree (:class:`hat.config.ExperimentConfig`): the
preset ``--preset`` (default ``cpu``) or the file ``--config FILE``, then ``KEY=VALUE``
dotted overrides anywhere on the line (``index.batch_size=64``, ``device=cpu``), then
the command's shorthand flags (``--device``, ``--port``, ...), which have no defaults
of their own: unset, the value comes from the config.

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

from hat.config import RUN_CONFIG, DataConfig, RetrievalConfig

if typing.TYPE_CHECKING:
    import torch

__all__ = ["main"]

TIMING_REPEATS = 5
TOKEN_VARIABLE = "HAT_TOKEN"  # the serve token, when neither a flag nor the config sets it


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


# The dest prefix of a shorthand flag: ``--port`` sets ``config:serve.port``.
SHORTHAND = "config:"


def _is_override(item: str, sections: Sequence[str]) -> bool:
    """Whether a command-line item is a ``KEY=VALUE`` override of the config tree: its
    key starts with one of the tree's ``sections`` (and it is not an existing path)."""
    key, equals, _ = item.partition("=")
    return bool(equals) and key.split(".")[0] in sections and not Path(item).exists()


def _config(args: argparse.Namespace):
    """The command's config: preset or file, overrides, then shorthand flags."""
    from hat.config import build_config, resolve_device

    path = args.config
    if getattr(args, "resume", False):
        if args.config or args.preset:
            raise ValueError(
                f"--resume continues the config of the run ({Path(args.run) / RUN_CONFIG}); "
                "give no --preset or --config, only KEY=VALUE overrides"
            )
        path = Path(args.run) / RUN_CONFIG
    shorthands = {
        key.removeprefix(SHORTHAND): value
        for key, value in vars(args).items()
        if key.startswith(SHORTHAND)
    }
    cfg = build_config(path, args.preset, args.overrides, shorthands)
    resolve_device(cfg.device)  # a device torch does not know is refused by every command
    return cfg


def _device(cfg) -> torch.device:
    """The device of the config's one rule (``device``, :func:`hat.config.resolve_device`)."""
    import torch

    from hat.config import resolve_device

    return torch.device(resolve_device(cfg.device))


def _require_data(cfg, command: str) -> None:
    """Refuse a command that reads a dataset when the config names none."""
    if cfg.data.annotations is None or cfg.data.image_root is None:
        raise ValueError(
            f"{command} needs the data: --annotations FILE --image-root DIR "
            "(or data.annotations=... data.image_root=..., or a --config that sets them)"
        )


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
    from hat.train import Trainer, TrainingDiverged, TrainingInterrupted

    run = _output_folder(args.run, "--run")
    cfg = args.cfg
    try:
        summary = Trainer(cfg, run, resume=args.resume).fit()  # on cfg.device
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
    from hat.data import load_records, select_split
    from hat.encoder import Encoder
    from hat.evaluate import ensemble_report, evaluate, format_report

    cfg = args.cfg
    _require_data(cfg, "evaluate")
    data = cfg.data
    # Under torchrun every process shares the work and gets the report; rank 0 writes it.
    device = distributed.init_from_env(_device(cfg))
    try:
        records = select_split(load_records(data), args.split)
        reports = []
        for path in args.model:
            # Each model scores in the direction it was trained with (its config).
            encoder = Encoder(resolve_model(path, args.which), device)
            report = evaluate(
                encoder, records, captions_per_image=data.captions_per_image,
                batch_size=cfg.train.eval_batch_size, num_workers=data.num_workers,
                folds=args.folds, retrieval=cfg.retrieval,
            )  # fmt: skip
            reports.append((path, encoder.config.direction, report))
            del encoder
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
    from hat.data import load_records, select_split
    from hat.encoder import Encoder
    from hat.global_heads import fit_global_heads

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty; give a new folder for the fitted model")
    cfg = args.cfg
    _require_data(cfg, "fit-global")
    encoder = Encoder(resolve_model(args.model, args.which), _device(cfg))
    records = select_split(load_records(cfg.data), args.split)
    report = fit_global_heads(encoder, records, cfg.fit)
    save_model(encoder.model.cpu(), out, tokenizer=encoder.tokenizer.tokenizer)
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
    run_demo(args.out, args.cfg)
    return 0


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
    from hat import distributed
    from hat.index import AddReport, Index

    _needs_faiss()
    cfg = args.cfg
    device = distributed.init_from_env(_device(cfg))
    main = distributed.is_main_process()
    try:
        if main and create is not None:
            create(cfg.index, device)
        distributed.barrier()
        with Index.open(root, model=model, cfg=cfg.index, device=device, writable=main) as index:
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
    cfg = args.cfg
    listed = read_caption_file(args.captions) if args.captions else None  # before any write
    with Index.open(args.index, cfg=cfg.index, writable=True) as index:
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

    cfg = args.cfg
    with Index.open(args.index, cfg=cfg.index, writable=args.repair, strict=False) as index:
        report = index.verify(repair=args.repair)
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_index_info(args: argparse.Namespace) -> int:
    from hat.index import Index

    with Index.open(args.index, cfg=args.cfg.index) as index:
        print(json.dumps(index.info(), indent=2))
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from hat import IMPORT_STARTED
    from hat.index import Index

    if (args.query is None) == (args.image is None):
        raise ValueError("give either a text query or --image FILE")
    opened = time.perf_counter()
    cfg = args.cfg
    index = Index.open(
        args.index, model=args.model, cfg=cfg.index, device=_device(cfg), retrieval=cfg.retrieval
    )
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
    from hat.data import load_image
    from hat.encoder import Encoder
    from hat.explain import explain, render_png

    _output_file(args.out, "--out")
    if args.json:
        _output_file(args.json, "--json")
    explanation = explain(
        Encoder.load(args.model, _device(args.cfg)), load_image(args.image), args.caption
    )
    render_png(explanation, args.out)
    levels = ", ".join(f"{lv.score:.3f}" for lv in explanation.levels)
    print(f"HAT score {explanation.score:.3f} (levels {levels}); wrote {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps(explanation.to_dict()) + "\n")
        print(f"wrote {args.json}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from hat.index import Index
    from hat.serve import serve

    tree = args.cfg
    cfg = tree.serve
    if cfg.token is None and os.environ.get(TOKEN_VARIABLE):  # empty: unset
        cfg = dataclasses.replace(cfg, token=os.environ[TOKEN_VARIABLE])
    _check_address(cfg.host, cfg.port)
    index = Index.open(
        args.index, model=args.model, cfg=tree.index, device=_device(tree), retrieval=tree.retrieval
    )
    try:
        index.model  # noqa: B018 -- a model that cannot be loaded fails before "serving on"
    except BaseException:
        index.close()
        raise
    print(f"serving {args.index} ({len(index)} images) on http://{cfg.host}:{cfg.port}/"
          + (" (bearer token required)" if cfg.token else ""))  # fmt: skip
    serve(index, cfg)
    return 0


def _shorthand(p: argparse.ArgumentParser, flag: str, key: str, help: str, **kw) -> None:
    """A flag that sets the config field ``key`` (a dotted name); unset (``None``), the
    value comes from the config."""
    if "action" not in kw:
        kw["metavar"] = key.rsplit(".", 1)[-1].upper()
    p.add_argument(flag, dest=SHORTHAND + key, default=None, help=f"{help} [{key}]", **kw)


def _with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give a command the config of every command: --preset or --config, KEY=VALUE
    overrides and --device."""
    from hat.config import DEFAULT_PRESET, list_presets

    p.add_argument(
        "--preset",
        choices=list_presets(),
        help=f"the preset to start from (default {DEFAULT_PRESET})",
    )
    p.add_argument(
        "--config", help="YAML/JSON config file to start from ('preset: NAME' and fields)"
    )
    p.epilog = (
        "KEY=VALUE: dotted overrides of the config tree, anywhere on the line (e.g. "
        "train.epochs=3 index.batch_size=64 serve.max_k=50 device=cpu); a flag marked "
        "[key] sets that key, and without it the key keeps its config value."
    )
    _shorthand(p, "--device", "device", "cuda, cuda:1, mps, cpu or auto (cuda, else mps, else cpu)")
    return p


def _choices(cls: type, name: str) -> tuple[str, ...]:
    """The values a ``Literal`` field of config ``cls`` accepts."""
    return typing.get_args(typing.get_type_hints(cls)[name])


def _data_flags(p: argparse.ArgumentParser) -> None:
    """Shorthands for the dataset a command reads (the ``data`` section)."""
    _shorthand(p, "--format", "data.format", "caption file format",
               choices=_choices(DataConfig, "format"))  # fmt: skip
    _shorthand(p, "--annotations", "data.annotations", "Karpathy JSON / JSONL / CSV file")
    _shorthand(p, "--image-root", "data.image_root", "folder the image paths are relative to")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``hat`` command."""
    parser = argparse.ArgumentParser(prog="hat", description="HAT image-text retrieval")
    sub = parser.add_subparsers(dest="command", required=True)
    commands: list[argparse.ArgumentParser] = []

    def command(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        commands.append(_with_config(p))
        return p

    data = sub.add_parser("data", help="datasets").add_subparsers(
        dest="data_command", required=True
    )
    synth = command(data.add_parser("synth", help="generate the built-in captioned scenes"))
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

    train = command(sub.add_parser("train", help="train a model"))
    train.add_argument("--run", default="runs/train", help="run folder")
    train.add_argument(
        "--resume", action="store_true",
        help=f"continue the run in --run, from its {RUN_CONFIG} (and KEY=VALUE overrides)",
    )  # fmt: skip
    train.set_defaults(func=_cmd_train)

    ev = command(sub.add_parser(
        "evaluate",
        help="retrieval metrics of a model (or of an ensemble of models) on a split",
        description="Recall per level and for HAT's sum. Several models: each is reported "
        "in its own direction, then their ensemble (the sum of their score matrices).",
    ))  # fmt: skip
    ev.add_argument(
        "model", nargs="+", metavar="MODEL",
        help="model directories, run folders or training checkpoints (several: an ensemble)",
    )  # fmt: skip
    ev.add_argument("--which", default="best", choices=["best", "latest"])
    _data_flags(ev)
    ev.add_argument("--split", default="test")
    _shorthand(ev, "--no-restval", "data.use_restval", "keep MSCOCO restval separate",
               action="store_const", const=False)  # fmt: skip
    ev.add_argument("--folds", type=int, default=0, help="5 for the MSCOCO 1K protocol")
    _shorthand(
        ev, "--shortlist-k", "retrieval.shortlist_k",
        "also report two-stage retrieval: each caption's k images and each image's "
        "k x captions-per-image captions by global embedding, reranked exactly", type=int,
    )  # fmt: skip
    _shorthand(ev, "--storage-dtype", "retrieval.storage_dtype",
               "precision of the encoded tokens kept in host memory",
               choices=_choices(RetrievalConfig, "storage_dtype"))  # fmt: skip
    _shorthand(ev, "--batch-size", "train.eval_batch_size", "images encoded at once", type=int)
    _shorthand(ev, "--num-workers", "data.num_workers", "image decoding processes", type=int)
    ev.add_argument("--json", help="also write the report as JSON here")
    ev.set_defaults(func=_cmd_evaluate)

    fit = command(sub.add_parser(
        "fit-global",
        help="fit the global-embedding heads (two-stage search) of a trained model, towers "
        "frozen (the fit section: fit.epochs=20 fit.batch_size=256)",
    ))  # fmt: skip
    fit.add_argument("model", help="model directory, run folder or training checkpoint")
    fit.add_argument("--which", default="best", choices=["best", "latest"])
    fit.add_argument("--out", required=True, help="new model directory to write")
    _data_flags(fit)
    fit.add_argument("--split", default="train")
    fit.set_defaults(func=_cmd_fit_global)

    export = command(sub.add_parser("export", help="write a run's checkpoint as a model directory"))
    export.add_argument("run", help="run folder or training checkpoint")
    export.add_argument("--out", required=True)
    export.add_argument("--which", default="best", choices=["best", "latest"])
    export.set_defaults(func=_cmd_export)

    imp = command(
        sub.add_parser("import-checkpoint", help="import an official HAT release checkpoint")
    )
    imp.add_argument("checkpoint", help="the authors' .ckpt file")
    imp.add_argument("--out", required=True, help="model directory to write")
    imp.add_argument(
        "--trust-checkpoint", action="store_true",
        help="allow arbitrary unpickling (only for files from a source you trust)",
    )  # fmt: skip
    imp.set_defaults(func=_cmd_import)

    demo = command(sub.add_parser("demo", help="the built-in demo, offline on a CPU"))
    demo.add_argument("--out", default="runs/demo")
    demo.set_defaults(func=_cmd_demo)

    def indexing(p: argparse.ArgumentParser) -> None:
        _shorthand(p, "--batch-size", "index.batch_size", "images encoded at once", type=int)
        _shorthand(p, "--num-workers", "index.num_workers", "image decoding processes", type=int)

    index = sub.add_parser("index", help="index a collection of images").add_subparsers(
        dest="index_command", required=True
    )
    build = command(index.add_parser("build", help="create an index of image files and folders"))
    build.add_argument("model", help="model directory, run folder or training checkpoint")
    build.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    build.add_argument("--out", required=True, help="new index folder")
    build.add_argument(
        "--captions", help="captions to index too (Karpathy .json, .jsonl, .csv or .txt)"
    )
    indexing(build)
    build.set_defaults(func=_cmd_index_build)
    add = command(index.add_parser("add", help="index new or changed files (and captions)"))
    add.add_argument("index", help="index folder")
    add.add_argument("images", nargs="*", help="image files or folders")
    add.add_argument(
        "--captions", help="captions to index too (Karpathy .json, .jsonl, .csv or .txt)"
    )
    add.add_argument("--model", help="model to encode with (default: the one the index names)")
    indexing(add)
    add.set_defaults(func=_cmd_index_add)
    remove = command(
        index.add_parser("remove", help="remove images (files or whole folders), captions")
    )
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
    info = command(index.add_parser("info", help="what an index holds"))
    info.add_argument("index", help="index folder")
    info.set_defaults(func=_cmd_index_info)
    verify = command(index.add_parser(
        "verify", help="check every file against its checksum (exit 1 if damaged)"
    ))  # fmt: skip
    verify.add_argument("index", help="index folder")
    verify.add_argument(
        "--repair", action="store_true",
        help="drop damaged segments (re-add their images), restore the manifest, remove "
        "leftovers of interrupted writes, rewrite the faiss files",
    )  # fmt: skip
    verify.set_defaults(func=_cmd_index_verify)

    search = command(sub.add_parser("search", help="search an index by text or by image"))
    search.add_argument("index", help="index folder")
    search.add_argument("query", nargs="?", help="text query")
    search.add_argument("--image", help="query image: finds captions, or images if none")
    search.add_argument("-k", type=int, default=10, help="number of results")
    search.add_argument("--exhaustive", action="store_true", help="score every item exactly")
    search.add_argument("--json", action="store_true", help="print the hits as JSON")
    search.add_argument("--timing", action="store_true", help="print cold start and latency")
    search.add_argument("--model", help="model to use (default: the one the index names)")
    search.set_defaults(func=_cmd_search)

    expl = command(
        sub.add_parser("explain", help="draw which regions each word matched, per level")
    )
    expl.add_argument("model", help="model directory, run folder or training checkpoint")
    expl.add_argument("image", help="image file")
    expl.add_argument("caption", help="the caption to explain")
    expl.add_argument("--out", default="explain.png", help="PNG to write")
    expl.add_argument("--json", help="also write the attention weights as JSON here")
    expl.set_defaults(func=_cmd_explain)

    srv = command(sub.add_parser("serve", help="the web app over an index (the serve section)"))
    srv.add_argument("index", help="index folder")
    _shorthand(
        srv,
        "--host",
        "serve.host",
        "address to bind (the default, loopback, serves this machine only)",
    )
    _shorthand(srv, "--port", "serve.port", "port", type=int)
    _shorthand(srv, "--token", "serve.token",
               f"require 'Authorization: Bearer TOKEN' (or set {TOKEN_VARIABLE})")  # fmt: skip
    srv.add_argument("--model", help="model to use (default: the one the index names)")
    srv.set_defaults(func=_cmd_serve)
    for p in commands:  # every argument is known now: the usage line ends with the overrides
        p.usage = f"{p.format_usage().removeprefix('usage: ').rstrip()} [KEY=VALUE ...]"
    return parser


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``argv`` without its ``KEY=VALUE`` overrides of the config tree, and those
    overrides (which may stand anywhere, even among a command's other positionals)."""
    from hat.config import ExperimentConfig

    sections = [f.name for f in dataclasses.fields(ExperimentConfig)]
    overrides = [item for item in argv if _is_override(item, sections)]
    return [item for item in argv if not _is_override(item, sections)], overrides


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``hat`` command; returns the exit status."""
    rest, overrides = _split_overrides(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(rest)  # --help and usage errors exit here, importing little
    args.overrides = overrides
    import torch

    from hat._optional import MissingExtraError
    from hat.checkpoint import CheckpointError
    from hat.config import ConfigError
    from hat.index.store import IndexFormatError

    # Denormal floats are ~100x slower on x86 CPUs; flush them for every command.
    torch.set_flush_denormal(True)
    try:
        args.cfg = _config(args)  # every command's, checked before any work
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
