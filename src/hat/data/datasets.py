"""Torch datasets over image records, and their collators.

Shape legend: ``B`` batch, ``L`` tokens, ``H``/``W`` image height/width. Everything
here is picklable, for DataLoader workers.

Bad images met while iterating (missing, empty, truncated, not an image, too large:
see :func:`~hat.data.transforms.load_image`) raise an :class:`ImageError` naming the
file and the record (``image_id``) and the dataset item. With ``skip_bad=True`` the
dataset logs a warning and returns ``None`` for that item instead; the collators
leave ``None`` items out and report how many they left out under ``"skipped"`` in
the batch (a 0-d int64 tensor), so that a caller can sum and log the count whatever
the number of DataLoader workers. A batch whose items were all bad has ``B = 0``;
callers skip it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from hat.data.records import ImageRecord
from hat.data.tokenize import CaptionTokenizer
from hat.data.transforms import ImageError, load_image

__all__ = [
    "DecodedImages",
    "ImageCaptionsDataset",
    "ImageDataset",
    "PairCollator",
    "PairDataset",
    "image_collate",
]

_log = logging.getLogger(__name__)

PairItem = tuple[Tensor, str, int]
ImageCaptionsItem = tuple[Tensor, tuple[str, ...], int]
ImageItem = tuple[Tensor, int]


class DecodedImages:
    """Decoded images kept in memory, up to ``max_bytes`` of pixels, so that later
    epochs skip decoding them (``data.image_cache_mb``); filled as images are first
    read, first come first kept. Each DataLoader worker process fills its own."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._images: dict[str, Image.Image] = {}

    def __len__(self) -> int:
        return len(self._images)

    def load(self, path: str) -> Image.Image:
        """:func:`~hat.data.transforms.load_image` of ``path``, from memory when kept."""
        image = self._images.get(path)
        if image is None:
            image = load_image(path)
            size = image.width * image.height * len(image.getbands())
            if self.nbytes + size <= self.max_bytes:
                self._images[path] = image
                self.nbytes += size
        return image


def _load(
    record: ImageRecord,
    transform: Callable,
    index: int,
    skip_bad: bool,
    cache: DecodedImages | None = None,
) -> Tensor | None:
    """The transformed image of ``record``; ``None`` for a bad image when ``skip_bad``."""
    try:
        image = load_image(record.path) if cache is None else cache.load(record.path)
    except ImageError as err:
        message = f"{err} (record image_id={record.image_id!r}, dataset item {index})"
        if not skip_bad:
            raise ImageError(message) from err
        _log.warning("skipping a bad image: %s", message)
        return None
    return transform(image)


def _skipped(count: int) -> Tensor:
    return torch.tensor(count, dtype=torch.long)


class ImageDataset(Dataset):
    """One item per image: ``(image (3, H, W), image_index)``, for encoding each image once.

    With ``skip_bad``, an item whose image cannot be read is ``None`` (see the module
    docstring; the batch's ``image_index`` then says which images are present);
    otherwise it raises :class:`ImageError` naming the file and record. ``cache``:
    decoded images to keep (:class:`DecodedImages`), or ``None``.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        transform: Callable,
        skip_bad: bool = False,
        cache: DecodedImages | None = None,
    ) -> None:
        self.records = list(records)
        self.transform = transform
        self.skip_bad = skip_bad
        self.cache = cache

    def __len__(self) -> int:
        return len(self.records)

    def _image(self, record: ImageRecord, index: int) -> Tensor | None:
        """The transformed image of ``record`` for dataset item ``index``."""
        return _load(record, self.transform, index, self.skip_bad, self.cache)

    def __getitem__(self, index: int) -> ImageItem | None:
        image = self._image(self.records[index], index)
        return None if image is None else (image, index)


class ImageCaptionsDataset(ImageDataset):
    """One item per image with every caption of it: ``(image (3, H, W), captions,
    image_index)``, for batches of images that each bring all their captions
    (``train.group_captions``); otherwise as :class:`ImageDataset`."""

    def __getitem__(self, index: int) -> ImageCaptionsItem | None:
        record = self.records[index]
        image = self._image(record, index)
        return None if image is None else (image, tuple(record.captions), index)


class PairDataset(ImageDataset):
    """One item per (image, caption) pair: ``(image (3, H, W), caption, image_index)``;
    otherwise as :class:`ImageDataset`."""

    def __init__(
        self,
        records: Sequence[ImageRecord],
        transform: Callable,
        skip_bad: bool = False,
        cache: DecodedImages | None = None,
    ) -> None:
        super().__init__(records, transform, skip_bad, cache)
        self.pairs = [(i, j) for i, r in enumerate(self.records) for j in range(len(r.captions))]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> PairItem | None:
        image_index, caption_index = self.pairs[index]
        record = self.records[image_index]
        image = self._image(record, index)
        if image is None:
            return None
        return image, record.captions[caption_index], image_index


class PairCollator:
    """Pair or image-captions items -> ``{"images" (B, 3, H, W), "input_ids" (C, L),
    "attention_mask" (C, L), "caption_image" (C,), "image_index" (B,), "skipped" ()}``.

    ``caption_image`` is the batch row of each caption's image: ``arange(B)`` for
    :class:`PairDataset` items (``C == B``), each image's row repeated once per caption
    for :class:`ImageCaptionsDataset` items. ``None`` items are left out and counted.
    """

    def __init__(self, tokenizer: CaptionTokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[PairItem | ImageCaptionsItem | None]) -> dict[str, Tensor]:
        kept = [item for item in items if item is not None]
        skipped = _skipped(len(items) - len(kept))
        if not kept:
            empty_tokens = torch.zeros(0, 0, dtype=torch.long)
            return {
                "images": torch.zeros(0, 3, 0, 0),
                "input_ids": empty_tokens,
                "attention_mask": empty_tokens.clone(),
                "caption_image": torch.zeros(0, dtype=torch.long),
                "image_index": torch.zeros(0, dtype=torch.long),
                "skipped": skipped,
            }
        images, texts, indices = zip(*kept)
        groups = [(t,) if isinstance(t, str) else t for t in texts]
        captions = [c for group in groups for c in group]
        rows = [row for row, group in enumerate(groups) for _ in group]
        tokens = self.tokenizer(captions)
        return {
            "images": torch.stack(images),  # (B, 3, H, W)
            "input_ids": tokens["input_ids"],  # (C, L)
            "attention_mask": tokens["attention_mask"],  # (C, L)
            "caption_image": torch.tensor(rows, dtype=torch.long),  # (C,)
            "image_index": torch.tensor(indices, dtype=torch.long),  # (B,)
            "skipped": skipped,  # ()
        }


def image_collate(items: list[ImageItem | None]) -> dict[str, Tensor]:
    """Image items -> ``{"images" (B, 3, H, W), "image_index" (B,), "skipped" ()}``;
    ``None`` items are left out and counted."""
    kept = [item for item in items if item is not None]
    skipped = _skipped(len(items) - len(kept))
    if not kept:
        return {
            "images": torch.zeros(0, 3, 0, 0),
            "image_index": torch.zeros(0, dtype=torch.long),
            "skipped": skipped,
        }
    images, indices = zip(*kept)
    return {
        "images": torch.stack(images),  # (B, 3, H, W)
        "image_index": torch.tensor(indices, dtype=torch.long),  # (B,)
        "skipped": skipped,  # ()
    }
