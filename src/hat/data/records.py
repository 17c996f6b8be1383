"""Dataset readers: image records with their captions and split.

Formats: the Karpathy split files of Flickr30K / MSCOCO / Flickr8K (spec section 4),
and custom data as a folder of images plus a JSONL or CSV captions file.

The JSONL caption schema (one object a line, parsed by :func:`parse_caption_line`
for datasets and for ``hat index --captions`` alike)::

    {"image": "rel/path.jpg", "captions": ["a dog", "a brown dog"], "split": "train"}

``"caption": "one caption"`` may stand for a one-caption ``"captions"`` list (one or
the other, not both); ``split`` is optional (datasets: all lines or none; the index
ignores it); ``image`` is required by datasets and optional for the index (captions
without an image); other fields are ignored. Every bad
input raises :class:`DataError` naming the file and the entry (image index, line
number, field). With ``skip_bad`` a bad entry is logged and left out instead, and
the number left out is logged per file; a bad file (missing, UTF-16, not JSON,
wrong header) is always an error.

Bad entries: missing or mistyped fields, an empty or whitespace-only caption, a
caption longer than :data:`MAX_CAPTION_CHARS` characters (most often a CSV quote
left open, which swallows the rows after it), text that is not valid UTF-8, a
malformed JSONL line or CSV row. Captions within the limit are kept whole; the
tokenizer truncates them to the text tower's ``max_length`` tokens. A UTF-8
byte-order mark is accepted.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import math
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hat.config import DataConfig

__all__ = [
    "MAX_CAPTION_CHARS",
    "RESTVAL",
    "SPLITS",
    "CaptionLine",
    "DataError",
    "ImageRecord",
    "clean_caption",
    "json_object",
    "load_records",
    "parse_caption_line",
    "read_csv",
    "read_jsonl",
    "read_karpathy",
    "read_text",
    "select_split",
]

SPLITS = ("train", "val", "test")
RESTVAL = "restval"  # MSCOCO's extra training images in the Karpathy split
DEFAULT_SPLIT_RATIOS = DataConfig.split_ratios  # the one home of the default
CSV_COLUMNS = ("image", "caption")  # required; "split" is optional
MAX_CAPTION_CHARS = 4096  # longer captions are rejected as bad entries
MAX_LOGGED_SKIPS = 20  # bad entries logged one by one per file; the rest only counted
UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
# Bytes that are not UTF-8 decode, with "surrogateescape", to these lone surrogates,
# so that one bad entry does not make the whole file unreadable.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")

_log = logging.getLogger(__name__)
_T = TypeVar("_T")
_R = TypeVar("_R")


class DataError(ValueError):
    """A data file or record is malformed; the message names the file and the entry."""


@dataclass(frozen=True)
class ImageRecord:
    """One image and its captions.

    Attributes:
        image_id: stable identifier (COCO id, Karpathy ``imgid``, or the relative path).
        path: the image file.
        captions: the image's captions, stripped, in file order.
        split: ``train``, ``val``, ``test`` (or ``restval`` when kept apart).
    """

    image_id: str
    path: Path
    captions: tuple[str, ...]
    split: str


def read_text(path: Path) -> str:
    """The file's text; a UTF-8 byte-order mark is dropped.

    Bytes that are not UTF-8 become lone surrogates (``surrogateescape``), which
    :func:`_check_utf8` rejects in the entry that holds them.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise DataError(f"{path}: file not found") from err
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err}") from err
    if data.startswith(UTF16_BOMS):
        raise DataError(f"{path}: the file is UTF-16 text; save it as UTF-8")
    return data.decode("utf-8-sig", errors="surrogateescape")


def _check_utf8(text: str, where: str) -> None:
    """Reject text holding bytes that were not UTF-8 (see :func:`read_text`)."""
    found = _ESCAPED_BYTE.search(text)
    if found:
        raise DataError(f"{where}: not valid UTF-8 (character {found.start() + 1})")


def _keep_good(
    entries: Iterable[_T], parse: Callable[[_T], _R], skip_bad: bool, source: Path
) -> list[_R]:
    """``parse`` each entry; with ``skip_bad`` a :class:`DataError` is skipped.

    The first :data:`MAX_LOGGED_SKIPS` skipped entries of ``source`` are logged as
    warnings, then the number skipped.
    """
    kept, skipped = [], 0
    for entry in entries:
        try:
            kept.append(parse(entry))
        except DataError as err:
            if not skip_bad:
                raise
            skipped += 1
            if skipped <= MAX_LOGGED_SKIPS:
                _log.warning("skipping a bad entry: %s", err)
    if skipped:
        _log.warning("%s: skipped %d bad entries (data.skip_bad)", source, skipped)
    return kept


