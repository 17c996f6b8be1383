"""The reading stages of indexing: find image files, read, hash and decode them,
and read caption files.

Every unreadable image is reported by path and reason and left out; the rest of
the collection is indexed. Only regular files are read: a dangling symbolic link, a
link loop, a FIFO, a device or a socket found where an image was expected is
reported (by the path it was found at) and skipped without ever being opened for
reading, and so is a file larger than :data:`MAX_IMAGE_BYTES`.

Paths are made absolute WITHOUT resolving symbolic links (:func:`os.path.abspath`):
an image reached through a link is indexed under the link's path, so removing the
folder it was found in removes it; captions name their images the same way.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch.utils.data import Dataset

from hat.data import DataError, load_image
from hat.data.records import clean_caption, json_object, parse_caption_line, read_text
from hat.data.transforms import DEFAULT_MAX_PIXELS, ImageError, is_image_file

__all__ = [
    "MAX_IMAGE_BYTES",
    "CaptionEntry",
    "ImageFile",
    "ImageFileDataset",
    "collate_image_files",
    "find_images",
    "open_image_file",
    "read_caption_file",
]

HASH_CHUNK = 2**20
# The largest image file read: an image at the pixel limit stored uncompressed at
# 8 bytes a pixel (16-bit RGBA), the largest form load_image accepts.
MAX_IMAGE_BYTES = DEFAULT_MAX_PIXELS * 8
CAPTION_FORMS = (
    'a Karpathy split file ({"images": [{"filename", "filepath"?, "sentences": '
    '[{"raw"}]}]}) or JSON lines of {"image"?, "captions": [...]} (or "caption": "...")'
)


@dataclass(frozen=True)
class ImageFile:
    """An image file found on disk: absolute path (as found, links not resolved),
    size and modification time (of what a link points to).

    ``problem`` is set (and ``bytes``/``mtime_ns`` are -1) for an entry that cannot be
    read as an image file; :class:`ImageFileDataset` reports it instead of reading it.
    """

    path: str
    bytes: int
    mtime_ns: int
    problem: str | None = None

    @classmethod
    def stat(cls, path: str | Path) -> ImageFile:
        """The entry at ``path``; never raises and never opens it."""
        where = os.path.abspath(path)
        try:
            st = os.stat(where)  # follows links
        except OSError as err:
            return cls(where, -1, -1, _stat_problem(where, err))
        problem = _not_regular(st)
        if problem is not None:
            return cls(where, -1, -1, problem)
        return cls(where, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class CaptionEntry:
    """A caption to index, optionally written for an image (absolute path)."""

    text: str
    image_path: str | None = None


def _stat_problem(path: str, err: OSError) -> str:
    if os.path.islink(path):
        if err.errno == errno.ELOOP:
            return "symbolic link loop"
        if err.errno == errno.ENOENT:
            try:
                target = os.readlink(path)
            except OSError:
                target = "a path"
            return f"dangling symbolic link (to {target}, which does not exist)"
    return f"cannot read: {err.strerror or err}"


def _not_regular(st: os.stat_result) -> str | None:
    """Why a file of this status is not read as an image (``None``: it is read)."""
    mode = st.st_mode
    if not stat.S_ISREG(mode):
        kind = (
            "a folder" if stat.S_ISDIR(mode)
            else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode)
            else "a special file"
        )  # fmt: skip
        return f"not a regular file: {kind}"
    if st.st_size > MAX_IMAGE_BYTES:
        return f"file of {st.st_size} bytes, limit {MAX_IMAGE_BYTES}"
    return None


def find_images(*roots: str | Path) -> list[ImageFile]:
    """Image files under ``roots`` (folders are searched recursively, links to folders
    inside them are not followed; files are taken as given), sorted by path.

    Entries that cannot be read (see :class:`ImageFile`) are returned with their
    ``problem``, and so is a folder that cannot be listed. Raises
    :class:`FileNotFoundError` for a missing root."""
    found: dict[str, ImageFile] = {}

    def unlistable(err: OSError) -> None:
        where = os.path.abspath(err.filename or "")
        found[where] = ImageFile(where, -1, -1, f"cannot list folder: {err.strerror or err}")

    for root in roots:
        root = Path(root)
        if root.is_dir():
            candidates = [
                Path(folder) / name
                for folder, _, names in os.walk(root, onerror=unlistable, followlinks=False)
                for name in names
            ]
        elif os.path.lexists(root) and (root.exists() or is_image_file(root)):
            candidates = [root]  # a file, a FIFO, or a broken link named as an image
        else:
            raise FileNotFoundError(f"{root}: no such file or folder to index")
        for path in candidates:
            if is_image_file(path):
                item = ImageFile.stat(path)
                found[item.path] = item
    return [found[p] for p in sorted(found)]


def open_image_file(path: str | Path) -> BinaryIO:
    """``path`` opened for binary reading if it is a regular file of at most
    :data:`MAX_IMAGE_BYTES`. Opened non-blocking and checked on the open descriptor,
    so a FIFO or device put in an image's place is refused and never waited on.

    Raises:
        ImageError: naming the path, for anything else or a file that cannot be opened.
    """
    name = str(path)
    try:
        f = open(path, "rb", opener=_nonblocking)  # noqa: SIM115 -- returned open
    except FileNotFoundError as err:
        raise ImageError(f"{name}: image file not found") from err
    except OSError as err:
        raise ImageError(f"{name}: cannot read image: {err.strerror or err}") from err
    try:
        st = os.fstat(f.fileno())
        problem = _not_regular(st)
        if problem is not None:
            raise ImageError(f"{name}: cannot read image: {problem}")
        if st.st_size == 0:
            raise ImageError(f"{name}: cannot read image: empty file (0 bytes)")
        os.set_blocking(f.fileno(), True)
    except BaseException:
        f.close()
        raise
    return f


def _nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))


def _hash_open(f: BinaryIO) -> str:
    """Hex SHA-256 of an open image file, read to at most :data:`MAX_IMAGE_BYTES`."""
    digest, total = hashlib.sha256(), 0
    for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
        total += len(chunk)
        if total > MAX_IMAGE_BYTES:
            raise ImageError(f"{f.name}: cannot read image: grew past {MAX_IMAGE_BYTES} bytes")
        digest.update(chunk)
    return digest.hexdigest()


class ImageFileDataset(Dataset):
    """Reads, hashes and decodes image files for encoding.

    Each item is a dict with ``file`` (:class:`ImageFile`), ``sha256`` and either
    ``image`` (a normalised ``(3, H, W)`` tensor, with ``width``/``height`` of the
    oriented original) or ``error`` (why it could not be read). Files whose hash is
    in ``known_hashes[path]`` are not decoded: ``unchanged`` is set instead. A file
    with a ``problem`` is not opened: the problem is its error. Each file is opened
    once (:func:`open_image_file`), then hashed and decoded from that one descriptor.
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
        if file.problem is not None:
            item["error"] = file.problem
            return item
        try:
            with open_image_file(file.path) as f:
                item["sha256"] = _hash_open(f)
                if self.known_hashes.get(file.path) == item["sha256"]:
                    item["unchanged"] = True
                    return item
                f.seek(0)
                image = load_image(f)
        except DataError as err:
            item["error"] = str(err)
            return item
        except OSError as err:
            item["error"] = f"cannot read: {err}"
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


