"""Bad command-line and config input: one clear ``hat: error:`` line and exit 2, never
a traceback and never a silent no-op; every config field's valid range, checked where
configs are built, by its dotted name."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from hat.cli import main
from hat.config import (
    SELECTABLE_METRICS,
    ConfigError,
    ExperimentConfig,
    FieldRangeError,
    Valid,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    get_preset,
    list_presets,
    load_config,
)

# -- the command line ------------------------------------------------------------------


def _index_of_a_moved_model(tmp_path: Path, collection: dict[str, Path]) -> Path:
    """An empty index whose manifest names a model directory that is gone since."""
    from hat.index import Index

    model = Path(shutil.copytree(collection["model"], tmp_path / "moved-model"))
    Index.create(tmp_path / "idx", model).close()
    shutil.rmtree(model)
    return tmp_path / "idx"


def _a_file(tmp_path: Path) -> str:
    path = tmp_path / "a-file"
    path.write_text("not a folder\n")
    return str(path)


def _a_json_file(tmp_path: Path) -> str:
    path = tmp_path / "notes.json"
    path.write_text('{"not": "a model"}\n')
    return str(path)


def _a_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


class _Foreign:
    """Something no training checkpoint holds."""


def _a_foreign_pickle(tmp_path: Path) -> str:
    path = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "callbacks": _Foreign()}, path)
    return str(path)


Argv = Callable[[Path, dict[str, Path]], list[str]]

# (case, argv from tmp_path and the collection, what the one error line must say)
CASES: list[tuple[str, Argv, str]] = [
    # tracebacks before
    ("index-build-out-is-a-file",
     lambda t, c: ["index", "build", str(c["model"]), str(c["images"]), "--out", _a_file(t)],
     "--out {t}/a-file is a file, not a folder"),
    ("index-build-batch-size-0",
     lambda t, c: ["index", "build", str(c["model"]), str(c["images"]), "--out", str(t / "i"),
                   "index.batch_size=0"],
     "index.batch_size must be >= 1, got 0"),
    ("train-batch-size-0",
     lambda t, c: ["train", "--preset", "tiny", "--run", str(t / "run"), "train.batch_size=0"],
     "train.batch_size must be >= 1, got 0"),
    ("explain-out-is-a-folder",
     lambda t, c: ["explain", str(c["model"]), str(next(c["images"].iterdir())), "a red circle",
                   "--out", str(t)],
     "--out {t} is a folder"),
    ("train-run-is-a-file",
     lambda t, c: ["train", "--preset", "tiny", "--run", _a_file(t)],
     "--run {t}/a-file is a file, not a folder"),
    ("data-synth-out-is-a-file",
     lambda t, c: ["data", "synth", _a_file(t)],
     "OUT {t}/a-file is a file, not a folder"),
    ("serve-port-out-of-range",
     lambda t, c: ["serve", str(t / "idx"), "--port", "99999"],
     "serve.port must be >= 1 and <= 65535, got 99999"),
    # unclear before
    ("index-commit-every-0",
     lambda t, c: ["index", "build", str(c["model"]), str(c["images"]), "--out", str(t / "i"),
                   "index.commit_every=0"],
     "index.commit_every must be >= 1, got 0"),
    ("search-block-0",
     lambda t, c: ["search", str(t / "idx"), "a red circle", "index.shortlist=0"],
     "index.shortlist must be >= 1, got 0"),
    ("model-levels-empty",
     lambda t, c: ["train", "--preset", "tiny", "--run", str(t / "run"), "model.levels=[]"],
     "model.levels must not be empty"),
    ("model-path-is-a-json-file",
     lambda t, c: ["index", "build", _a_json_file(t), str(c["images"]), "--out", str(t / "i")],
     "{t}/notes.json is not a training checkpoint: give a model directory"),
    ("model-path-is-a-foreign-pickle",
     lambda t, c: ["index", "build", _a_foreign_pickle(t), str(c["images"]), "--out", str(t / "i")],
     "{t}/foreign.ckpt: it holds Python objects, not only tensors and plain values"),
    ("model-path-is-the-model-config",
     lambda t, c: ["explain", str(c["model"] / "config.json"), str(next(c["images"].iterdir())),
                   "a red circle", "--out", str(t / "x.png")],
     "is the model directory"),
    ("manifest-model-missing",
     lambda t, c: ["search", str(_index_of_a_moved_model(t, c)), "a red circle"],
     "the model path recorded in the manifest of index {t}/idx; if the model moved, give its "
     "place with --model"),
    ("serve-host-not-an-address",
     lambda t, c: ["serve", str(t / "idx"), "--host", "256.1.1.1"],
     "host 256.1.1.1 is not a valid IPv4 address"),
    # silent before
    ("train-epochs-negative",
     lambda t, c: ["train", "--preset", "tiny", "--run", str(t / "run"), "train.epochs=-1"],
     "train.epochs must be >= 1, got -1"),
    ("model-embed-dim-0",
     lambda t, c: ["train", "--preset", "tiny", "--run", str(t / "run"), "model.embed_dim=0"],
     "model.embed_dim must be >= 1, got 0"),
    # one config surface: shorthand flags, --config and the device rule for every command
    ("index-build-batch-size-flag-0",
     lambda t, c: ["index", "build", str(c["model"]), str(c["images"]), "--out", str(t / "i"),
                   "--batch-size", "0"],
     "index.batch_size must be >= 1, got 0"),
    ("search-config-file-out-of-range",
     lambda t, c: ["search", str(t / "idx"), "a red circle", "--config",
                   _a_config(t, "index:\n  shortlist: 0\n")],
     "{t}/c.yaml: index.shortlist must be >= 1, got 0"),
    ("serve-unknown-key",
     lambda t, c: ["serve", str(t / "idx"), "serve.max_kk=5"],
     "unknown field 'serve.max_kk'"),
    ("search-device-bogus",
     lambda t, c: ["search", str(t / "idx"), "a red circle", "--device", "bogus"],
     "device: 'bogus' is not a device"),
    ("preset-and-config",
     lambda t, c: ["train", "--preset", "tiny", "--config", _a_config(t, "preset: tiny\n"),
                   "--run", str(t / "run")],
     "give --preset or --config, not both"),
    ("resume-with-a-preset",
     lambda t, c: ["train", "--run", str(t / "run"), "--resume", "--preset", "tiny"],
     "--resume continues the config of the run"),
    ("evaluate-without-data",
     lambda t, c: ["evaluate", str(c["model"])],
     "evaluate needs the data: --annotations FILE --image-root DIR"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "says"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(argv: Argv, says: str, tmp_path, collection, capsys) -> None:
    args = argv(tmp_path, collection)
    capsys.readouterr()
    assert main(args) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("hat: error: "), err
    assert says.format(t=tmp_path) in lines[0], err
    assert "serving" not in out


def test_a_moved_model_can_be_given_with_model(tmp_path, collection, capsys) -> None:
    """What the error about a model gone from the manifest's path says to do works."""
    index, model = _index_of_a_moved_model(tmp_path, collection), str(collection["model"])
    image = str(sorted(collection["images"].rglob("*.png"))[0])
    assert main(["index", "add", str(index), image, "--model", model]) == 0
    capsys.readouterr()
    assert main(["search", str(index), "a red circle", "--model", model, "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [Path(hit["path"]).name for hit in hits] == [Path(image).name]


def test_one_override_syntax(tmp_path, collection) -> None:
    """``--set`` is gone: overrides are ``KEY=VALUE`` for every command."""
    with pytest.raises(SystemExit) as refused:
        main(["search", str(tmp_path), "a red circle", "--set", "index.shortlist=3"])
    assert refused.value.code == 2


# -- the config fields -----------------------------------------------------------------

ROOTS = (ExperimentConfig,)  # the one tree: index, serve and fit are its sections
# Number fields whose range depends on another field: checked in __post_init__.
RELATION_ONLY = {"ModelConfig.global_level"}


def _walk(cls: type, path: tuple[str | int, ...] = ()) -> Iterator[tuple[type, tuple, Any, Any]]:
    """``(owner, path, field, type)`` of every field of ``cls`` and of the configs inside
    it (a tuple of configs: its first element)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            yield from _walk(tp, (*path, f.name))
        elif typing.get_origin(tp) is tuple and args and dataclasses.is_dataclass(args[0]):
            yield cls, (*path, f.name), f, tp
            yield from _walk(args[0], (*path, f.name, 0))
        else:
            yield cls, (*path, f.name), f, tp


def _dotted(path: tuple[str | int, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _numbers(tp: Any) -> type | None:
    """``int`` or ``float`` for a number field or a tuple of numbers, else ``None``."""
    if tp in (int, float):
        return tp
    args = [a for a in typing.get_args(tp) if a is not Ellipsis]
    if typing.get_origin(tp) is tuple and args and all(a in (int, float) for a in args):
        return args[0]
    return None


def _bad_elements(valid: Valid, kind: type | None) -> list[Any]:
    """Values just outside ``valid``'s rules, of the field's own number type."""
    if valid.among:
        return ["bogus"]
    if kind is None:
        return []
    step = 1 if kind is int else 0.5
    bad = [] if kind is int else [math.nan, math.inf]
    if valid.ge is not None:
        bad.append(kind(valid.ge - step))
    if valid.gt is not None:
        bad.append(kind(valid.gt))
    if valid.le is not None:
        bad.append(kind(valid.le + step))
    return bad


def _bad_values(f: dataclasses.Field, tp: Any, default: Any) -> list[Any]:
    valid: Valid = f.metadata["valid"]
    elements = _bad_elements(valid, _numbers(tp))
    if isinstance(default, tuple):
        return [[e, *default[1:]] for e in elements] + ([[]] if valid.nonempty else [])
    return [*elements, " "] if valid.nonempty else elements  # a string, or None where allowed


FIELDS = [(root, *item) for root in ROOTS for item in _walk(root)]
CHECKED = [
    (root, owner, path, f, tp) for root, owner, path, f, tp in FIELDS if "valid" in f.metadata
]


def test_the_walk_reaches_every_config_dataclass() -> None:
    import hat.config

    defined = {
        v
        for v in vars(hat.config).values()
        if isinstance(v, type) and dataclasses.is_dataclass(v) and v.__module__ == "hat.config"
    }
    assert defined - {Valid} == {owner for _, owner, *_ in FIELDS} | set(ROOTS)


def test_every_number_field_declares_its_range() -> None:
    unchecked = [
        f"{owner.__name__}.{f.name}"
        for _, owner, _, f, tp in FIELDS
        if _numbers(tp) and "valid" not in f.metadata
    ]
    assert set(unchecked) == RELATION_ONLY


def _owner_default(owner: type, root: type, path: tuple) -> Any:
    node: Any = root()
    for part in path[:-1]:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    assert isinstance(node, owner)
    return node


CASES_BY_FIELD = []
for root, owner, path, f, tp in CHECKED:
    default = getattr(_owner_default(owner, root, path), f.name)
    for bad in _bad_values(f, tp, default):
        case = f"{root.__name__}:{_dotted(path)}={bad!r}"
        CASES_BY_FIELD.append(pytest.param(root, owner, path, f.name, bad, id=case))


def test_the_walk_generates_a_bad_value_for_every_checked_field() -> None:
    covered = {(c.values[0], c.values[2]) for c in CASES_BY_FIELD}
    left = [_dotted(p) for r, _, p, f, tp in CHECKED if (r, p) not in covered]
    assert not left, left


@pytest.mark.parametrize(("root", "owner", "path", "name", "bad"), CASES_BY_FIELD)
def test_out_of_range_is_refused_with_the_dotted_name(root, owner, path, name, bad) -> None:
    dotted = _dotted(path)
    data = config_to_dict(root())
    node = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = bad
    with pytest.raises(ConfigError) as built:
        config_from_dict(data, root)
    message = str(built.value)
    assert message.startswith((f"{dotted} ", f"{dotted}[")), message
    # Built directly (dataclasses.replace, the Python API) it is refused as well.
    instance = _owner_default(owner, root, path)
    with pytest.raises(FieldRangeError, match=rf"^{name}\b"):
        dataclasses.replace(instance, **{name: tuple(bad) if isinstance(bad, list) else bad})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.global_level=3"], "model.global_level must index model.levels: -3..2"),
        (["model.levels=[{image_stage: 4, text_layer: 3}]", "model.global_level=1"],
         "model.global_level must index model.levels: -1..0 for 1 level(s), got 1"),
        (["train.min_temperature=0.1"], "train.min_temperature must be <= train.temperature"),
        (["data.split_ratios=[0, 0, 0]"], "data.split_ratios must have a positive sum"),
        (["model.image.train_crop_scale=[0.9, 0.5]"], "model.image.train_crop_scale must be (m"),
        (["model.image.eval_resize=32"], "model.image.eval_resize must be >= model.image.image_s"),
        (["train.select_metric=[i2t_medr]"], "train.select_metric[0] must be one of"),
        (["model.text.max_length=1"], "model.text.max_length must be >= 2, got 1"),
    ],
)  # fmt: skip
def test_relations_between_fields(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:  # cpu: global_level 0, image_size 64
        apply_overrides(get_preset("cpu"), overrides)
    assert str(err.value).startswith(message), err.value


@pytest.mark.parametrize("name", list_presets())
def test_presets_and_defaults_are_valid(name: str) -> None:
    preset = get_preset(name)  # built, so checked
    assert config_from_dict(config_to_dict(preset)) == preset
    for root in ROOTS:
        assert config_from_dict(config_to_dict(root()), root) == root()


def test_a_config_file_names_the_file_and_the_field(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("preset: tiny\ntrain:\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: train\.batch_size must be >= 1, got 0"):
        load_config(path)
    path.write_text(json.dumps({"model": {"levels": [{"image_stage": 2, "text_layer": 0}]}}))
    with pytest.raises(ConfigError, match=r"model\.levels\[0\]\.text_layer must be >= 1"):
        load_config(path)


def test_selectable_metrics_are_higher_is_better_metrics() -> None:
    from hat.metrics import retrieval_metrics

    names = set(retrieval_metrics(torch.eye(4), captions_per_image=1))
    assert set(SELECTABLE_METRICS) <= names
    assert not any(m.endswith(("medr", "meanr", "tied")) for m in SELECTABLE_METRICS)