def _json_ended_early(err: json.JSONDecodeError) -> bool:
    """Whether the JSON text stopped before the document did (a cut file)."""
    return err.pos >= len(err.doc.rstrip()) or err.msg.startswith("Unterminated string")


def json_object(line: str, where: str) -> dict[str, Any]:
    """One JSON object (a JSONL line); errors name ``where``."""
    _check_utf8(line, where)
    try:
        item = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: invalid JSON: {err.msg}") from err
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object, got {type(item).__name__}")
    return item


@dataclass(frozen=True)
class CaptionLine:
    """One object of the JSONL caption schema (module docstring).

    Attributes:
        image: the ``image`` path as written, or ``None`` when absent or empty.
        captions: the captions, stripped, in order (at least one).
        split: the ``split`` field, stripped, or ``None``.
    """

    image: str | None
    captions: tuple[str, ...]
    split: str | None


def parse_caption_line(item: dict[str, Any], where: str) -> CaptionLine:
    """The one parser of the JSONL caption schema: ``item`` is one line's object,
    ``where`` names it in errors (:class:`DataError`)."""
    if ("caption" in item) == ("captions" in item):
        raise DataError(
            f'{where}: expected an object with a "caption" string or a "captions" list '
            f"(not both); got keys {sorted(item)}"
        )
    if "caption" in item:
        captions = (clean_caption(item["caption"], where),)
    else:
        caps = item["captions"]
        if not isinstance(caps, list) or not caps:
            raise DataError(f'{where}: "captions" must be a non-empty list, got {caps!r}')
        captions = tuple(clean_caption(c, f"{where}: captions[{i}]") for i, c in enumerate(caps))
    image = item.get("image")
    if image in (None, ""):
        image = None
    elif not isinstance(image, str):
        raise DataError(f'{where}: "image" must be a path string, got {image!r}')
    else:
        _check_utf8(image, f'{where}: "image"')
    return CaptionLine(image, captions, _optional_split(item.get("split"), where))


def _check_count(captions_per_image: int) -> None:
    if captions_per_image < 1:
        raise DataError(f"captions_per_image must be at least 1, got {captions_per_image}")


def clean_caption(value: Any, where: str) -> str:
    """A caption stripped of surrounding space; non-strings, bad UTF-8, empty and
    overlong captions are errors naming ``where``."""
    if not isinstance(value, str):
        raise DataError(f"{where}: caption must be a string, got {type(value).__name__}")
    _check_utf8(value, where)
    text = value.strip()
    if not text:
        raise DataError(f"{where}: empty caption")
    if len(text) > MAX_CAPTION_CHARS:
        raise DataError(
            f"{where}: caption of {len(text)} characters, limit {MAX_CAPTION_CHARS} "
            "(an unclosed quote in a CSV file?)"
        )
    return text


def _string_field(item: dict[str, Any], key: str, where: str) -> str:
    if key not in item:
        raise DataError(f'{where}: missing field "{key}"')
    value = item[key]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f'{where}: "{key}" must be a non-empty string, got {value!r}')
    _check_utf8(value, f'{where}: "{key}"')
    return value.strip()