# -- caption files ---------------------------------------------------------------------


def _image_of(value: Any, base: Path, where: str) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise DataError(f'{where}: "image" must be a path string, got {value!r}')
    return os.path.abspath(base / value)


def _path_part(image: dict[str, Any], key: str, where: str) -> str:
    value = image.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f'{where}: "{key}" must be a non-empty string, got {value!r}')
    return value.strip()


def _karpathy_entries(data: dict[str, Any], root: Path, path: Path) -> Iterator[CaptionEntry]:
    """Every sentence of every image (all splits) of a Karpathy split file, read as
    :func:`hat.data.records.read_karpathy` reads them (``raw``, image at
    ``root/filepath/filename``), but keeping all of each image's captions."""
    for index, image in enumerate(data["images"]):
        where = f"{path}: images[{index}]"
        if not isinstance(image, dict):
            raise DataError(f"{where}: expected an object, got {type(image).__name__}")
        filename = _path_part(image, "filename", where)
        folder = root / _path_part(image, "filepath", where) if "filepath" in image else root
        sentences = image.get("sentences")
        if not isinstance(sentences, list):
            raise DataError(f'{where} ({filename}): "sentences" must be a list')
        for j, sentence in enumerate(sentences):
            at = f"{where}.sentences[{j}]"
            if not isinstance(sentence, dict) or "raw" not in sentence:
                raise DataError(f'{at}: missing field "raw"')
            text = clean_caption(sentence["raw"], at)
            yield CaptionEntry(" ".join(text.split()), _image_of(filename, folder, at))


def _caption_object(item: dict[str, Any], base: Path, where: str) -> list[CaptionEntry]:
    """The captions of one object of the JSONL caption schema (the datasets' own,
    :func:`hat.data.records.parse_caption_line`; ``split`` is ignored)."""
    line = parse_caption_line(item, where)
    image = _image_of(line.image, base, where)
    return [CaptionEntry(" ".join(t.split()), image) for t in line.captions]


