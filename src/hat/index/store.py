"""The on-disk index: manifest, SQLite metadata, feature segments and faiss files.

Layout of an index folder::

    manifest.json          format version, model fingerprint, level shapes (written once)
    index.sqlite           images, captions, segments, meta (WAL mode)
    segments/image-000001/ level1.npy ... levelK.npy (n, T_k, d) float16, global.npy (n, g)
                           (a level of a trained token codec: levelK.codes.npy (n, T_k, c) uint8)
    segments/caption-000002/ the same, plus lengths.npy (n,); levels padded to (n, L, d)
    image.faiss, caption.faiss   global embeddings, ids = SQLite row ids
    codebook-levelK.faiss  the trained token codec of level K (format 2; see hat.index.codec)

Token codecs (format 2): the manifest names each level's codec. A trained codec is
trained on the first image segment with enough tokens of its level, in the writer that
commits that segment: the codebook is written atomically, then the segment, then ONE
transaction registers both (the codebook's checksum, and meta ``codebook_levelK``: the
first segment coded with it). Image segments from that one on store that level's codes;
earlier ones keep it in float16. Captions are always stored in float16. A codebook that
does not match its checksum makes the index refuse to open (``strict``), and a repair
drops it with every segment coded with it (their codes mean nothing without it: re-add
their images); the next segment large enough trains a new one.

Writes are crash-safe: a segment is written to a temporary folder, fsynced and
renamed, then ONE SQLite transaction registers it with its rows and the size and
SHA-256 of each of its files, and bumps the generation; faiss files are written
atomically afterwards and carry the generation of their kind they were built at and
their own checksum. A kill at any moment leaves the previous content searchable (an
unregistered segment folder or a temporary file is an orphan the next writer
removes; a stale faiss file is rebuilt in memory by readers). Committed segments
never change, so readers memory-map them while a writer adds new ones. Removing an
item deletes its row only: its tokens stay in their segment (unreferenced) until the
index is rebuilt.

Integrity, in the manner of Lucene's per-file checksums and ``git fsck``: every
committed file (segment arrays, faiss files, the manifest, whose text is also kept
in the database) has its size and SHA-256 recorded when it is committed. Opening a
segment checks its files' sizes and ``.npy`` headers against the record and the
manifest; a faiss file is hashed in full when read (it is small); the manifest is
compared with its recorded copy at every open; every writer checks all of this
before it writes anything. :meth:`IndexStore.check` with ``full=True`` (``hat index
verify``) also hashes every segment file and runs SQLite's integrity check, and
:meth:`IndexStore.repair` drops what is damaged. A damaged file is one
:class:`IndexFormatError` naming it and the repairing command, never a traceback.
"""

from __future__ import annotations

import fcntl
import hashlib
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
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from hat._optional import needs_extra
from hat.checkpoint import atomic_write
from hat.config import IndexConfig
from hat.index.codec import CODECS, FLOAT16, CodedLevel, TokenCodec

if TYPE_CHECKING:
    import faiss

__all__ = [
    "FORMAT_VERSION",
    "IndexFormatError",
    "IndexStore",
    "Kind",
    "Manifest",
    "DamagedFile",
    "Problem",
    "SegmentArrays",
    "sha256_file",
]