def read_karpathy(
    json_path: str | Path,
    image_root: str | Path,
    use_restval: bool = True,
    captions_per_image: int = 5,
    skip_bad: bool = False,
) -> list[ImageRecord]:
    """Read a Karpathy split file (``dataset_{flickr30k,coco,flickr8k}.json``).

    Image paths are ``image_root/filepath/filename`` when ``filepath`` is present
    (MSCOCO) and ``image_root/filename`` otherwise. ``restval`` images join ``train``
    when ``use_restval``. The first ``captions_per_image`` captions are kept; an image
    with fewer is an error.
    """
    json_path, root = Path(json_path), Path(image_root)
    _check_count(captions_per_image)
    try:
        data = json.loads(read_text(json_path))
    except json.JSONDecodeError as err:
        incomplete = " (the file is incomplete)" if _json_ended_early(err) else ""
        raise DataError(
            f"{json_path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}"
            + incomplete
        ) from err
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f'{json_path}: expected an object with an "images" list')

    def parse(entry: tuple[int, Any]) -> ImageRecord:
        index, image = entry
        where = f"{json_path}: images[{index}]"
        if not isinstance(image, dict):
            raise DataError(f"{where}: expected an object, got {type(image).__name__}")
        filename = _string_field(image, "filename", where)
        split = _string_field(image, "split", where)
        if split not in (*SPLITS, RESTVAL):
            raise DataError(f'{where}: unknown split "{split}"; expected {[*SPLITS, RESTVAL]}')
        folder = root
        if "filepath" in image:
            folder = root / _string_field(image, "filepath", where)
        sentences = image.get("sentences")
        if not isinstance(sentences, list):
            raise DataError(f'{where} ({filename}): "sentences" must be a list')
        if len(sentences) < captions_per_image:
            raise DataError(
                f"{where} ({filename}): {len(sentences)} captions, need {captions_per_image}"
            )
        captions = []
        for j, sentence in enumerate(sentences[:captions_per_image]):
            at = f"{where}.sentences[{j}]"
            if not isinstance(sentence, dict) or "raw" not in sentence:
                raise DataError(f'{at}: missing field "raw"')
            captions.append(clean_caption(sentence["raw"], at))
        if split == RESTVAL and use_restval:
            split = "train"
        image_id = str(image.get("cocoid", image.get("imgid", index)))
        return ImageRecord(image_id, folder / filename, tuple(captions), split)

    return _keep_good(enumerate(data["images"]), parse, skip_bad, json_path)


@dataclass(frozen=True)
class _Row:
    """Captions of one image from one line of a custom captions file."""

    image: str  # relative path, POSIX form
    captions: list[str]
    split: str | None
    where: str


def _relative_image(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f'{where}: "image" must be a non-empty relative path, got {value!r}')
    _check_utf8(value, f'{where}: "image"')
    path = Path(value.strip())
    if path.is_absolute() or ".." in path.parts:
        raise DataError(f"{where}: image path {value!r} must be relative to the image root")
    return path.as_posix()


