"""Caption tokenisation with the configured text tower's WordPiece tokenizer, offline."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor
from transformers import AutoTokenizer

from hat.config import TextTowerConfig
from hat.data.records import DataError
from hat.encoders.common import resolve_local_path

__all__ = ["CaptionTokenizer"]


class CaptionTokenizer:
    """Captions -> ``input_ids`` / ``attention_mask`` ``(B, L)``, ``[CLS]``/``[SEP]`` included,
    at most ``max_length`` tokens, padded to the longest caption of the batch.

    Loaded from a local directory (never downloaded). Token type ids are all zero and
    not returned.
    """

    def __init__(self, path: str, max_length: int = 32) -> None:
        directory = Path(resolve_local_path(path))
        if not directory.is_dir():
            raise DataError(f"tokenizer directory {directory} not found")
        self.path = directory
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)

    @classmethod
    def from_config(cls, cfg: TextTowerConfig) -> CaptionTokenizer:
        """The tokenizer of a text tower config (``tokenizer_path``, else ``path``)."""
        path = cfg.tokenizer_path or cfg.path
        if not path:
            raise DataError("model.text.tokenizer_path (or model.text.path) must be set")
        return cls(path, cfg.max_length)

    def __call__(self, captions: Sequence[str]) -> dict[str, Tensor]:
        batch = self.tokenizer(
            list(captions),
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