def _json_captions(text: str, path: Path, root: Path) -> list[CaptionEntry]:
    """A Karpathy split file, one caption object, or JSON lines of caption objects."""
    base = path.parent
    try:
        whole, failed = json.loads(text), None
    except json.JSONDecodeError as err:
        whole, failed = None, err  # JSON lines, or not JSON
    if whole is not None:
        if not isinstance(whole, dict):
            raise DataError(
                f"{path}: a JSON {type(whole).__name__} is not a caption file; "
                f"expected {CAPTION_FORMS}"
            )
        if isinstance(whole.get("images"), list):
            return list(_karpathy_entries(whole, root, path))
        if "images" in whole:
            raise DataError(f'{path}: "images" must be a list (a Karpathy split file)')
        return _caption_object(whole, base, f"{path}: line 1")
    entries: list[CaptionEntry] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            where = f"{path}: line {number}"
            try:
                item = json_object(line, where)
            except DataError as err:
                message = str(err)
                if not entries and failed is not None:  # not JSON lines: say where the
                    message = (  # document (a cut Karpathy file, say) stops parsing
                        f"{path}: invalid JSON at line {failed.lineno} column {failed.colno}: "
                        f"{failed.msg}"
                    )
                raise DataError(f"{message}; expected {CAPTION_FORMS}") from err
            entries.extend(_caption_object(item, base, where))
    return entries


def _csv_captions(text: str, path: Path) -> list[CaptionEntry]:
    """A CSV with a ``caption`` column and an optional ``image`` column; a row with
    more or fewer fields than the header, or a quote left open, is an error."""
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        fields = [f.strip() for f in reader.fieldnames or []]
    except csv.Error as err:
        raise DataError(f"{path}: row 1 (the header): malformed CSV: {err}") from err
    if "caption" not in fields:
        raise DataError(f"{path}: the CSV header must name a 'caption' column")
    reader.fieldnames = fields
    entries, number = [], 1
    while True:
        start = reader.reader.line_num + 1
        number += 1
        where = f"{path}: row {number} (line {start})"
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise DataError(f"{where}: malformed CSV (a quote left open?): {err}") from err
        if None in row or any(v is None for v in row.values()):
            given = len(fields) + len(row.get(None) or []) - sum(v is None for v in row.values())
            raise DataError(f"{where}: {given} fields, the header has {len(fields)}")
        entries.append(
            CaptionEntry(
                " ".join(clean_caption(row["caption"], where).split()),
                _image_of(row.get("image"), path.parent, where),
            )
        )
    return entries


def read_caption_file(path: str | Path, image_root: str | Path | None = None) -> list[CaptionEntry]:
    """Captions to index from a file; the format is told by its content.

    - A file whose first non-space character is ``{`` or ``[`` is JSON, of one of two
      forms: a Karpathy split file (one object with an ``images`` list, e.g.
      ``dataset_flickr30k.json``: every ``sentences[*].raw`` of every image, of all
      splits, written for ``image_root/filepath/filename``, or
      ``image_root/filename`` without ``filepath``), or JSON lines of the caption
      schema of the datasets (:mod:`hat.data.records`): ``{"image": optional,
      "captions": [...]}``, or ``"caption": "..."`` for one. Any other JSON is
      refused, whatever the file's extension; so is a ``.json``/``.jsonl`` file that
      is not JSON.
    - A ``.csv`` file: columns ``caption`` and optional ``image``; a row with an extra
      or a missing field, or an unclosed quote, is refused.
    - Anything else: one caption per line.

    Relative image paths are relative to the caption file's folder (``image_root``,
    for Karpathy files, defaults to that folder too); paths are made absolute
    without resolving symbolic links. Errors name the file and the line, row or
    entry."""
    path = Path(path)
    text = read_text(path)
    root = path.parent if image_root is None else Path(image_root)
    head = text.lstrip()[:1]
    if head in ("{", "["):
        entries = _json_captions(text, path, root)
    elif path.suffix.lower() in (".json", ".jsonl"):
        raise DataError(f"{path}: not JSON (it does not start with '{{'); expected {CAPTION_FORMS}")
    elif path.suffix.lower() == ".csv":
        entries = _csv_captions(text, path)
    else:
        entries = [
            CaptionEntry(" ".join(clean_caption(line, f"{path}: line {number}").split()))
            for number, line in enumerate(text.split("\n"), start=1)
            if line.strip()
        ]
    if not entries:
        raise DataError(f"{path}: no captions found")
    return entries
