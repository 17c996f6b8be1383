"""Import of the authors' released HAT checkpoints (spec section 6), and the inverse.

The release is a PyTorch Lightning ``.ckpt`` whose ``state_dict`` holds a timm 0.4.x
Swin under ``vit_model.``, a BERT under ``text_transformer.`` and the six level
projections. The mapping onto :class:`~hat.model.HAT`:

- old timm puts patch merging at the END of stage i (``layers.i.downsample``);
  current timm at the START of stage i+1: same weights, same channel order, the
  index moves by one;
- ``vit_model.norm_{s-1}`` (HAT's extra stage norms) -> ``image_tower.stage_norms.{s}``
  for the used stages that are not the last; the last stage uses ``vit_model.norm``;
- ``cross_modal_{image,text}_transform_1`` / ``_2`` / (no suffix) -> the low / mid /
  high level projections, in the model's level order;
- dropped, and accounted for by name: the buffers current timm recomputes
  (``relative_position_index``, ``attn_mask``), the classifier ``head``, the BERT
  ``pooler``, the unused stage norms and the METER heads that HAT never uses.

Anything else, anything missing or any shape that differs fails the import with
every offending name listed. The global-embedding heads of this package are not in
the release; they keep their initialisation (two-stage search needs them trained).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoTokenizer

from hat.checkpoint import CheckpointError, load_state_strict, save_model
from hat.config import ModelConfig, get_preset, minilm_path
from hat.model import HAT

__all__ = [
    "convert_official_state_dict",
    "export_official_state_dict",
    "import_official_checkpoint",
    "read_official_checkpoint",
]

IMAGE = "vit_model."
TEXT = "text_transformer."
# Official projection names per level, low to mid to high.
LEVEL_SUFFIXES = ("_1", "_2", "")
RECOMPUTED_BUFFERS = ("relative_position_index", "attn_mask")
# Parts of the release (and of METER, which HAT builds on) that HAT never uses.
UNUSED_PREFIXES = (
    f"{IMAGE}head.",
    f"{TEXT}pooler.",
    "token_type_embeddings.",
    "cross_modal_image_pooler.",
    "cross_modal_text_pooler.",
    "cross_modal_image_layers.",
    "cross_modal_text_layers.",
    "itm_score.",
    "mlm_score.",
)
NOT_IN_RELEASE = ("image_global.", "text_global.")
_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")
_STAGE_NORM = re.compile(r"^norm_(\d+)\.")


def _projection_names(model: HAT) -> dict[str, str]:
    """Our projection prefixes -> official ones, by level order."""
    if model.num_levels != len(LEVEL_SUFFIXES):
        raise CheckpointError(
            f"the official release has {len(LEVEL_SUFFIXES)} levels; this model has "
            f"{model.num_levels}"
        )
    names = {}
    for k, suffix in enumerate(LEVEL_SUFFIXES):
        names[f"image_tower.projections.{k}."] = f"cross_modal_image_transform{suffix}."
        names[f"text_tower.projections.{k}."] = f"cross_modal_text_transform{suffix}."
    return names


def _image_key(key: str, model: HAT) -> str | None:
    """Our name of an official ``vit_model.`` tensor; None when it is dropped."""
    rest = key[len(IMAGE) :]
    if rest.endswith(RECOMPUTED_BUFFERS):
        return None
    norm = _STAGE_NORM.match(rest)
    if norm:
        stage = int(norm.group(1)) + 1
        if str(stage) in model.image_tower.stage_norms:
            return f"image_tower.stage_norms.{stage}.{rest[norm.end() :]}"
        if stage <= model.image_tower.last_stage:
            return None  # e.g. norm_0: HAT computes stage 1 but never uses it
        return key  # no such stage: reported as unknown
    merge = _DOWNSAMPLE.match(rest)
    if merge:
        rest = f"layers.{int(merge.group(1)) + 1}.downsample.{rest[merge.end() :]}"
    return f"image_tower.backbone.{rest}"


def convert_official_state_dict(state: dict[str, Tensor], model: HAT) -> dict[str, Tensor]:
    """Map an official ``state_dict`` onto ``model``'s names, strictly.

    Raises :class:`~hat.checkpoint.CheckpointError` listing every unknown official
    tensor, every model tensor left unfilled and every shape mismatch.
    """
    projections = {official: ours for ours, official in _projection_names(model).items()}
    own = model.state_dict()
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key.startswith(UNUSED_PREFIXES):
            continue
        if key.startswith(IMAGE):
            ours = _image_key(key, model)
            if ours is None:
                continue
        elif key.startswith(TEXT):
            ours = f"text_tower.encoder.{key[len(TEXT) :]}"
        else:
            prefix = next((p for p in projections if key.startswith(p)), None)
            ours = projections[prefix] + key[len(prefix) :] if prefix else None
        if ours is None or ours not in own:
            unknown.append(key)
            continue
        out[ours] = value
    for key, value in own.items():
        if key.startswith(NOT_IN_RELEASE):
            out[key] = value
    if unknown:
        raise CheckpointError(
            f"official checkpoint has {len(unknown)} tensor(s) this model cannot place: "
            + ", ".join(unknown[:20])
            + (" ..." if len(unknown) > 20 else "")
        )
    return out


def export_official_state_dict(model: HAT) -> dict[str, Tensor]:
    """Our model in the official layout (the inverse of :func:`convert_official_state_dict`),
    including the buffers old timm stored; for round trips and tests."""
    projections = _projection_names(model)
    out: dict[str, Tensor] = {}
    backbone = model.image_tower.backbone
    for name, value in backbone.state_dict().items():
        merge = _DOWNSAMPLE.match(name)
        if merge:
            name = f"layers.{int(merge.group(1)) - 1}.downsample.{name[merge.end() :]}"
        out[IMAGE + name] = value
    for name, value in backbone.named_buffers():
        if name.endswith(RECOMPUTED_BUFFERS) and value is not None:
            out[IMAGE + name] = value
    for stage, norm in model.image_tower.stage_norms.items():
        for name, value in norm.state_dict().items():
            out[f"{IMAGE}norm_{int(stage) - 1}.{name}"] = value
    for name, value in model.text_tower.encoder.state_dict().items():
        out[TEXT + name] = value
    own = model.state_dict()
    for ours, official in projections.items():
        for param in ("weight", "bias"):
            out[official + param] = own[ours + param]
    return {k: v.detach().clone() for k, v in out.items()}


def read_official_checkpoint(path: str | Path, trust: bool = False) -> dict[str, Tensor]:
    """The ``state_dict`` of a release ``.ckpt`` (or a bare state dict file).

    Read with ``weights_only=True``. A file that needs arbitrary unpickling (Lightning
    often stores hyper-parameter objects) is refused unless ``trust`` is set, which
    runs the pickle's code: only for files from a source you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds objects that need arbitrary unpickling, which can run code; "
            f"refused. If you trust the source of this file, pass --trust-checkpoint "
            f"(Python: trust=True). Detail: {str(err).splitlines()[0]}"
        ) from err
    except (RuntimeError, OSError, EOFError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state_dict of tensors")
    return state


def import_official_checkpoint(
    path: str | Path,
    out_dir: str | Path | None = None,
    trust: bool = False,
    model_config: ModelConfig | None = None,
) -> HAT:
    """A model of the ``paper`` preset (or ``model_config``) with the release's weights.

    With ``out_dir``, also writes a model directory. Its tokenizer is read from
    ``model_config.text.tokenizer_path`` (or ``.path``) when set, else from the
    all-MiniLM-L6-v2 directory installed with this package, whose vocabulary is
    exactly bert-base-uncased's, the tokenizer of the release.
    """
    cfg = model_config or get_preset("paper").model
    model = HAT(cfg, pretrained=False)
    state = convert_official_state_dict(read_official_checkpoint(path, trust), model)
    load_state_strict(model, state, str(path))
    model.eval()
    if out_dir is not None:
        from hat.encoders.common import resolve_local_path

        source = resolve_local_path(cfg.text.tokenizer_path or cfg.text.path or minilm_path())
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        save_model(model, out_dir, tokenizer=tokenizer)
    return model