FORMAT_VERSION = 2
# Versions this hat reads: 1 (before token codecs: every level float16) and 2.
READABLE_VERSIONS = (1, 2)
FORMAT_NAME = "hat-index"
MANIFEST = "manifest.json"
DATABASE = "index.sqlite"
SEGMENTS = "segments"
WRITER_LOCK = "writer.lock"
KINDS = ("image", "caption")
Kind = Literal["image", "caption"]
STORAGE_DTYPE = np.float16
SQLITE_MAX_INT = 2**63 - 1
HASH_CHUNK = 2**20
CODEBOOK = "codebook-level{level}.faiss"
CODEBOOK_GLOB = "codebook-level*.faiss"
CODEBOOK_META = "codebook_level{level}"
CODES_DTYPE = np.uint8
DEFAULT_DIMS_PER_BYTE = IndexConfig.codec_dims_per_byte
TABLES = ("meta", "segments", "images", "captions")

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
CREATE TABLE IF NOT EXISTS files (
    name TEXT PRIMARY KEY, bytes INTEGER NOT NULL, sha256 TEXT NOT NULL
);
"""


class IndexFormatError(RuntimeError):
    """An index folder is missing, damaged, of another format version or another model."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an index, found by :meth:`IndexStore.check`.

    Attributes:
        path: the damaged file or folder.
        what: what is wrong with it.
        part: ``segment`` (its rows are dropped by a repair: re-add their files),
            ``manifest`` (restored from the database's copy), ``faiss`` (derived: any
            writer rewrites it), ``orphan`` (a leftover of an interrupted write: removed),
            ``unchecked`` (a file written before checksums: its checksum is recorded),
            ``codebook`` (a damaged token codebook: dropped, with the segments coded
            with it, which are listed as ``segment`` problems) or ``database`` (cannot
            be repaired: rebuild the index).
        segment: the damaged segment's id (``part == "segment"``).
    """

    path: Path
    what: str
    part: Literal["segment", "manifest", "faiss", "orphan", "unchecked", "database", "codebook"]
    segment: int | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _repair_hint(root: Path) -> str:
    return f"run `hat index verify {root} --repair`, or rebuild with `hat index build`"


class DamagedFile(IndexFormatError):
    """A committed file of an index is missing or damaged: ``path`` and ``what``; the
    message names both and the repairing command."""

    def __init__(self, path: Path, what: str, root: Path) -> None:
        self.path, self.what = path, what
        super().__init__(f"{path}: {what}; {_repair_hint(root)}")


class _Database:
    """The index's SQLite connection: a database error (a damaged, emptied or foreign
    file) is an :class:`IndexFormatError` naming the file."""

    def __init__(self, path: Path, readonly: bool) -> None:
        self.path = path
        try:
            if readonly:
                self.conn = sqlite3.connect(
                    f"file:{path}?mode=ro", uri=True, check_same_thread=False
                )
            else:
                self.conn = sqlite3.connect(path, check_same_thread=False)
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA busy_timeout=10000")
        except sqlite3.DatabaseError as err:
            raise self.error(err) from err

    def error(self, err: Exception) -> IndexFormatError:
        return IndexFormatError(
            f"{self.path}: {err} (the index database is damaged or not a hat index database; "
            f"an index without its database cannot be repaired: rebuild it with "
            f"`hat index build`)"
        )

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Run one statement; returns all its rows."""
        try:
            return self.conn.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as err:
            raise self.error(err) from err

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        """Run one statement per row; returns the number of rows changed."""
        try:
            return self.conn.executemany(sql, rows).rowcount
        except sqlite3.DatabaseError as err:
            raise self.error(err) from err

    def changes(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; returns the number of rows it changed."""
        try:
            return self.conn.execute(sql, params).rowcount
        except sqlite3.DatabaseError as err:
            raise self.error(err) from err

    def executescript(self, script: str) -> None:
        try:
            self.conn.executescript(script)
        except sqlite3.DatabaseError as err:
            raise self.error(err) from err

    def __enter__(self) -> _Database:
        self.conn.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.conn.__exit__(*exc)
        except sqlite3.DatabaseError as err:
            raise self.error(err) from err

    def close(self) -> None:
        self.conn.close()


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
        codecs: the token codec of each level (:data:`hat.index.codec.CODECS`); empty:
            float16 for every level (and always for a format-1 index).
        codec_dims_per_byte: ``pq``'s dims per code byte.
    """

    model_path: str
    fingerprint: str
    tokens: tuple[int, ...]
    grids: tuple[int, ...]
    embed_dim: int
    global_dim: int
    format_version: int = FORMAT_VERSION
    codecs: tuple[str, ...] = ()
    codec_dims_per_byte: int = DEFAULT_DIMS_PER_BYTE

    def __post_init__(self) -> None:
        if not self.codecs:
            object.__setattr__(self, "codecs", (FLOAT16,) * len(self.tokens))

    def to_dict(self) -> dict:
        levels = [{"tokens": t, "grid": g} for t, g in zip(self.tokens, self.grids)]
        data = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "model": {"path": self.model_path, "fingerprint": self.fingerprint},
            "levels": levels,
            "embed_dim": self.embed_dim,
            "global_dim": self.global_dim,
        }
        if self.format_version >= FORMAT_VERSION:
            for level, codec in zip(levels, self.codecs):
                level["codec"] = codec
            data["codec_dims_per_byte"] = self.codec_dims_per_byte
        return data

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
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: Any, path: Path) -> Manifest:
        """The manifest of :meth:`to_dict`'s form; errors name ``path``."""
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise IndexFormatError(f"{path}: not a {FORMAT_NAME} manifest")
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise IndexFormatError(
                f"{path}: index format version {version}, this hat reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}; rebuild the index with "
                f"`hat index build` (or use the hat that wrote it)"
            )
        try:
            levels = data["levels"]
            manifest = cls(
                model_path=str(data["model"]["path"]),
                fingerprint=str(data["model"]["fingerprint"]),
                tokens=tuple(int(level["tokens"]) for level in levels),
                grids=tuple(int(level["grid"]) for level in levels),
                embed_dim=int(data["embed_dim"]),
                global_dim=int(data["global_dim"]),
                format_version=int(version),
                codecs=tuple(str(level.get("codec", FLOAT16)) for level in levels),
                codec_dims_per_byte=int(data.get("codec_dims_per_byte", DEFAULT_DIMS_PER_BYTE)),
            )
            unknown = [c for c in manifest.codecs if c not in CODECS]
            if unknown or len(manifest.codecs) != len(manifest.tokens):
                raise ValueError(f"token codecs {list(manifest.codecs)}")
            return manifest
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


