"""Dataset readers: image records with their captions and split.

Formats: the Karpathy split files of Flickr30K / MSCOCO / Flickr8K (spec section 4),
and custom data as a folder of images plus a JSONL or CSV captions file. Every bad
record raises :class:`DataError` naming the file and the entry.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hat.config import DataConfig

__all__ = [
    "SPLITS",
    "DataError",
    "ImageRecord",
    "load_records",
    "read_csv",
    "read_jsonl",
    "read_karpathy",
    "select_split",
]

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A data file or record is malformed; the message names the file and the entry."""


@dataclass(frozen=True)
class ImageRecord:
    """One image and its captions.

    Attributes:
        image_id: stable identifier (Karpathy ``imgid`` / COCO id, or the relative path).
        path: the image file.
        captions: the image's captions, stripped, in file order.
        split: ``train``, ``val``, ``test`` (or ``restval`` when kept apart).
    """

    image_id: str
    path: Path
    captions: tuple[str, ...]
    split: str


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError as err:
        raise DataError(f"{path}: file not found") from err
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 (byte {err.start})") from err


def _clean_caption(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: caption must be a string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise DataError(f"{where}: empty caption")
    return text


def read_karpathy(
    json_path: str | Path,
    image_root: str | Path,
    use_restval: bool = True,
    captions_per_image: int = 5,
) -> list[ImageRecord]:
    """Read a Karpathy split file (``dataset_{flickr30k,coco,flickr8k}.json``).

    Image paths are ``image_root/filepath/filename`` when ``filepath`` is present
    (MSCOCO) and ``image_root/filename`` otherwise. ``restval`` images join ``train``
    when ``use_restval``. The first ``captions_per_image`` captions are kept; an image
    with fewer is an error.
    """
    json_path, root = Path(json_path), Path(image_root)
    try:
        data = json.loads(_read_text(json_path))
    except json.JSONDecodeError as err:
        raise DataError(f"{json_path}: invalid JSON at line {err.lineno}: {err.msg}") from err
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f'{json_path}: expected an object with an "images" list')
    records = []
    for index, image in enumerate(data["images"]):
        where = f"{json_path}: images[{index}]"
        if not isinstance(image, dict):
            raise DataError(f"{where}: expected an object")
        for key in ("filename", "split", "sentences"):
            if key not in image:
                raise DataError(f'{where}: missing field "{key}"')
        if not isinstance(image["sentences"], list):
            raise DataError(f'{where}: "sentences" must be a list')
        sentences = image["sentences"][:captions_per_image]
        if len(sentences) < captions_per_image:
            raise DataError(
                f"{where} ({image['filename']}): {len(image['sentences'])} captions, "
                f"need {captions_per_image}"
            )
        captions = []
        for j, sentence in enumerate(sentences):
            if not isinstance(sentence, dict) or "raw" not in sentence:
                raise DataError(f'{where}.sentences[{j}]: missing field "raw"')
            captions.append(_clean_caption(sentence["raw"], f"{where}.sentences[{j}]"))
        split = image["split"]
        if split == "restval" and use_restval:
            split = "train"
        folder = root / image["filepath"] if image.get("filepath") else root
        image_id = str(image.get("cocoid", image.get("imgid", index)))
        records.append(ImageRecord(image_id, folder / image["filename"], tuple(captions), split))
    return records


def _group_custom(
    rows: Iterable[tuple[str, list[str], str | None, str]],
    root: Path,
    captions_per_image: int,
    split_ratios: tuple[float, float, float],
    split_seed: int,
) -> list[ImageRecord]:
    """Group (image, captions, split, where) rows by image, then split when no row says so."""
    captions: dict[str, list[str]] = {}
    splits: dict[str, str | None] = {}
    for image, caps, split, where in rows:
        if image in splits and splits[image] != split:
            raise DataError(f"{where}: image {image} has split {split!r} and {splits[image]!r}")
        splits[image] = split
        captions.setdefault(image, []).extend(caps)
    named = [s for s in splits.values() if s is not None]
    if named and len(named) != len(splits):
        raise DataError("either every image has a split field or none has")
    if not named:
        splits = _seeded_split(list(captions), split_ratios, split_seed)
    return [
        ImageRecord(image, root / image, tuple(caps[:captions_per_image]), str(splits[image]))
        for image, caps in captions.items()
    ]


