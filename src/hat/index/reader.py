"""The reading stages of indexing: find image files, read, hash and decode them,
and read caption files.

Every unreadable image is reported by path and reason and left out; the rest of
the collection is indexed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from hat.data import DataError, load_image
from hat.data.records import clean_caption, json_object, read_text
from hat.data.transforms import is_image_file

__all__ = [
    "CaptionEntry",
    "ImageFile",
    "ImageFileDataset",
    "collate_image_files",
    "find_images",
    "read_caption_file",
    "sha256_file",
]

HASH_CHUNK = 2**20


@dataclass(frozen=True)
class ImageFile:
    """An image file found on disk: absolute path, size and modification time."""

    path: str
    bytes: int
    mtime_ns: int

    @classmethod
    def stat(cls, path: str | Path) -> ImageFile:
        resolved = Path(path).resolve()
        st = resolved.stat()
        return cls(str(resolved), st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class CaptionEntry:
    """A caption to index, optionally written for an image (absolute path)."""

    text: str
    image_path: str | None = None


def find_images(*roots: str | Path) -> list[ImageFile]:
    """Image files under ``roots`` (folders are searched recursively; files are taken
    as given), sorted by path. Raises :class:`FileNotFoundError` for a missing root."""
    found: dict[str, ImageFile] = {}
    for root in roots:
        root = Path(root)
        if root.is_file():
            candidates = [root]
        elif root.is_dir():
            candidates = [
                Path(folder) / name
                for folder, _, names in os.walk(root, followlinks=False)
                for name in names
            ]
        else:
            raise FileNotFoundError(f"{root}: no such file or folder to index")
        for path in candidates:
            if is_image_file(path):
                item = ImageFile.stat(path)
                found[item.path] = item
    return [found[p] for p in sorted(found)]


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ImageFileDataset(Dataset):
    """Reads, hashes and decodes image files for encoding.

    Each item is a dict with ``file`` (:class:`ImageFile`), ``sha256`` and either
    ``image`` (a normalised ``(3, H, W)`` tensor, with ``width``/``height`` of the
    oriented original) or ``error`` (why it could not be read). Files whose hash is
    in ``known_hashes[path]`` are not decoded: ``unchanged`` is set instead.
    """

    def __init__(
        self,
        files: Sequence[ImageFile],
        transform: Any,
        known_hashes: dict[str, str] | None = None,
    ) -> None:
        self.files = list(files)
        self.transform = transform
        self.known_hashes = known_hashes or {}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        file = self.files[index]
        item: dict[str, Any] = {"file": file}
        try:
            item["sha256"] = sha256_file(file.path)
        except OSError as err:
            item["error"] = f"cannot read: {err}"
            return item
        if self.known_hashes.get(file.path) == item["sha256"]:
            item["unchanged"] = True
            return item
        try:
            image = load_image(file.path)
        except DataError as err:
            item["error"] = str(err)
            return item
        item["width"], item["height"] = image.size
        item["image"] = self.transform(image)
        return item


def collate_image_files(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the decoded images of a batch; keep the others aside by outcome."""
    decoded = [it for it in items if "image" in it]
    return {
        "images": torch.stack([it["image"] for it in decoded]) if decoded else None,
        "decoded": [{k: v for k, v in it.items() if k != "image"} for it in decoded],
        "unchanged": [it for it in items if it.get("unchanged")],
        "errors": [(it["file"].path, it["error"]) for it in items if "error" in it],
    }


def _image_of(value: Any, base: Path, where: str) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: image must be a path string, got {value!r}")
    return str((base / value).resolve())


def read_caption_file(path: str | Path) -> list[CaptionEntry]:
    """Captions to index from a ``.txt`` (one per line), ``.jsonl`` (objects with
    ``caption`` and optional ``image``) or ``.csv`` (columns ``caption`` and optional
    ``image``) file. Image paths are relative to the file's folder. Errors name the
    file and line."""
    path = Path(path)
    text = read_text(path)
    base = path.parent
    if path.suffix == ".jsonl":
        rows = [
            (f"{path}: line {number}", json_object(line, f"{path}: line {number}"))
            for number, line in enumerate(text.split("\n"), start=1)
            if line.strip()
        ]
    elif path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "caption" not in reader.fieldnames:
            raise DataError(f"{path}: the CSV header must name a 'caption' column")
        rows = [(f"{path}: row {number}", row) for number, row in enumerate(reader, start=2)]
    else:
        rows = [
            (f"{path}: line {number}", {"caption": line})
            for number, line in enumerate(text.split("\n"), start=1)
            if line.strip()
        ]
    entries = [
        CaptionEntry(
            " ".join(clean_caption(row.get("caption"), where).split()),
            _image_of(row.get("image"), base, where),
        )
        for where, row in rows
    ]
    if not entries:
        raise DataError(f"{path}: no captions found")
    return entries
