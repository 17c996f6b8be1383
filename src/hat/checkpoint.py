"""Model directories and training checkpoints.

A *model directory* is what a user ships and loads: ``config.json`` (the full,
self-contained :class:`~hat.config.ModelConfig`), ``model.safetensors`` and the
tokenizer files. :func:`load_model` needs nothing else and no network.

A *training checkpoint* is one ``.pt`` file holding ALL the state of a run
(model, optimizer, scheduler, epoch, step, RNG states, config, best metric) so
that a run resumes exactly. It is written atomically and read with
``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from hat.config import ConfigError, ModelConfig, config_from_dict, config_to_dict

if TYPE_CHECKING:
    from hat.model import HAT

__all__ = [
    "CheckpointError",
    "atomic_write",
    "capture_rng_state",
    "load_model",
    "load_training_checkpoint",
    "model_fingerprint",
    "module_fingerprint",
    "model_from_training_checkpoint",
    "resolve_model",
    "restore_rng_state",
    "save_model",
    "save_training_checkpoint",
]

MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"
# Config fields that say where files lie, not what the model computes.
_LOCATION_FIELDS = (("text", "path"), ("text", "tokenizer_path"), ("image", "pretrained_path"))
# How a file of torch.save begins: a zip archive (the default) or a pickle (legacy).
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")
_MODEL_KINDS = (
    f"give a model directory ({MODEL_CONFIG} and {MODEL_WEIGHTS}), a run folder "
    "(checkpoints/best.pt) or a training checkpoint (.pt)"
)


class CheckpointError(RuntimeError):
    """A model directory or checkpoint is missing, incomplete or does not fit the model."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through a temporary file in the same folder, fsync, then rename.

    A crash at any moment leaves either the previous file or the new one, whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def self_contained_config(model: HAT) -> ModelConfig:
    """The model's config with the text encoder's architecture written out in full,
    so that it no longer depends on the directory it was first loaded from."""
    cfg = model.config
    encoder_config = model.text_tower.encoder.config.to_dict()
    keep = {k: v for k, v in encoder_config.items() if _is_plain(v)}
    text = dataclasses.replace(cfg.text, config=keep, path=None, tokenizer_path=None)
    return dataclasses.replace(cfg, text=text)


def _is_plain(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


def save_model(model: HAT, out_dir: str | Path, tokenizer: Any | None = None) -> Path:
    """Write a model directory: ``config.json``, ``model.safetensors`` and the tokenizer.

    ``tokenizer`` is an HF tokenizer (anything with ``save_pretrained``); when
    omitted, it is loaded from the model config's tokenizer path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        from hat.data import CaptionTokenizer

        tokenizer = CaptionTokenizer.from_config(model.config.text).tokenizer
    tokenizer.save_pretrained(str(out))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(out / MODEL_WEIGHTS, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    config_text = json.dumps(config_to_dict(self_contained_config(model)), indent=2) + "\n"
    atomic_write(out / MODEL_CONFIG, lambda p: p.write_text(config_text))
    return out


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> HAT:
    """Load a model directory written by :func:`save_model`; no network, strict weights."""
    from hat.model import HAT

    root = Path(model_dir)
    for name in (MODEL_CONFIG, MODEL_WEIGHTS):
        if not (root / name).is_file():
            raise CheckpointError(f"{root} is not a HAT model directory: {name} is missing")
    try:
        cfg = config_from_dict(json.loads((root / MODEL_CONFIG).read_text()), ModelConfig)
    except (json.JSONDecodeError, ConfigError) as err:
        raise CheckpointError(f"{root / MODEL_CONFIG}: {err}") from err
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, tokenizer_path=str(root)))
    model = HAT(cfg, pretrained=False)
    load_state_strict(model, load_file(str(root / MODEL_WEIGHTS)), str(root / MODEL_WEIGHTS))
    return model.to(device).eval()


def model_fingerprint(model: HAT) -> str:
    """A SHA-256 hex digest of the model's config and every tensor of its state
    (names, dtypes, shapes and values): equal fingerprints mean equal scores.
    Where the files lie (tokenizer and weight paths) does not count."""
    cfg = config_to_dict(model.config)
    for tower, key in _LOCATION_FIELDS:
        cfg[tower].pop(key, None)
    digest = hashlib.sha256()
    digest.update(json.dumps(cfg, sort_keys=True).encode())
    _hash_state(digest, model)
    return digest.hexdigest()


def module_fingerprint(module: torch.nn.Module) -> str:
    """A SHA-256 hex digest of every tensor of ``module``'s state (names, dtypes, shapes
    and values): equal fingerprints mean equal weights."""
    digest = hashlib.sha256()
    _hash_state(digest, module)
    return digest.hexdigest()


def _hash_state(digest: Any, module: torch.nn.Module) -> None:
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``, failing with every missing, unexpected or
    mis-shaped tensor named."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if own[k].shape != state[k].shape
    )
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:20])}{' ...' if len(items) > 20 else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
        if items
    ]
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA RNG states, as weights-only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically write a training checkpoint (plain containers, tensors and numbers)."""
    atomic_write(path, lambda p: torch.save(state, p))


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        if "weights only load failed" in str(err).lower():
            why = (
                "it holds Python objects, not only tensors and plain values, so hat did not "
                "write it (the authors' release checkpoints are read by `hat import-checkpoint`)"
            )
        else:  # torch's first line says what is wrong; the rest is advice about torch.load
            why = next((line for line in str(err).splitlines() if line.strip()), repr(err))
        raise CheckpointError(f"cannot read training checkpoint {path}: {why}") from err


def model_from_training_checkpoint(path: str | Path) -> tuple[HAT, Any]:
    """The model of a training checkpoint and the run's :class:`ExperimentConfig`."""
    from hat.config import ExperimentConfig
    from hat.model import HAT

    checkpoint = load_training_checkpoint(path)
    try:
        cfg = config_from_dict(checkpoint["config"], ExperimentConfig)
    except (KeyError, ConfigError) as err:
        raise CheckpointError(f"{path}: no valid run config in the checkpoint: {err}") from err
    model = HAT(cfg.model, pretrained=False)
    load_state_strict(model, checkpoint["model"], str(path))
    return model.eval(), cfg


def resolve_model(path: str | Path, which: str = "best") -> HAT:
    """A model from a model directory, a run folder (``checkpoints/{which}.pt``) or a
    training checkpoint file."""
    path = Path(path)
    if (path / MODEL_CONFIG).is_file():
        return load_model(path)
    if path.is_dir():
        ckpt = path / "checkpoints" / f"{which}.pt"
        if not ckpt.is_file():
            raise CheckpointError(
                f"{path} is neither a model directory ({MODEL_CONFIG}) nor a run folder "
                f"with {ckpt.relative_to(path)}"
            )
        path = ckpt
    elif not path.exists():
        raise CheckpointError(f"model {path} not found: {_MODEL_KINDS}")
    elif not _is_torch_file(path):
        inside = (
            f"; {path.parent} is the model directory"
            if path.name in (MODEL_CONFIG, MODEL_WEIGHTS) and (path.parent / MODEL_CONFIG).is_file()
            else ""
        )
        raise CheckpointError(f"{path} is not a training checkpoint: {_MODEL_KINDS}{inside}")
    return model_from_training_checkpoint(path)[0]


def _is_torch_file(path: Path) -> bool:
    """Whether ``path`` begins as the files of ``torch.save`` do."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as err:
        raise CheckpointError(f"cannot read model {path}: {err}") from err
    return head.startswith(_TORCH_MAGIC)
