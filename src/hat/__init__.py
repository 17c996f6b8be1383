"""hat: Hierarchical Alignment Transformers for image-text retrieval.

Quick start::

    import hat
    model = hat.create_model("tiny")
    scores = model(images, input_ids, attention_mask)  # Scores(levels (K, N, M), total (N, M))

    index = hat.Index.open("photos.index")               # built by `hat index build`
    hits = index.search_text("a dog on a beach", k=10)   # [Hit(id, score, level_scores, path)]
"""

import os
import time

# When the package began to load: `hat search --timing` counts cold start from here.
IMPORT_STARTED = time.perf_counter()

from hat.config import ExperimentConfig, ModelConfig, get_preset  # noqa: E402
from hat.model import HAT, ImageFeatures, Scores, TextFeatures, create_model, list_models  # noqa: E402

__all__ = [
    "HAT",
    "ExperimentConfig",
    "Index",
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


def __getattr__(name: str):
    # The index pulls in faiss and SQLite; import it only when asked for.
    if name == "Index":
        from hat.index import Index

        return Index
    raise AttributeError(f"module 'hat' has no attribute {name!r}")
