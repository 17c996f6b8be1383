"""hat: Hierarchical Alignment Transformers for image-text retrieval.

Quick start::

    import hat
    model = hat.create_model("tiny")
    scores = model(images, input_ids, attention_mask)  # Scores(levels (K, N, M), total (N, M))

    index = hat.Index.open("photos.index")               # built by `hat index build`
    hits = index.search_text("a dog on a beach", k=10)   # [Hit(id, score, level_scores, path)]

The names below load their modules at first use (PEP 562): ``import hat``, and
``import hat.config`` or ``hat.metrics``, import neither timm nor transformers.
"""

from __future__ import annotations

import importlib
import os
import time
from typing import TYPE_CHECKING, Any

# When the package began to load: `hat search --timing` counts cold start from here.
IMPORT_STARTED = time.perf_counter()

if TYPE_CHECKING:
    from hat.config import ExperimentConfig, ModelConfig, get_preset
    from hat.encoder import Encoder
    from hat.features import ImageFeatures, Scores, TextFeatures
    from hat.index import Index
    from hat.model import HAT, create_model, list_models
    from hat.scorer import Scorer
    from hat.search import FeatureGallery, Searcher

__all__ = [
    "HAT",
    "Encoder",
    "ExperimentConfig",
    "FeatureGallery",
    "Index",
    "ImageFeatures",
    "ModelConfig",
    "Scorer",
    "Scores",
    "Searcher",
    "TextFeatures",
    "create_model",
    "get_preset",
    "list_models",
    "load_model",
]

__version__ = "0.1.0"

# Each public name that is loaded lazily, and the module that defines it.
_LAZY = {
    "ExperimentConfig": "hat.config",
    "ModelConfig": "hat.config",
    "get_preset": "hat.config",
    "Index": "hat.index",
    "Encoder": "hat.encoder",
    "FeatureGallery": "hat.search",
    "HAT": "hat.model",
    "ImageFeatures": "hat.features",
    "Scorer": "hat.scorer",
    "Scores": "hat.features",
    "Searcher": "hat.search",
    "TextFeatures": "hat.features",
    "create_model": "hat.model",
    "list_models": "hat.model",
}


def load_model(model_dir: str | os.PathLike, device: str = "cpu") -> HAT:
    """Load a model directory (``config.json`` + ``model.safetensors`` + tokenizer)."""
    from hat.checkpoint import load_model as _load

    return _load(model_dir, device)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'hat' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
