"""The on-disk index: manifest, SQLite metadata, feature segments and faiss files.

Layout of an index folder::

    manifest.json          format version, model fingerprint, level shapes (written once)
    index.sqlite           images, captions, segments, meta (WAL mode)
    segments/image-000001/ level1.npy ... levelK.npy (n, T_k, d) float16, global.npy (n, g)
    segments/caption-000002/ the same, plus lengths.npy (n,); levels padded to (n, L, d)
    image.faiss, caption.faiss   global embeddings, ids = SQLite row ids

Writes are crash-safe: a segment is written to a temporary folder, fsynced and
renamed, then ONE SQLite transaction registers it with its rows and bumps the
generation; faiss files are written atomically afterwards and carry the generation
they were built at. A kill at any moment leaves the previous content searchable
(an unregistered segment folder is an orphan the next writer removes; a stale faiss
file is rebuilt in memory by readers). Committed segments never change, so readers
memory-map them while a writer adds new ones. Removing an item deletes its row only:
its tokens stay in their segment (unreferenced) until the index is rebuilt.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from hat.checkpoint import atomic_write

__all__ = [
    "FORMAT_VERSION",
    "IndexFormatError",
    "IndexStore",
    "Kind",
    "Manifest",
    "SegmentArrays",
]

FORMAT_VERSION = 1
FORMAT_NAME = "hat-index"
MANIFEST = "manifest.json"
DATABASE = "index.sqlite"
SEGMENTS = "segments"
WRITER_LOCK = "writer.lock"
KINDS = ("image", "caption")
Kind = Literal["image", "caption"]
STORAGE_DTYPE = np.float16
SQLITE_MAX_INT = 2**63 - 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS segments (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, count INTEGER NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE, sha256 TEXT NOT NULL, bytes INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL,
    added REAL NOT NULL, segment INTEGER NOT NULL, row INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS captions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    text TEXT NOT NULL, image_path TEXT, added REAL NOT NULL,
    segment INTEGER NOT NULL, row INTEGER NOT NULL,
    UNIQUE (text, image_path)
);
"""


class IndexFormatError(RuntimeError):
    """An index folder is missing, damaged, of another format version or another model."""


