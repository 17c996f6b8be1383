"""Import of the authors' released HAT checkpoints (spec section 6), and the inverse.

The release is a PyTorch Lightning ``.ckpt`` whose ``state_dict`` holds the timm 0.4.x
Swin of the reference under ``vit_model.``, its BERT under ``text_transformer.`` and
the six level projections. Every tensor of :class:`~hat.model.HAT` has exactly one
official name:

==========================================  ==========================================
this package                                release
==========================================  ==========================================
``image_tower.backbone.layers.{i}.``        ``vit_model.layers.{i - 1}.downsample.``
``downsample.*`` (i = 1..3)                 (old timm merges patches at the END of a
                                            stage, current timm at the START of the
                                            next: same weights, same channel order)
``image_tower.backbone.*`` (the rest)       ``vit_model.*``
``image_tower.stage_norms.{s}.*``           ``vit_model.norm_{s - 1}.*``
``image_tower.projections.{k}.*``           ``cross_modal_image_transform{_1, _2, }.*``
``text_tower.encoder.*``                    ``text_transformer.*``
``text_tower.projections.{k}.*``            ``cross_modal_text_transform{_1, _2, }.*``
==========================================  ==========================================

Level ``k`` is the model's k-th level, lowest first: ``_1`` low, ``_2`` mid, no
suffix high (in the reference: Swin stages 2 / 3 / 4 with BERT layers 4 / 10 / 12;
the stage and layer numbers come from the model config, never from here).

The weight formats of timm 0.4.12 and current timm Swin are the same
(``patch_embed.proj`` conv, ``attn.qkv`` packed as q, k, v then heads,
``relative_position_bias_table`` of shape ``((2W - 1)^2, heads)`` indexed by the same
``relative_position_index``, patch-merging input order ``(0,0), (1,0), (0,1), (1,1)``);
only the patch-merging index moves. Old timm also stored two buffers that current
timm recomputes, ``attn.relative_position_index`` and (shifted blocks)
``attn_mask``; they are not loaded but checked against the recomputed values, so a
checkpoint made for another window size or image size fails instead of loading
into a model that attends differently. ``embeddings.position_ids`` of older
``transformers`` BERTs is checked the same way.

Dropped by name: the unused stage-1 norm ``vit_model.norm_0``, the classifier
``vit_model.head``, the BERT ``pooler`` and the METER heads HAT never uses
(:data:`UNUSED_PREFIXES`). Any other tensor, any model tensor left unfilled and any
shape that differs fails the import with every offending name listed. The global
embedding heads of this package (``image_global``, ``text_global``) are not part of
the release: they keep their initialisation and ``global_trained`` stays false, so
search scores every item exactly until ``hat fit-global`` fits them
(:mod:`hat.global_heads`).
"""

from __future__ import annotations

import pickle
import re
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoTokenizer

from hat.checkpoint import CheckpointError, load_state_strict, save_model
from hat.config import ModelConfig, get_preset, minilm_path
from hat.encoders.common import resolve_local_path
from hat.model import HAT

__all__ = [
    "RECOMPUTED_BUFFERS",
    "UNUSED_PREFIXES",
    "convert_official_state_dict",
    "export_official_state_dict",
    "import_official_checkpoint",
    "official_name",
    "read_official_checkpoint",
]

IMAGE = "vit_model."
TEXT = "text_transformer."
# Official projection suffixes of the three levels, lowest level first.
LEVEL_SUFFIXES = ("_1", "_2", "")
# Tensors of this package that the release does not have.
NOT_IN_RELEASE = ("image_global.", "text_global.", "global_trained")
# Buffers that older libraries saved and current ones recompute (checked, not loaded).
RECOMPUTED_BUFFERS = ("relative_position_index", "attn_mask", "position_ids", "token_type_ids")
# Parts of the release (and of METER, on which the reference is built) that HAT never uses.
UNUSED_PREFIXES = (
    f"{IMAGE}norm_0.",
    f"{IMAGE}head.",
    f"{TEXT}pooler.",
    "token_type_embeddings.",
    "cross_modal_image_layers.",
    "cross_modal_text_layers.",
    "cross_modal_image_pooler.",
    "cross_modal_text_pooler.",
    "itm_score.",
    "mlm_score.",
    "vqa_classifier.",
    "nlvr2_classifier.",
    "snli_classifier.",
    "rank_output.",
)

_RULES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = (
    (
        re.compile(r"image_tower\.backbone\.layers\.(\d+)\.downsample\.(.+)"),
        lambda m: f"{IMAGE}layers.{int(m[1]) - 1}.downsample.{m[2]}",
    ),
    (re.compile(r"image_tower\.backbone\.(.+)"), lambda m: f"{IMAGE}{m[1]}"),
    (
        re.compile(r"image_tower\.stage_norms\.(\d+)\.(.+)"),
        lambda m: f"{IMAGE}norm_{int(m[1]) - 1}.{m[2]}",
    ),
    (
        re.compile(r"(image|text)_tower\.projections\.(\d+)\.(.+)"),
        lambda m: f"cross_modal_{m[1]}_transform{LEVEL_SUFFIXES[int(m[2])]}.{m[3]}",
    ),
    (re.compile(r"text_tower\.encoder\.(.+)"), lambda m: f"{TEXT}{m[1]}"),
)