def _optional_split(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise DataError(f'{where}: "split" must be a non-empty string, got {value!r}')
    return value.strip()


def _seeded_split(
    images: list[str], ratios: tuple[float, float, float], seed: int
) -> dict[str, str]:
    """Assign images to train/val/test by ``ratios``, shuffled with ``seed``.

    Independent of file order. Every split with a positive ratio gets an image when
    there are enough images.
    """
    if len(ratios) != len(SPLITS) or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise DataError(
            f"data.split_ratios must be {len(SPLITS)} non-negative numbers with a positive "
            f"sum, got {ratios}"
        )
    n, total = len(images), sum(ratios)
    exact = [n * r / total for r in ratios]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(SPLITS)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    for i, ratio in enumerate(ratios):
        donor = max(range(len(SPLITS)), key=lambda j: counts[j])
        if ratio > 0 and counts[i] == 0 and counts[donor] > 1:
            counts[donor] -= 1
            counts[i] += 1
    order = sorted(images)
    random.Random(seed).shuffle(order)
    labels = [split for split, count in zip(SPLITS, counts) for _ in range(count)]
    return dict(zip(order, labels))


def _group_rows(
    path: Path,
    rows: Iterable[_Row],
    root: Path,
    captions_per_image: int,
    split_ratios: tuple[float, float, float],
    split_seed: int,
    skip_bad: bool,
) -> list[ImageRecord]:
    """Group rows by image (first-appearance order), then split when no row says so."""
    captions: dict[str, list[str]] = {}
    splits: dict[str, str | None] = {}

    def add(row: _Row) -> None:
        if row.image in splits and splits[row.image] != row.split:
            raise DataError(
                f"{row.where}: image {row.image} has split {row.split!r} here "
                f"but {splits[row.image]!r} before"
            )
        splits[row.image] = row.split
        captions.setdefault(row.image, []).extend(row.captions)

    _keep_good(rows, add, skip_bad, path)  # a row contradicting an earlier split is bad
    if not captions:
        raise DataError(f"{path}: no captions")
    named = sum(split is not None for split in splits.values())
    if 0 < named < len(splits):
        raise DataError(
            f"{path}: {named} of {len(splits)} images have a split; either all or none must"
        )
    final = splits if named else _seeded_split(list(captions), split_ratios, split_seed)
    return [
        ImageRecord(image, root / image, tuple(caps[:captions_per_image]), str(final[image]))
        for image, caps in captions.items()
    ]


def read_jsonl(
    path: str | Path,
    image_root: str | Path,
    captions_per_image: int = 5,
    split_ratios: tuple[float, float, float] = DEFAULT_SPLIT_RATIOS,
    split_seed: int = 0,
    skip_bad: bool = False,
) -> list[ImageRecord]:
    """Read a JSONL caption file (the schema of the module docstring; ``image``
    required, relative to ``image_root``).

    Lines of the same image are merged; at most ``captions_per_image`` captions are
    kept per image. Without ``split`` fields, images are split by ``split_ratios``.
    """
    path = Path(path)
    _check_count(captions_per_image)
    lines = [
        (number, line)  # only "\n" ends a line: JSON strings may hold U+2028 and the like
        for number, line in enumerate(read_text(path).split("\n"), start=1)
        if line.strip()
    ]

    def parse(entry: tuple[int, str]) -> _Row:
        number, line = entry
        where = f"{path}: line {number}"
        parsed = parse_caption_line(json_object(line, where), where)
        image = _relative_image(parsed.image, where)
        return _Row(image, list(parsed.captions), parsed.split, where)

    rows = _keep_good(lines, parse, skip_bad, path)
    return _group_rows(
        path, rows, Path(image_root), captions_per_image, split_ratios, split_seed, skip_bad
    )


def read_csv(
    path: str | Path,
    image_root: str | Path,
    captions_per_image: int = 5,
    split_ratios: tuple[float, float, float] = DEFAULT_SPLIT_RATIOS,
    split_seed: int = 0,
    skip_bad: bool = False,
) -> list[ImageRecord]:
    """Read a CSV with header ``image,caption[,split]``, one row per caption.

    Rows of the same image are grouped in file order; at most ``captions_per_image``
    captions are kept per image. Without a ``split`` column (or with it empty
    everywhere), images are split by ``split_ratios``.
    """
    path = Path(path)
    _check_count(captions_per_image)
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    try:
        fields = [f.strip() for f in reader.fieldnames or []]
    except csv.Error as err:
        raise DataError(f"{path}: line 1: malformed CSV header: {err}") from err
    missing = [c for c in CSV_COLUMNS if c not in fields]
    if missing:
        raise DataError(f"{path}: header must be image,caption[,split]; missing {missing}")
    reader.fieldnames = fields

    def numbered_rows() -> Iterator[tuple[int, dict[str, Any] | DataError]]:
        """Rows with their last line number; a row the CSV reader rejects is a
        DataError entry (the reader goes on with the next line)."""
        while True:
            last = reader.line_num
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                yield last + 1, DataError(f"{path}: after line {last}: malformed CSV: {err}")
                continue
            yield reader.line_num, row

    def parse(entry: tuple[int, dict[str, Any] | DataError]) -> _Row:
        number, row = entry
        if isinstance(row, DataError):
            raise row
        where = f"{path}: line {number}"
        if None in row or any(v is None for v in row.values()):
            raise DataError(f"{where}: expected {len(fields)} columns")
        for column, value in row.items():
            _check_utf8(value, f"{where}: column {column}")
        image = _relative_image(row["image"], where)
        caption = clean_caption(row["caption"], where)
        split = (row.get("split") or "").strip() or None
        return _Row(image, [caption], split, where)

    rows = _keep_good(numbered_rows(), parse, skip_bad, path)
    return _group_rows(
        path, rows, Path(image_root), captions_per_image, split_ratios, split_seed, skip_bad
    )


def load_records(cfg: DataConfig) -> list[ImageRecord]:
    """Every record of the dataset ``cfg`` describes, all splits, in file order."""
    if not cfg.annotations or not cfg.image_root:
        raise DataError("data.annotations and data.image_root must both be set")
    if cfg.format == "karpathy":
        return read_karpathy(
            cfg.annotations,
            cfg.image_root,
            use_restval=cfg.use_restval,
            captions_per_image=cfg.captions_per_image,
            skip_bad=cfg.skip_bad,
        )
    reader = read_jsonl if cfg.format == "jsonl" else read_csv
    return reader(
        cfg.annotations,
        cfg.image_root,
        captions_per_image=cfg.captions_per_image,
        split_ratios=cfg.split_ratios,
        split_seed=cfg.split_seed,
        skip_bad=cfg.skip_bad,
    )


def select_split(records: Iterable[ImageRecord], split: str) -> list[ImageRecord]:
    """The records of one split, in order; an empty split is an error."""
    records = list(records)
    chosen = [r for r in records if r.split == split]
    if not chosen:
        present = sorted({r.split for r in records})
        raise DataError(f"split {split!r} is empty; splits present: {present}")
    return chosen