@dataclass(frozen=True)
class Manifest:
    """What an index was built with; written once when the index is created.

    Attributes:
        model_path: the model given at build time (used when no model is passed).
        fingerprint: :func:`hat.checkpoint.model_fingerprint` of that model.
        tokens: image tokens per level ``T_k`` (a ``grid_k x grid_k`` grid).
        grids: side of each level's grid.
        embed_dim: joint width ``d``.
        global_dim: width ``g`` of the global embeddings.
    """

    model_path: str
    fingerprint: str
    tokens: tuple[int, ...]
    grids: tuple[int, ...]
    embed_dim: int
    global_dim: int
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "model": {"path": self.model_path, "fingerprint": self.fingerprint},
            "levels": [{"tokens": t, "grid": g} for t, g in zip(self.tokens, self.grids)],
            "embed_dim": self.embed_dim,
            "global_dim": self.global_dim,
        }

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise IndexFormatError(
                f"{path.parent} is not a hat index: {path.name} is missing"
            ) from err
        except (OSError, json.JSONDecodeError) as err:
            raise IndexFormatError(f"{path}: cannot read the manifest: {err}") from err
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise IndexFormatError(f"{path}: not a {FORMAT_NAME} manifest")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise IndexFormatError(
                f"{path}: index format version {version}, this hat reads version "
                f"{FORMAT_VERSION}; rebuild the index with `hat index build`"
            )
        try:
            return cls(
                model_path=str(data["model"]["path"]),
                fingerprint=str(data["model"]["fingerprint"]),
                tokens=tuple(int(level["tokens"]) for level in data["levels"]),
                grids=tuple(int(level["grid"]) for level in data["levels"]),
                embed_dim=int(data["embed_dim"]),
                global_dim=int(data["global_dim"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise IndexFormatError(f"{path}: incomplete manifest: missing or bad {err}") from err


@dataclass
class SegmentArrays:
    """Features of the items of one segment.

    Attributes:
        levels: one ``(n, T_k, d)`` array per level (images) or ``(n, L, d)`` (captions).
        global_embedding: ``(n, g)`` float32.
        lengths: ``(n,)`` valid tokens per caption; ``None`` for images.
    """

    levels: list[np.ndarray]
    global_embedding: np.ndarray
    lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return self.global_embedding.shape[0]


def _is_row_id(value: int) -> bool:
    return 0 < value <= SQLITE_MAX_INT


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


class IndexStore:
    """Low-level access to one index folder: metadata, segments, faiss files.

    Open for reading with :meth:`open`; writes go through :meth:`writer` which
    holds an exclusive lock so that only one process writes at a time.
    """

    def __init__(self, root: Path, manifest: Manifest, readonly: bool) -> None:
        self.root = root
        self.manifest = manifest
        self.readonly = readonly
        self._segments: dict[int, SegmentArrays] = {}
        self.db = self._connect()

    # -- opening -----------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path, manifest: Manifest) -> IndexStore:
        """Create an empty index folder (refuses a folder that holds anything else)."""
        root = Path(root)
        if root.exists() and any(root.iterdir()):
            raise IndexFormatError(
                f"{root} exists and is not empty; use `hat index add` to add to an index "
                f"or choose a new folder"
            )
        (root / SEGMENTS).mkdir(parents=True, exist_ok=True)
        store = cls(root, manifest, readonly=False)
        with store.db:
            store.db.executescript(_SCHEMA)
            store.db.execute("INSERT INTO meta VALUES ('generation', '0')")
        text = json.dumps(manifest.to_dict(), indent=2) + "\n"
        atomic_write(root / MANIFEST, lambda p: p.write_text(text))
        return store

    @classmethod
    def open(cls, root: str | Path, readonly: bool = True) -> IndexStore:
        """Open an existing index folder."""
        root = Path(root)
        if not root.is_dir():
            raise IndexFormatError(f"index folder {root} not found")
        manifest = Manifest.read(root / MANIFEST)
        if not (root / DATABASE).is_file():
            raise IndexFormatError(f"{root} is not a hat index: {DATABASE} is missing")
        return cls(root, manifest, readonly)

    def _connect(self) -> sqlite3.Connection:
        path = self.root / DATABASE
        if self.readonly:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        else:
            db = sqlite3.connect(path, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=10000")
        return db

    def close(self) -> None:
        self.db.close()
        self._segments.clear()

    @contextmanager
    def writer(self) -> Iterator[IndexStore]:
        """Exclusive write access; removes orphan segment folders left by a crash."""
        if self.readonly:
            raise IndexFormatError(f"{self.root}: opened read-only")
        with open(self.root / WRITER_LOCK, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as err:
                raise IndexFormatError(
                    f"{self.root}: another process is writing to this index"
                ) from err
            try:
                self._remove_orphans()
                yield self
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _remove_orphans(self) -> None:
        known = {
            self.segment_dir(k, i).name for i, k in self.db.execute("SELECT id, kind FROM segments")
        }
        for entry in (self.root / SEGMENTS).iterdir():
            if entry.name not in known:
                shutil.rmtree(entry, ignore_errors=True)

    # -- metadata ----------------------------------------------------------------
    def generation(self) -> int:
        """Incremented by every committed change."""
        (value,) = self.db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        return int(value)

    def count(self, kind: Kind) -> int:
        return self.db.execute(f"SELECT COUNT(*) FROM {kind}s").fetchone()[0]

    def images_by_path(self) -> dict[str, tuple[int, str, int, int]]:
        """``path -> (id, sha256, bytes, mtime_ns)`` of every indexed image."""
        rows = self.db.execute("SELECT path, id, sha256, bytes, mtime_ns FROM images")
        return {path: (i, sha, size, mtime) for path, i, sha, size, mtime in rows}

    def caption_keys(self) -> set[tuple[str, str | None]]:
        return set(self.db.execute("SELECT text, image_path FROM captions"))

    def locations(self, kind: Kind) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Live items of a kind: ids, segments and rows, as ``(n,)`` int64 arrays."""
        rows = self.db.execute(f"SELECT id, segment, row FROM {kind}s ORDER BY id").fetchall()
        arr = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
        return arr[:, 0], arr[:, 1], arr[:, 2]

    # -- segments ----------------------------------------------------------------
    def segment_dir(self, kind: str, segment: int) -> Path:
        return self.root / SEGMENTS / f"{kind}-{segment:06d}"

    def segment(self, kind: Kind, segment: int) -> SegmentArrays:
        """The memory-mapped arrays of a committed segment (cached)."""
        if segment not in self._segments:
            folder = self.segment_dir(kind, segment)
            try:
                levels = [
                    np.load(folder / f"level{k + 1}.npy", mmap_mode="r")
                    for k in range(len(self.manifest.tokens))
                ]
                glob = np.load(folder / "global.npy", mmap_mode="r")
                lengths = np.load(folder / "lengths.npy") if kind == "caption" else None
            except (OSError, ValueError) as err:
                raise IndexFormatError(f"{folder}: damaged segment: {err}") from err
            self._segments[segment] = SegmentArrays(levels, glob, lengths)
        return self._segments[segment]

    def _write_segment(self, kind: Kind, arrays: SegmentArrays) -> int:
        (last,) = self.db.execute("SELECT COALESCE(MAX(id), 0) FROM segments").fetchone()
        segment = last + 1
        tmp = self.root / SEGMENTS / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        for k, level in enumerate(arrays.levels):
            _save_array(tmp / f"level{k + 1}.npy", level.astype(STORAGE_DTYPE, copy=False))
        _save_array(tmp / "global.npy", arrays.global_embedding.astype(np.float32, copy=False))
        if arrays.lengths is not None:
            _save_array(tmp / "lengths.npy", arrays.lengths.astype(np.int64, copy=False))
        _fsync_dir(tmp)
        final = self.segment_dir(kind, segment)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        return segment

    def commit_images(
        self, rows: Sequence[dict], arrays: SegmentArrays, replaces: Sequence[int] = ()
    ) -> None:
        """Write a segment of images and register it with its rows in one transaction.

        ``rows``: dicts with ``path, sha256, bytes, mtime_ns, width, height``, in the
        segment's row order; ``replaces``: ids of older rows of the same paths.
        """
        segment = self._write_segment("image", arrays)
        now = time.time()
        with self.db:
            self.db.execute(
                "INSERT INTO segments VALUES (?, 'image', ?, ?)", (segment, len(rows), now)
            )
            self.db.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in replaces])
            self.db.executemany(
                "INSERT INTO images (path, sha256, bytes, mtime_ns, width, height, added, "
                "segment, row) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (r["path"], r["sha256"], r["bytes"], r["mtime_ns"], r["width"], r["height"],
                     now, segment, row)
                    for row, r in enumerate(rows)
                ],
            )  # fmt: skip
            self._bump()

    def commit_captions(
        self, keys: Sequence[tuple[str, str | None]], arrays: SegmentArrays
    ) -> None:
        """Write a segment of captions ``(text, image_path)`` and register it."""
        segment = self._write_segment("caption", arrays)
        now = time.time()
        with self.db:
            self.db.execute(
                "INSERT INTO segments VALUES (?, 'caption', ?, ?)", (segment, len(keys), now)
            )
            self.db.executemany(
                "INSERT INTO captions (text, image_path, added, segment, row) "
                "VALUES (?, ?, ?, ?, ?)",
                [(text, image, now, segment, row) for row, (text, image) in enumerate(keys)],
            )
            self._bump()

    def remove_images(self, paths: Sequence[str]) -> int:
        """Forget images (and the captions written for them); returns how many."""
        with self.db:
            removed = 0
            for path in paths:
                removed += self.db.execute("DELETE FROM images WHERE path = ?", (path,)).rowcount
                self.db.execute("DELETE FROM captions WHERE image_path = ?", (path,))
            self._bump()
        return removed

    def touch_images(self, updates: Sequence[tuple[int, int]]) -> None:
        """Record a new ``mtime_ns`` for images whose content did not change."""
        with self.db:
            self.db.executemany("UPDATE images SET mtime_ns = ? WHERE id = ?", updates)

    def _bump(self) -> None:
        self.db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'")

    # -- rows --------------------------------------------------------------------
    def image_rows(self, ids: Sequence[int]) -> dict[int, dict]:
        """Metadata of images by id (ids that cannot exist are simply absent)."""
        ids = [i for i in ids if _is_row_id(i)]
        marks = ",".join("?" * len(ids))
        cur = self.db.execute(
            "SELECT id, path, sha256, bytes, width, height, added FROM images "
            f"WHERE id IN ({marks})",
            list(ids),
        )
        keys = ("id", "path", "sha256", "bytes", "width", "height", "added")
        return {row[0]: dict(zip(keys, row)) for row in cur}

    def caption_rows(self, ids: Sequence[int]) -> dict[int, dict]:
        """Metadata of captions by id (ids that cannot exist are simply absent)."""
        ids = [i for i in ids if _is_row_id(i)]
        marks = ",".join("?" * len(ids))
        cur = self.db.execute(
            f"SELECT id, text, image_path, added FROM captions WHERE id IN ({marks})", list(ids)
        )
        return {row[0]: dict(zip(("id", "text", "image_path", "added"), row)) for row in cur}

    # -- faiss -------------------------------------------------------------------
    def faiss_path(self, kind: Kind) -> Path:
        return self.root / f"{kind}.faiss"

    def write_faiss(self, kind: Kind, index: faiss.Index, generation: int) -> None:
        """Store a global-embedding index built at ``generation``, atomically."""
        data = faiss.serialize_index(index)
        atomic_write(self.faiss_path(kind), lambda p: p.write_bytes(data.tobytes()))
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"{kind}_faiss", str(generation))
            )

    def read_faiss(self, kind: Kind, generation: int) -> faiss.Index | None:
        """The stored index of ``kind`` if it was built at ``generation``, else ``None``."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (f"{kind}_faiss",)).fetchone()
        path = self.faiss_path(kind)
        if row is None or int(row[0]) != generation or not path.is_file():
            return None
        return faiss.deserialize_index(np.frombuffer(path.read_bytes(), dtype=np.uint8))
