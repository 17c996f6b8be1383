"""Torch datasets over image records, and their collators.

Shape legend: ``B`` batch, ``L`` tokens, ``H``/``W`` image height/width. Everything
here is picklable, for DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from hat.data.records import ImageRecord
from hat.data.tokenize import CaptionTokenizer
from hat.data.transforms import load_image

__all__ = ["ImageDataset", "PairCollator", "PairDataset", "image_collate"]


class PairDataset(Dataset):
    """One item per (image, caption) pair: ``(image (3, H, W), caption, image_index)``."""

    def __init__(self, records: Sequence[ImageRecord], transform: Callable) -> None:
        self.records = list(records)
        self.transform = transform
        self.pairs = [(i, j) for i, r in enumerate(self.records) for j in range(len(r.captions))]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, str, int]:
        image_index, caption_index = self.pairs[index]
        record = self.records[image_index]
        image = self.transform(load_image(record.path))
        return image, record.captions[caption_index], image_index


class ImageDataset(Dataset):
    """One item per image: ``(image (3, H, W), image_index)``, for encoding each image once."""

    def __init__(self, records: Sequence[ImageRecord], transform: Callable) -> None:
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(load_image(self.records[index].path)), index


class PairCollator:
    """Pair items -> ``{"images" (B, 3, H, W), "input_ids" (B, L), "attention_mask" (B, L),
    "image_index" (B,)}``."""

    def __init__(self, tokenizer: CaptionTokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[tuple[Tensor, str, int]]) -> dict[str, Tensor]:
        images, captions, indices = zip(*items)
        tokens = self.tokenizer(captions)
        return {
            "images": torch.stack(images),  # (B, 3, H, W)
            "input_ids": tokens["input_ids"],  # (B, L)
            "attention_mask": tokens["attention_mask"],  # (B, L)
            "image_index": torch.tensor(indices, dtype=torch.long),  # (B,)
        }


def image_collate(items: list[tuple[Tensor, int]]) -> dict[str, Tensor]:
    """Image items -> ``{"images" (B, 3, H, W), "image_index" (B,)}``."""
    images, indices = zip(*items)
    return {
        "images": torch.stack(images),  # (B, 3, H, W)
        "image_index": torch.tensor(indices, dtype=torch.long),  # (B,)
    }
