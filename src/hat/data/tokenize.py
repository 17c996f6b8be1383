"""Caption tokenisation with the configured text tower's WordPiece tokenizer, offline."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from hat.config import TextTowerConfig
from hat.data.records import DataError

__all__ = ["CaptionTokenizer"]

MIN_LENGTH = 2  # room for [CLS] and [SEP]


class CaptionTokenizer:
    """Captions -> ``input_ids`` / ``attention_mask`` ``(B, L)`` int64.

    ``[CLS]``/``[SEP]`` are included, captions are truncated to ``max_length`` tokens
    and padded to the longest caption of the batch. Token type ids are all zero and
    not returned. Loaded from a local directory (``"minilm"`` names the bundled
    all-MiniLM-L6-v2), never downloaded. Picklable, for DataLoader workers.
    """

    def __init__(self, path: str, max_length: int = 32) -> None:
        from transformers import AutoTokenizer

        from hat.encoders.common import resolve_local_path

        if max_length < MIN_LENGTH:
            raise DataError(f"tokenizer max_length must be at least {MIN_LENGTH}, got {max_length}")
        directory = Path(resolve_local_path(path))
        if not directory.is_dir():
            raise DataError(f"tokenizer directory {directory} not found")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError) as err:
            raise DataError(
                f"tokenizer directory {directory}: cannot load a tokenizer: {err}"
            ) from err
        self.path = directory
        self.max_length = max_length

    @classmethod
    def from_config(cls, text_cfg: TextTowerConfig) -> CaptionTokenizer:
        """The tokenizer of a text tower config (``tokenizer_path``, else ``path``)."""
        path = text_cfg.tokenizer_path or text_cfg.path
        if not path:
            raise DataError("model.text.tokenizer_path (or model.text.path) must be set")
        return cls(path, text_cfg.max_length)

    def __call__(self, captions: Sequence[str]) -> dict[str, Tensor]:
        """``{"input_ids" (B, L), "attention_mask" (B, L)}`` with ``L <= max_length``."""
        batch = self.tokenizer(
            list(captions),
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