def official_name(name: str) -> str | None:
    """The release's name of one of our state-dict or buffer names; ``None`` for the
    tensors the release does not have (the global heads)."""
    if name.startswith(NOT_IN_RELEASE):
        return None
    for pattern, rename in _RULES:
        match = pattern.fullmatch(name)
        if match:
            return rename(match)
    raise CheckpointError(f"model tensor {name} has no counterpart in the official layout")


def _check_levels(model: HAT) -> None:
    levels = model.config.levels
    ascending = all(
        a.image_stage < b.image_stage and a.text_layer < b.text_layer
        for a, b in zip(levels, levels[1:])
    )
    if len(levels) != len(LEVEL_SUFFIXES) or not ascending:
        found = ", ".join(f"(stage {lv.image_stage}, layer {lv.text_layer})" for lv in levels)
        raise CheckpointError(
            f"the official release has {len(LEVEL_SUFFIXES)} levels, low to high in both "
            f"towers; this model's levels are {found}"
        )


def _name_tables(model: HAT) -> tuple[dict[str, str], dict[str, str]]:
    """``{official: ours}`` for the model's state (parameters and persistent buffers)
    and for its recomputed (non-persistent) buffers."""
    _check_levels(model)
    own = list(model.state_dict())
    persistent = set(own)
    state: dict[str, str] = {}
    recomputed: dict[str, str] = {}
    for name in own:
        official = official_name(name)
        if official is not None:
            state[official] = name
    for name, _ in model.named_buffers():
        if name not in persistent and name.endswith(RECOMPUTED_BUFFERS):
            recomputed[official_name(name)] = name
    return state, recomputed


def _fail_if_any(source: str, problems: dict[str, list[str]]) -> None:
    """Raise one :class:`CheckpointError` naming every problem, by kind."""
    parts = [
        f"{kind} ({len(items)}): {', '.join(items[:20])}{' ...' if len(items) > 20 else ''}"
        for kind, items in problems.items()
        if items
    ]
    if parts:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(parts))


def convert_official_state_dict(
    state: dict[str, Tensor], model: HAT, source: str = "official checkpoint"
) -> dict[str, Tensor]:
    """Map an official ``state_dict`` onto ``model``'s state-dict names, strictly.

    Returns a state dict that :func:`~hat.checkpoint.load_state_strict` accepts: every
    model tensor from the release, plus the model's own global heads (not in the
    release). Raises :class:`~hat.checkpoint.CheckpointError` naming, by official name,
    every model tensor the release lacks, every release tensor that is neither placed
    nor a known unused part, every shape mismatch and every stored buffer that differs
    from the one the model recomputes; ``source`` names the file in the message.
    """
    names, recomputed = _name_tables(model)
    own = model.state_dict()
    own_buffers = dict(model.named_buffers())
    out = {name: value for name, value in own.items() if name.startswith(NOT_IN_RELEASE)}
    problems: dict[str, list[str]] = {
        "missing": [f"{key} (-> {ours})" for key, ours in names.items() if key not in state],
        "unexpected": [],
        "shape": [],
        "stored buffer differs from the recomputed one": [],
    }
    for key, value in state.items():
        if key in names:
            target = own[names[key]]
            if value.shape == target.shape:
                out[names[key]] = value
            else:
                problems["shape"].append(
                    f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}"
                )
        elif key in recomputed:
            target = own_buffers[recomputed[key]]
            if value.shape != target.shape or not torch.equal(value.to(target), target):
                problems["stored buffer differs from the recomputed one"].append(key)
        elif not key.startswith(UNUSED_PREFIXES):
            problems["unexpected"].append(key)
    _fail_if_any(source, problems)
    return out


def export_official_state_dict(model: HAT) -> dict[str, Tensor]:
    """Our model in the official layout: the inverse of :func:`convert_official_state_dict`.

    Includes the Swin buffers old timm saved (``relative_position_index``,
    ``attn_mask``). The parts of the release that HAT does not use (``norm_0``, the
    BERT pooler) are not produced, so the reference module would load this only
    non-strictly. Tensors are detached copies.
    """
    names, recomputed = _name_tables(model)
    own = model.state_dict()
    own_buffers = dict(model.named_buffers())
    out = {key: own[ours] for key, ours in names.items()}
    out.update(
        {key: own_buffers[ours] for key, ours in recomputed.items() if key.startswith(IMAGE)}
    )
    return {key: value.detach().clone() for key, value in sorted(out.items())}