def _seeded_split(
    images: list[str], ratios: tuple[float, float, float], seed: int
) -> dict[str, str | None]:
    if any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise DataError(f"split ratios must be non-negative with a positive sum, got {ratios}")
    order = sorted(images)
    random.Random(seed).shuffle(order)
    total = sum(ratios)
    n_train = round(len(order) * ratios[0] / total)
    n_val = round(len(order) * ratios[1] / total)
    out: dict[str, str | None] = {}
    for i, image in enumerate(order):
        out[image] = "train" if i < n_train else "val" if i < n_train + n_val else "test"
    return out


def _relative_image(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f'{where}: "image" must be a non-empty relative path')
    path = Path(value.strip())
    if path.is_absolute() or ".." in path.parts:
        raise DataError(f"{where}: image path {value!r} must be relative to the image root")
    return path.as_posix()


def read_jsonl(
    path: str | Path,
    image_root: str | Path,
    captions_per_image: int = 5,
    split_ratios: tuple[float, float, float] = (0.9, 0.05, 0.05),
    split_seed: int = 0,
) -> list[ImageRecord]:
    """Read ``{"image": "rel/path.jpg", "captions": [...], "split": optional}`` lines."""
    path = Path(path)

    def rows():
        for number, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}: line {number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: invalid JSON: {err.msg}") from err
            if not isinstance(item, dict):
                raise DataError(f"{where}: expected an object")
            image = _relative_image(item.get("image"), where)
            caps = item.get("captions")
            if not isinstance(caps, list) or not caps:
                raise DataError(f'{where}: "captions" must be a non-empty list')
            cleaned = [_clean_caption(c, f"{where} captions[{i}]") for i, c in enumerate(caps)]
            split = item.get("split")
            if split is not None and not isinstance(split, str):
                raise DataError(f'{where}: "split" must be a string')
            yield image, cleaned, split, where

    return _group_custom(rows(), Path(image_root), captions_per_image, split_ratios, split_seed)


def read_csv(
    path: str | Path,
    image_root: str | Path,
    captions_per_image: int = 5,
    split_ratios: tuple[float, float, float] = (0.9, 0.05, 0.05),
    split_seed: int = 0,
) -> list[ImageRecord]:
    """Read a CSV with header ``image,caption[,split]``, one row per caption."""
    path = Path(path)
    reader = csv.DictReader(_read_text(path).splitlines())
    fields = reader.fieldnames or []
    missing = [f for f in ("image", "caption") if f not in fields]
    if missing:
        raise DataError(f"{path}: header must name image,caption[,split]; missing {missing}")

    def rows():
        for number, row in enumerate(reader, start=2):
            where = f"{path}: line {number}"
            if None in row or any(v is None for v in row.values()):
                raise DataError(f"{where}: expected {len(fields)} columns")
            image = _relative_image(row["image"], where)
            caption = _clean_caption(row["caption"], where)
            split = row.get("split") or None
            yield image, [caption], split, where

    return _group_custom(rows(), Path(image_root), captions_per_image, split_ratios, split_seed)


def load_records(cfg: DataConfig) -> list[ImageRecord]:
    """Every record of the dataset ``cfg`` describes, all splits."""
    if not cfg.annotations or not cfg.image_root:
        raise DataError("data.annotations and data.image_root must both be set")
    if cfg.format == "karpathy":
        return read_karpathy(
            cfg.annotations, cfg.image_root, cfg.use_restval, cfg.captions_per_image
        )
    reader = read_jsonl if cfg.format == "jsonl" else read_csv
    return reader(
        cfg.annotations, cfg.image_root, cfg.captions_per_image, cfg.split_ratios, cfg.split_seed
    )


def select_split(records: list[ImageRecord], split: str) -> list[ImageRecord]:
    """The records of one split; an empty split is an error."""
    chosen = [r for r in records if r.split == split]
    if not chosen:
        present = sorted({r.split for r in records})
        raise DataError(f"split {split!r} is empty; splits present: {present}")
    return chosen