def _recorded_manifest(path: Path) -> str | None:
    """The manifest text recorded in the database at creation (``None`` for an index
    written before it was); raises :class:`IndexFormatError` for a database that is not
    a hat index's."""
    db = _Database(path, readonly=True)
    try:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
        missing = [t for t in TABLES if t not in tables]
        if missing:
            raise db.error(RuntimeError(f"table(s) {', '.join(missing)} missing"))
        rows = db.execute("SELECT value FROM meta WHERE key = 'manifest'")
    finally:
        db.close()
    return rows[0][0] if rows else None


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
        self._codecs: dict[int, TokenCodec] = {}  # level index -> its trained codec
        self.db = _Database(root / DATABASE, readonly)
        self.opening_problems: list[Problem] = []

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
        text = json.dumps(manifest.to_dict(), indent=2) + "\n"
        with store.db:
            store.db.executescript(_SCHEMA)
            store.db.execute("INSERT INTO meta VALUES ('generation', '0')")
            store.db.execute("INSERT INTO meta VALUES ('manifest', ?)", (text,))
        atomic_write(root / MANIFEST, lambda p: p.write_text(text))
        return store

    @classmethod
    def open(cls, root: str | Path, readonly: bool = True, strict: bool = True) -> IndexStore:
        """Open an existing index folder.

        A manifest that is missing, unreadable or not the one recorded at creation is an
        :class:`IndexFormatError`; with ``strict=False`` (for ``verify``) the recorded
        copy is used instead and the problem is kept in :attr:`opening_problems`.
        """
        root = Path(root)
        if not root.is_dir():
            raise IndexFormatError(f"index folder {root} not found")
        if not (root / MANIFEST).exists() and not (root / DATABASE).exists():
            raise IndexFormatError(f"{root} is not a hat index: {MANIFEST} is missing")
        if not (root / DATABASE).is_file():
            raise IndexFormatError(f"{root} is not a hat index: {DATABASE} is missing")
        copy = _recorded_manifest(root / DATABASE)
        problems = []
        try:
            manifest = Manifest.read(root / MANIFEST)
            if copy is not None and (root / MANIFEST).read_text() != copy:
                raise IndexFormatError(
                    f"{root / MANIFEST}: differs from the manifest recorded when the index "
                    "was created"
                )
        except IndexFormatError as err:
            if copy is None:
                raise
            if strict:
                raise IndexFormatError(f"{err}; {_repair_hint(root)}") from err
            problems.append(Problem(root / MANIFEST, str(err), "manifest"))
            manifest = Manifest.from_dict(json.loads(copy), root / DATABASE)
        if not (root / SEGMENTS).is_dir():
            raise IndexFormatError(
                f"{root / SEGMENTS}: not a folder; the index's features are gone: rebuild "
                f"it with `hat index build`"
            )
        store = cls(root, manifest, readonly)
        store.opening_problems = problems
        if strict:
            try:
                for k in range(len(manifest.tokens)):
                    store.level_codec(k)
            except BaseException:
                store.close()
                raise
        return store

    def close(self) -> None:
        self.db.close()
        self._segments.clear()
        self._codecs.clear()

    @contextmanager
    def writer(self) -> Iterator[IndexStore]:
        """Exclusive write access; removes orphan segment folders left by a crash."""
        with self._locked():
            self._remove_orphans()
            problems = [p for p in self.check() if p.part in ("segment", "database", "codebook")]
            if problems:
                listed = "; ".join(map(str, problems[:3]))
                more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
                raise IndexFormatError(
                    f"{self.root}: the index is damaged, nothing was written: {listed}{more}; "
                    f"{_repair_hint(self.root)}"
                )
            yield self

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The exclusive writer lock (``writer.lock``), with the files table in place."""
        if self.readonly:
            raise IndexFormatError(f"{self.root}: opened read-only")
        path = self.root / WRITER_LOCK
        try:
            lock = open(path, "a")
        except OSError as err:
            raise IndexFormatError(
                f"{path}: cannot open the writer lock ({err.strerror}); remove it if it is not "
                "a file (no writer can be running without it)"
            ) from err
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as err:
                raise IndexFormatError(
                    f"{self.root}: another process is writing to this index"
                ) from err
            try:
                with self.db:  # indexes written before checksums lack the table
                    self.db.executescript(_SCHEMA)
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _orphans(self) -> list[Path]:
        """Unregistered segment folders and temporary files left by an interrupted write."""
        known = {self.segment_dir(k, i).name for i, k in self.db.execute(
            "SELECT id, kind FROM segments")}  # fmt: skip
        found = [e for e in (self.root / SEGMENTS).iterdir() if e.name not in known]
        recorded = self._recorded("codebook-")
        found += [p for p in sorted(self.root.glob(CODEBOOK_GLOB)) if p.name not in recorded]
        return found + sorted(self.root.glob(".*.tmp"))

    def _remove_orphans(self) -> None:
        for entry in self._orphans():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    # -- metadata ----------------------------------------------------------------
    def _meta(self, key: str) -> str | None:
        rows = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def generation(self, kind: Kind | None = None) -> int:
        """Incremented by every committed change; of ``kind``: by every change to the
        items of that kind (what its faiss file depends on)."""
        value = self._meta("generation" if kind is None else f"{kind}_generation")
        if value is None and kind is not None:  # an index written before kind generations
            value = self._meta("generation")
        if value is None:
            raise self.db.error(RuntimeError("no generation in table meta"))
        return int(value)

    def count(self, kind: Kind) -> int:
        return self.db.execute(f"SELECT COUNT(*) FROM {kind}s")[0][0]

    def images_by_path(self) -> dict[str, tuple[int, str, int, int]]:
        """``path -> (id, sha256, bytes, mtime_ns)`` of every indexed image."""
        rows = self.db.execute("SELECT path, id, sha256, bytes, mtime_ns FROM images")
        return {path: (i, sha, size, mtime) for path, i, sha, size, mtime in rows}

    def caption_keys(self) -> set[tuple[str, str | None]]:
        return set(self.db.execute("SELECT text, image_path FROM captions"))

    def locations(self, kind: Kind) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Live items of a kind: ids, segments and rows, as ``(n,)`` int64 arrays."""
        rows = self.db.execute(f"SELECT id, segment, row FROM {kind}s ORDER BY id")
        arr = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
        return arr[:, 0], arr[:, 1], arr[:, 2]

    # -- segments ----------------------------------------------------------------
    def segment_dir(self, kind: str, segment: int) -> Path:
        return self.root / SEGMENTS / f"{kind}-{segment:06d}"

    def _recorded(self, prefix: str) -> dict[str, tuple[int, str]]:
        """``name -> (bytes, sha256)`` recorded for the files whose name starts with
        ``prefix`` (none for files written before checksums)."""
        rows = self.db.execute(
            "SELECT name, bytes, sha256 FROM files WHERE substr(name, 1, ?) = ?",
            (len(prefix), prefix),
        ) if self._has_files_table() else []  # fmt: skip
        return {name: (size, sha) for name, size, sha in rows}

    def _has_files_table(self) -> bool:
        return bool(self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'files'"))

    # -- token codecs --------------------------------------------------------------
    def codebook_path(self, k: int) -> Path:
        """The codebook file of level ``k`` (0-based)."""
        return self.root / CODEBOOK.format(level=k + 1)

    def coded_from(self, k: int) -> int | None:
        """The first image segment coded with level ``k``'s codebook (``None``: none yet)."""
        value = self._meta(CODEBOOK_META.format(level=k + 1))
        return None if value is None else int(value)

    def level_codec(self, k: int) -> TokenCodec | None:
        """Level ``k``'s trained codec (cached), ``None`` before it is trained.

        Raises:
            DamagedFile: its codebook does not match the checksum recorded at commit or
                faiss cannot read it.
        """
        if k in self._codecs:
            return self._codecs[k]
        if self.coded_from(k) is None:
            return None
        path = self.codebook_path(k)
        record = self._recorded(path.name).get(path.name)
        try:
            data = path.read_bytes()
        except OSError as err:
            what = f"token codebook unreadable ({err.strerror})"
            raise DamagedFile(path, what, self.root) from err
        if record is None or (len(data), hashlib.sha256(data).hexdigest()) != record:
            what = "token codebook does not match the checksum recorded when it was written"
            raise DamagedFile(path, what, self.root)
        m = self.manifest
        try:
            codec = TokenCodec.deserialize(m.codecs[k], m.embed_dim, m.codec_dims_per_byte, data)
        except (RuntimeError, ValueError) as err:
            last = str(err).strip().splitlines()[-1] if str(err).strip() else "unreadable"
            raise DamagedFile(path, f"faiss cannot read the codebook ({last})", self.root) from err
        self._codecs[k] = codec
        return codec

    def _coded(self, kind: str, segment: int) -> list[bool]:
        """Whether each level of a segment is stored as codes."""
        firsts = [self.coded_from(k) for k in range(len(self.manifest.tokens))]
        return [kind == "image" and f is not None and segment >= f for f in firsts]

    def level_file(self, kind: str, segment: int, k: int) -> str:
        """The file name of level ``k`` of a segment."""
        return f"level{k + 1}.codes.npy" if self._coded(kind, segment)[k] else f"level{k + 1}.npy"

    def _segment_files(self, kind: str, segment: int) -> list[str]:
        levels = range(len(self.manifest.tokens))
        names = [self.level_file(kind, segment, k) for k in levels] + ["global.npy"]
        return names + (["lengths.npy"] if kind == "caption" else [])

    def _load_segment(self, kind: str, segment: int, count: int) -> SegmentArrays:
        """Memory-map a segment's arrays, checking each file's size against the record and
        its header and shape against the manifest; raises :class:`IndexFormatError`."""
        folder = self.segment_dir(kind, segment)
        recorded = self._recorded(f"{SEGMENTS}/{folder.name}/")
        arrays = {}
        for name in self._segment_files(kind, segment):
            path = folder / name
            record = recorded.get(f"{SEGMENTS}/{folder.name}/{name}")
            try:
                size = path.stat().st_size
                if record is not None and size != record[0]:
                    raise ValueError(f"{size} bytes, {record[0]} were committed")
                arrays[name] = np.load(path, mmap_mode="r") if size else None
                if arrays[name] is None:
                    raise ValueError("empty file")
            except (OSError, ValueError) as err:
                why = "missing" if isinstance(err, FileNotFoundError) else str(err)
                raise DamagedFile(path, f"damaged segment file ({why})", self.root) from err
        m = self.manifest
        coded = self._coded(kind, segment)
        names = [self.level_file(kind, segment, k) for k in range(len(m.tokens))]
        levels = [arrays[name] for name in names]
        width = levels[0].shape[1] if levels[0].ndim == 3 else -1
        codecs = [self.level_codec(k) if coded[k] else None for k in range(len(m.tokens))]
        expected = {
            name: (count, m.tokens[k] if kind == "image" else width,
                   m.embed_dim if codecs[k] is None else codecs[k].code_size)
            for k, name in enumerate(names)
        }  # fmt: skip
        expected["global.npy"] = (count, m.global_dim)
        expected["lengths.npy"] = (count,)
        for name, array in arrays.items():
            if array.shape != expected[name]:
                raise DamagedFile(
                    folder / name,
                    f"damaged segment file (shape {array.shape}, expected {expected[name]} "
                    f"from the manifest and the segment's {count} rows)",
                    self.root,
                )
        lengths = np.asarray(arrays["lengths.npy"]) if kind == "caption" else None
        views = [lv if c is None else CodedLevel(lv, c) for lv, c in zip(levels, codecs)]
        return SegmentArrays(views, arrays["global.npy"], lengths)

    def segment(self, kind: Kind, segment: int) -> SegmentArrays:
        """The memory-mapped arrays of a committed segment (cached), checked as
        :meth:`_load_segment` says."""
        if segment not in self._segments:
            rows = self.db.execute("SELECT count FROM segments WHERE id = ?", (segment,))
            if not rows:
                raise DamagedFile(
                    self.segment_dir(kind, segment),
                    f"rows point at segment {segment}, which is not registered",
                    self.root,
                )
            self._segments[segment] = self._load_segment(kind, segment, rows[0][0])
        return self._segments[segment]

    def _train_codecs(self, kind: Kind, segment: int, arrays: SegmentArrays) -> dict:
        """Train, on this segment, each trained codec of an image level that has none
        yet and enough tokens here; writes its codebook file (atomically, not yet
        recorded). Returns ``level -> (codec, record)`` for the commit."""
        trained = {}
        if kind != "image":
            return trained
        m = self.manifest
        for k, name in enumerate(m.codecs):
            if name == FLOAT16 or self.level_codec(k) is not None:
                continue
            codec = TokenCodec(name, m.embed_dim, m.codec_dims_per_byte)
            level = arrays.levels[k]  # (n, T_k, d)
            if not codec.can_train(level):
                continue
            codec.train(np.asarray(level, dtype=np.float32))
            data = codec.serialize()
            path = self.codebook_path(k)
            atomic_write(path, lambda p, d=data: p.write_bytes(d))
            trained[k] = (codec, (path.name, len(data), hashlib.sha256(data).hexdigest()))
        return trained

    def _write_segment(self, kind: Kind, arrays: SegmentArrays) -> tuple[int, list[tuple], dict]:
        """Write a segment's files (training codecs first, see :meth:`_train_codecs`);
        returns its id, the ``(name, bytes, sha256)`` records of its files and the codecs
        trained on it, for the commit."""
        (last,) = self.db.execute("SELECT COALESCE(MAX(id), 0) FROM segments")[0]
        segment = last + 1
        trained = self._train_codecs(kind, segment, arrays)
        tmp = self.root / SEGMENTS / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        for k, level in enumerate(arrays.levels):
            codec = trained[k][0] if k in trained else None
            if codec is None and kind == "image" and self.coded_from(k) is not None:
                codec = self.level_codec(k)
            if codec is None:
                _save_array(tmp / f"level{k + 1}.npy", level.astype(STORAGE_DTYPE, copy=False))
            else:  # (n, T_k, c) uint8
                codes = codec.encode(np.asarray(level, dtype=np.float32)).astype(CODES_DTYPE)
                _save_array(tmp / f"level{k + 1}.codes.npy", codes)
        _save_array(tmp / "global.npy", arrays.global_embedding.astype(np.float32, copy=False))
        if arrays.lengths is not None:
            _save_array(tmp / "lengths.npy", arrays.lengths.astype(np.int64, copy=False))
        _fsync_dir(tmp)
        final = self.segment_dir(kind, segment)
        records = [
            (f"{SEGMENTS}/{final.name}/{f.name}", f.stat().st_size, sha256_file(f))
            for f in sorted(tmp.iterdir())
        ]
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        return segment, records, trained

    def _register(
        self, segment: int, kind: Kind, count: int, records: list[tuple], trained: dict
    ) -> float:
        """Inside a commit's transaction: the segment's row, its files' checksums and
        those of the codebooks trained on it, with the first segment they code."""
        now = time.time()
        self.db.execute("INSERT INTO segments VALUES (?, ?, ?, ?)", (segment, kind, count, now))
        records = records + [record for _, record in trained.values()]
        self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?)", records)
        for k in trained:
            key = CODEBOOK_META.format(level=k + 1)
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, str(segment)))
        return now

    def commit_images(
        self, rows: Sequence[dict], arrays: SegmentArrays, replaces: Sequence[int] = ()
    ) -> None:
        """Write a segment of images and register it with its rows in one transaction.

        ``rows``: dicts with ``path, sha256, bytes, mtime_ns, width, height``, in the
        segment's row order; ``replaces``: ids of older rows of the same paths.
        """
        segment, records, trained = self._write_segment("image", arrays)
        with self.db:
            now = self._register(segment, "image", len(rows), records, trained)
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
            self._bump("image")
        self._codecs.update({k: codec for k, (codec, _) in trained.items()})

    def commit_captions(
        self, keys: Sequence[tuple[str, str | None]], arrays: SegmentArrays
    ) -> None:
        """Write a segment of captions ``(text, image_path)`` and register it."""
        segment, records, trained = self._write_segment("caption", arrays)
        with self.db:
            now = self._register(segment, "caption", len(keys), records, trained)
            self.db.executemany(
                "INSERT INTO captions (text, image_path, added, segment, row) "
                "VALUES (?, ?, ?, ?, ?)",
                [(text, image, now, segment, row) for row, (text, image) in enumerate(keys)],
            )
            self._bump("caption")

    def remove_images(self, paths: Sequence[str]) -> int:
        """Forget images (and the captions written for them); returns how many."""
        with self.db:
            removed = 0
            for path in paths:
                removed += self.db.changes("DELETE FROM images WHERE path = ?", (path,))
                self.db.execute("DELETE FROM captions WHERE image_path = ?", (path,))
            self._bump("image", "caption")
        return removed

    def remove_captions(self, keys: Sequence[tuple[str, str | None]] | None) -> int:
        """Forget captions by ``(text, image_path)`` (``None``: every caption); returns
        how many."""
        with self.db:
            if keys is None:
                removed = self.db.changes("DELETE FROM captions")
            else:
                removed = sum(
                    self.db.changes(
                        "DELETE FROM captions WHERE text = ? AND image_path IS ?", (text, image)
                    )
                    for text, image in keys
                )
            self._bump("caption")
        return removed

    def touch_images(self, updates: Sequence[tuple[int, int]]) -> None:
        """Record a new ``mtime_ns`` for images whose content did not change."""
        with self.db:
            self.db.executemany("UPDATE images SET mtime_ns = ? WHERE id = ?", updates)

    def _bump(self, *kinds: Kind) -> None:
        """Inside a transaction: a new generation, and one for each kind changed."""
        for key in ("generation", *(f"{kind}_generation" for kind in kinds)):
            value = self._meta(key)
            if value is None:  # an index written before kind generations: start at the total
                value = self._meta("generation")
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, str(int(value) + 1)))

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

    def write_faiss(self, kind: Kind, index: faiss.Index) -> None:
        """Store a global-embedding index of the live items of ``kind``, atomically, with
        the kind's current generation and its checksum (call it under :meth:`writer`)."""
        with needs_extra("index"):
            import faiss

        data = faiss.serialize_index(index).tobytes()
        generation = self.generation(kind)
        path = self.faiss_path(kind)
        atomic_write(path, lambda p: p.write_bytes(data))
        digest = hashlib.sha256(data).hexdigest()
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"{kind}_faiss", str(generation))
            )
            self.db.execute(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?)", (path.name, len(data), digest)
            )

    def read_faiss(self, kind: Kind) -> faiss.Index | None:
        """The stored index of ``kind`` if it is current and whole, else ``None`` (the
        caller rebuilds it in memory: it is derived from the segments).

        Raises:
            IndexFormatError: the file does not match the checksum recorded when it was
                written, or faiss cannot read it.
        """
        built = self._meta(f"{kind}_faiss")
        path = self.faiss_path(kind)
        if built is None or int(built) != self.generation(kind) or not path.is_file():
            return None
        data = path.read_bytes()
        record = self._recorded(path.name).get(path.name)
        if record is not None and (len(data), hashlib.sha256(data).hexdigest()) != record:
            what = "does not match the checksum recorded when it was written (damaged, or "
            raise DamagedFile(path, what + "another index's file)", self.root)
        with needs_extra("index"):
            import faiss
        try:
            return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as err:
            last = str(err).strip().splitlines()[-1] if str(err).strip() else "unreadable"
            raise DamagedFile(path, f"faiss cannot read it ({last})", self.root) from err

    # -- integrity ---------------------------------------------------------------
    def check(self, full: bool = False) -> list[Problem]:
        """What is wrong with the index, cheaply: every segment's files against their
        recorded sizes, headers and the manifest's shapes, the global embeddings (what a
        writer rebuilds faiss from) hashed, rows of unregistered segments, the faiss files
        hashed. ``full`` also hashes every segment file, runs SQLite's integrity check,
        and lists leftovers of interrupted writes and files without a checksum."""
        problems = list(self.opening_problems)
        if full:
            report = [r[0] for r in self.db.execute("PRAGMA integrity_check")]
            if report != ["ok"]:
                problems.append(Problem(self.root / DATABASE, "; ".join(report[:5]), "database"))
        recorded = self._recorded("")
        for k in range(len(self.manifest.tokens)):
            try:
                self.level_codec(k)
            except DamagedFile as err:  # its segments are listed below, as damaged
                problems.append(Problem(err.path, err.what, "codebook"))
        segments = self.db.execute("SELECT id, kind, count FROM segments ORDER BY id")
        for segment, kind, count in segments:
            folder = self.segment_dir(kind, segment)
            try:
                self._load_segment(kind, segment, count)
                hashed = self._segment_files(kind, segment) if full else ["global.npy"]
                for name in hashed:
                    record = recorded.get(f"{SEGMENTS}/{folder.name}/{name}")
                    if record is None and full:
                        what = "no checksum recorded (written by an older hat)"
                        problems.append(Problem(folder / name, what, "unchecked"))
                    elif record is not None and sha256_file(folder / name) != record[1]:
                        what = "does not match the checksum recorded at commit"
                        raise DamagedFile(folder / name, what, self.root)
            except DamagedFile as err:
                problems.append(Problem(folder, f"{err.path.name}: {err.what}", "segment", segment))
        for kind in KINDS:
            dangling = self.db.execute(
                f"SELECT DISTINCT segment FROM {kind}s WHERE segment NOT IN "
                "(SELECT id FROM segments)"
            )
            for (segment,) in dangling:
                problems.append(Problem(self.segment_dir(kind, segment),
                                        "rows point at a segment that is not registered",
                                        "segment", segment))  # fmt: skip
            try:
                self.read_faiss(kind)
            except DamagedFile as err:
                problems.append(Problem(err.path, err.what, "faiss"))
            if full and self.faiss_path(kind).is_file() and self.count(kind):
                built = self._meta(f"{kind}_faiss")
                if built is None or int(built) != self.generation(kind):
                    problems.append(Problem(self.faiss_path(kind), "stale (older than the "
                                            "items it indexes)", "faiss"))  # fmt: skip
        if full:
            problems += [Problem(p, "left by an interrupted write", "orphan")
                         for p in self._orphans()]  # fmt: skip
        return problems

    @contextmanager
    def repairing(self) -> Iterator[IndexStore]:
        """The writer lock WITHOUT the integrity check that :meth:`writer` makes: for
        :meth:`repair`."""
        with self._locked():
            yield self

    def repair(self, problems: Sequence[Problem]) -> list[str]:
        """Under :meth:`repairing`: drop damaged segments with their rows, restore the
        manifest from its recorded copy, remove leftovers, record checksums of files
        written before checksums. Faiss files are left to the caller to rebuild.
        Returns the image paths whose rows were dropped (add them again to re-encode)."""
        dropped: list[str] = []
        for problem in problems:
            if problem.part == "codebook":
                self._drop_codebook(problem.path)
            elif problem.part == "manifest":
                text = _recorded_manifest(self.root / DATABASE)
                if text is not None:
                    atomic_write(self.root / MANIFEST, lambda p, t=text: p.write_text(t))
            elif problem.part == "orphan":
                if problem.path.is_dir() and not problem.path.is_symlink():
                    shutil.rmtree(problem.path, ignore_errors=True)
                else:
                    problem.path.unlink(missing_ok=True)
            elif problem.part == "unchecked":
                name = str(problem.path.relative_to(self.root))
                with self.db:
                    self.db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?)", (
                        name, problem.path.stat().st_size, sha256_file(problem.path)))  # fmt: skip
        segments = sorted({p.segment for p in problems if p.part == "segment"})
        with self.db:
            for segment in segments:
                paths = self.db.execute("SELECT path FROM images WHERE segment = ?", (segment,))
                dropped += [path for (path,) in paths]
                for kind in KINDS:
                    self.db.execute(f"DELETE FROM {kind}s WHERE segment = ?", (segment,))
                    prefix = f"{SEGMENTS}/{self.segment_dir(kind, segment).name}/"
                    self.db.execute("DELETE FROM files WHERE substr(name, 1, ?) = ?",
                                    (len(prefix), prefix))  # fmt: skip
                self.db.execute("DELETE FROM segments WHERE id = ?", (segment,))
            if segments:
                self._bump("image", "caption")
        for segment in segments:
            self._segments.pop(segment, None)
            for kind in KINDS:
                shutil.rmtree(self.segment_dir(kind, segment), ignore_errors=True)
        return dropped

    def _drop_codebook(self, path: Path) -> None:
        """Forget a damaged codebook: its record, its meta key and its file (the segments
        coded with it are dropped as damaged segments). The next image segment with enough
        tokens trains a new one."""
        level = next(k for k in range(len(self.manifest.tokens)) if self.codebook_path(k) == path)
        with self.db:
            self.db.execute("DELETE FROM files WHERE name = ?", (path.name,))
            key = CODEBOOK_META.format(level=level + 1)
            self.db.execute("DELETE FROM meta WHERE key = ?", (key,))
        self._codecs.pop(level, None)
        path.unlink(missing_ok=True)