def _unsafe_globals(path: Path, err: pickle.UnpicklingError) -> list[str]:
    """The globals, beyond torch's allow-list, that a checkpoint's pickle needs."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (non-zip) files: torch names the first one it met
        return re.findall(r"Unsupported global: GLOBAL (\S+)", str(err))


def _unpickling_detail(err: pickle.UnpicklingError) -> str:
    match = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
    return match[1] if match else str(err)


class _Unresolved:
    """Stands in for a pickled object whose class cannot be imported here, e.g. the
    Lightning callback and hyper-parameter classes of a release when Lightning is not
    installed; it accepts whatever the pickle feeds it and is never used."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.pickled = (args, kwargs)

    def __setstate__(self, state: object) -> None:
        self.pickled_state = state

    def __setitem__(self, key: object, value: object) -> None:
        self.__dict__.setdefault("pickled_items", []).append((key, value))

    def append(self, item: object) -> None:
        self.__dict__.setdefault("pickled_items", []).append(item)

    def extend(self, items: list[object]) -> None:
        self.__dict__.setdefault("pickled_items", []).extend(items)


class _LenientUnpickler(pickle.Unpickler):
    """Full unpickling (trusted files only) that replaces classes missing here by
    :class:`_Unresolved` instead of failing."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Unresolved,), {"__module__": module})


_LENIENT_PICKLE = types.ModuleType("hat_lenient_pickle")
_LENIENT_PICKLE.Unpickler = _LenientUnpickler
_LENIENT_PICKLE.load = pickle.load


def read_official_checkpoint(path: str | Path, trust: bool = False) -> dict[str, Tensor]:
    """The ``state_dict`` of a release ``.ckpt`` (a dict with ``state_dict``) or of a
    file holding a bare state dict.

    Read with ``weights_only=True``. Lightning checkpoints often also pickle
    hyper-parameter or callback objects, which only full unpickling can rebuild, and
    full unpickling can run any code: such a file is refused unless ``trust`` is set
    (CLI: ``--trust-checkpoint``), which should be done only for files from a source
    you trust. With ``trust``, objects whose classes are not importable here (Lightning
    need not be installed) are read as inert placeholders; only tensors are returned.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        if trust:
            data = torch.load(
                path, map_location="cpu", weights_only=False, pickle_module=_LENIENT_PICKLE
            )
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        needs = _unsafe_globals(path, err)
        if not needs:
            raise CheckpointError(
                f"cannot read checkpoint {path}: {_unpickling_detail(err)}"
            ) from err
        raise CheckpointError(
            f"{path} holds pickled objects ({', '.join(needs)}) besides tensors; loading "
            f"them runs arbitrary code, so it was refused. Only if you trust the source of "
            f"this file, pass --trust-checkpoint (Python: trust=True)."
        ) from err
    except Exception as err:  # torch raises many types for corrupt or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {err!r}") from err
    if isinstance(data, dict) and "state_dict" in data:
        state = data["state_dict"]
    elif isinstance(data, dict) and data and all(isinstance(v, Tensor) for v in data.values()):
        state = data
    else:
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path} holds no state_dict (found: {found})")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: state_dict is a {type(state).__name__}, not a dict")
    odd = sorted(str(k) for k, v in state.items() if not isinstance(v, Tensor))
    if odd:
        raise CheckpointError(f"{path}: state_dict entries that are not tensors: {odd[:20]}")
    return state


def import_official_checkpoint(
    path: str | Path,
    out_dir: str | Path | None = None,
    trust: bool = False,
    model_config: ModelConfig | None = None,
) -> HAT:
    """A model of the ``paper`` preset (or of ``model_config``) with a release's weights.

    The checkpoint is read by :func:`read_official_checkpoint` (``trust`` as there),
    mapped by :func:`convert_official_state_dict` and loaded strictly; the model is
    returned in eval mode. With ``out_dir``, a model directory is also written (see
    :func:`~hat.checkpoint.save_model`). Its tokenizer is read from
    ``model_config.text.tokenizer_path`` (else ``.path``) when set; otherwise from the
    all-MiniLM-L6-v2 directory installed with this package, whose vocabulary is exactly
    that of bert-base-uncased, the release's tokenizer.
    """
    cfg = model_config or get_preset("paper").model
    model = HAT(cfg, pretrained=False)
    state = read_official_checkpoint(path, trust)
    load_state_strict(model, convert_official_state_dict(state, model, str(path)), str(path))
    model.eval()
    if out_dir is not None:
        source = resolve_local_path(cfg.text.tokenizer_path or cfg.text.path or minilm_path())
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        vocab = model.text_tower.encoder.config.vocab_size
        if len(tokenizer) != vocab:
            raise CheckpointError(
                f"tokenizer {source} has {len(tokenizer)} tokens, the text encoder {vocab}"
            )
        save_model(model, out_dir, tokenizer=tokenizer)
    return model
