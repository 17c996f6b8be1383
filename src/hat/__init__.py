"""hat: Hierarchical Alignment Transformers for image-text retrieval.

Quick start::

    import hat
    model = hat.create_model("tiny")
    scores = model(images, input_ids, attention_mask)  # Scores(levels (K, N, M), total (N, M))
"""

import os

from hat.config import ExperimentConfig, ModelConfig, get_preset
from hat.model import HAT, ImageFeatures, Scores, TextFeatures, create_model, list_models

__all__ = [
    "HAT",
    "ExperimentConfig",
    "ImageFeatures",
    "ModelConfig",
    "Scores",
    "TextFeatures",
    "create_model",
    "get_preset",
    "list_models",
    "load_model",
]

__version__ = "0.1.0"


def load_model(model_dir: str | os.PathLike, device: str = "cpu") -> HAT:
    """Load a model directory (``config.json`` + ``model.safetensors`` + tokenizer)."""
    from hat.checkpoint import load_model as _load

    return _load(model_dir, device)
