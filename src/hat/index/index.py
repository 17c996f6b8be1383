"""An index of an image collection searchable by text and by image with HAT.

:class:`Index` composes the parts: the store (:mod:`hat.index.store`: segments,
SQLite, faiss files, checksums), the :class:`~hat.index.builder.IndexBuilder` that
writes it (reader -> Encoder -> writer), and the one
:class:`~hat.search.Searcher` that reads it through a
:class:`~hat.index.gallery.SegmentGallery` snapshot. Search is two-stage by
default: shortlist by global embedding (faiss), then rank the shortlist with HAT's
exact score on the encoder's device; ``exhaustive=True`` scores every item, and so
does a model whose global heads were never trained (``HAT.has_trained_global``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hat.config import IndexConfig, RetrievalConfig
from hat.encoder import Encoder, load_any_model
from hat.features import ImageFeatures, TextFeatures
from hat.index.builder import AddReport, IndexBuilder
from hat.index.codec import check_dims_per_byte, level_codecs
from hat.index.gallery import SegmentGallery
from hat.index.reader import CaptionEntry
from hat.index.store import IndexFormatError, IndexStore, Kind, Manifest, Problem
from hat.search import MISSING, Searcher

if TYPE_CHECKING:
    from PIL import Image

    from hat.data import CaptionTokenizer
    from hat.model import HAT

__all__ = ["AddReport", "Hit", "Index", "IndexFormatError", "VerifyReport"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    """One search result.

    Attributes:
        id: the item's id in the index (images and captions are numbered apart).
        kind: ``image`` or ``caption``.
        score: the ranking score (HAT's summed score for text-image pairs).
        level_scores: the per-level scores that sum to ``score``.
        path: the image file (an image hit, or the image a caption was written for).
        text: the caption (caption hits).
    """

    id: int
    kind: Kind
    score: float
    level_scores: tuple[float, ...]
    path: str | None = None
    text: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "score": self.score,
            "level_scores": list(self.level_scores),
            "path": self.path,
            "text": self.text,
        }


@dataclass
class VerifyReport:
    """What ``verify`` found and, with ``repair``, what it did.

    Attributes:
        root: the index folder.
        problems: everything found wrong (:class:`~hat.index.store.Problem`).
        repaired: whether a repair ran.
        dropped: image files whose damaged rows a repair dropped: ``hat index add``
            them again to re-encode them.
    """

    root: Path
    problems: list[Problem] = field(default_factory=list)
    repaired: bool = False
    dropped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing wrong that is still there: no problem found, or every one repaired
        (a damaged database cannot be)."""
        if self.repaired:
            return not any(p.part == "database" for p in self.problems)
        return not self.problems

    def summary(self) -> str:
        if not self.problems:
            return "ok: every file matches its checksum"
        lines = [f"{len(self.problems)} problem(s):"]
        lines += [f"  {p}" for p in self.problems]
        if self.repaired:
            lines.append(
                f"repaired: dropped {len(self.dropped)} image row(s) of damaged segments "
                "(add their files again to re-encode them), removed leftovers, rewrote the "
                "faiss files" + ("" if self.ok else "; the database cannot be repaired: "
                                 "rebuild the index with `hat index build`")
            )  # fmt: skip
        else:
            lines.append(f"repair with `hat index verify {self.root} --repair`")
        return "\n".join(lines)


class Index:
    """A folder of indexed images (and optional captions) plus the model that encoded them.

    Open with :meth:`open` (search; ``writable=True`` to add or remove) or create
    with :meth:`create`. The model's fingerprint must equal the one in the index's
    manifest: features of another model would give meaningless scores.
    """

    def __init__(
        self,
        store: IndexStore,
        model: HAT | None,
        cfg: IndexConfig,
        device: torch.device,
        retrieval: RetrievalConfig = RetrievalConfig(),
    ) -> None:
        self.store = store
        self.cfg = cfg
        self.device = device
        self.retrieval = retrieval
        self._encoder = None if model is None else Encoder(model, device)
        self._searcher: Searcher | None = None
        self.builder = IndexBuilder(store, lambda: self.encoder, cfg)
        self._lock = threading.RLock()
        self._generation = -1
        self._galleries: dict[str, SegmentGallery] = {}
        self._warned_untrained = False

    @property
    def encoder(self) -> Encoder:
        """The :class:`~hat.encoder.Encoder` of the model the index was built with;
        loaded (and its fingerprint checked) on first use, so that ``info`` and
        ``remove`` never load it."""
        from hat.checkpoint import CheckpointError, resolve_model

        with self._lock:
            if self._encoder is None:
                source = self.store.manifest.model_path
                try:
                    model = resolve_model(source)
                except CheckpointError as err:
                    raise CheckpointError(
                        f"{err} ({source} is the model path recorded in the manifest of index "
                        f"{self.store.root}; if the model moved, give its place with --model)"
                    ) from err
                self._encoder = Encoder(_verified(model, self.store, source), self.device)
            return self._encoder

    @property
    def model(self) -> HAT:
        """The model the index was built with (see :attr:`encoder`)."""
        return self.encoder.model

    @property
    def tokenizer(self) -> CaptionTokenizer:
        """The caption tokenizer of :attr:`model`'s text tower."""
        return self.encoder.tokenizer

    @property
    def searcher(self) -> Searcher:
        """The :class:`~hat.search.Searcher` on the encoder's device."""
        with self._lock:
            if self._searcher is None:
                self._searcher = Searcher(self.encoder.scorer(self.retrieval), self.cfg.shortlist)
            return self._searcher

    # -- opening -----------------------------------------------------------------
    @classmethod
    def create(
        cls,
        root: str | Path,
        model_path: str | Path,
        cfg: IndexConfig = IndexConfig(),
        device: str | torch.device = "cpu",
    ) -> Index:
        """A new, empty index in ``root`` for the model at ``model_path``, storing image
        tokens with ``cfg.token_codecs`` (:mod:`hat.index.codec`).

        Raises:
            ValueError: a codec name that is not known, a number of codecs that is
                neither one nor the model's levels, or a ``cfg.codec_dims_per_byte`` that
                does not divide the model's joint width (for ``pq``).
        """
        from hat.checkpoint import model_fingerprint, resolve_model

        model = resolve_model(model_path)
        manifest = Manifest(
            model_path=str(Path(model_path).resolve()),
            fingerprint=model_fingerprint(model),
            tokens=tuple(g * g for g in model.image_tower.grid_sizes),
            grids=tuple(model.image_tower.grid_sizes),
            embed_dim=model.config.embed_dim,
            global_dim=model.config.global_dim,
            codecs=level_codecs(cfg.token_codecs, len(model.image_tower.grid_sizes)),
            codec_dims_per_byte=cfg.codec_dims_per_byte,
        )
        for codec in manifest.codecs:
            check_dims_per_byte(codec, manifest.embed_dim, manifest.codec_dims_per_byte)
        return cls(IndexStore.create(root, manifest), model, cfg, torch.device(device))

    @classmethod
    def open(
        cls,
        root: str | Path,
        model: str | Path | HAT | None = None,
        cfg: IndexConfig = IndexConfig(),
        device: str | torch.device = "cpu",
        writable: bool = False,
        strict: bool = True,
        retrieval: RetrievalConfig = RetrievalConfig(),
    ) -> Index:
        """Open an index; ``model`` (a path or a loaded :class:`HAT`) defaults to the
        model the index was built with, which is then loaded at its first use. A given
        model is checked now: one of another fingerprint is refused. ``strict=False``
        opens an index whose manifest is damaged from the copy its database keeps (for
        :meth:`verify`). ``retrieval`` sets how search scores (compute dtype, memory
        budget)."""
        store = IndexStore.open(root, readonly=not writable, strict=strict)
        loaded = None
        if model is not None:
            try:
                where = str(model) if isinstance(model, str | Path) else "the given model"
                loaded = _verified(load_any_model(model), store, where)
            except BaseException:
                store.close()
                raise
        return cls(store, loaded, cfg, torch.device(device), retrieval)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.store.count("image")

    def info(self) -> dict[str, Any]:
        """Counts, model, level shapes, storage size and what the cheap integrity check
        finds wrong (``problems``; ``hat index verify`` checks every byte)."""
        manifest = self.store.manifest
        size = sum(p.stat().st_size for p in self.store.root.rglob("*") if p.is_file())
        return {
            "path": str(self.store.root),
            "images": self.store.count("image"),
            "captions": self.store.count("caption"),
            "model": manifest.model_path,
            "fingerprint": manifest.fingerprint,
            "levels": [{"tokens": t, "grid": g} for t, g in zip(manifest.tokens, manifest.grids)],
            "embed_dim": manifest.embed_dim,
            "format_version": manifest.format_version,
            "token_codecs": list(manifest.codecs),
            "bytes_on_disk": size,
            "generation": self.store.generation(),
            "problems": [str(p) for p in self.store.check()],
        }

    def verify(self, repair: bool = False) -> VerifyReport:
        """Check every file of the index against its recorded checksum, the database's
        integrity and the manifest (:meth:`IndexStore.check` ``full``); with ``repair``,
        drop damaged segments and their rows, restore the manifest, remove leftovers of
        interrupted writes and rewrite both faiss files. Needs the index opened
        writable for ``repair``."""
        report = VerifyReport(self.store.root, self.store.check(full=True))
        if not repair or not report.problems:
            return report
        with self._lock, self.store.repairing():
            report.dropped = self.store.repair(report.problems)
            if not any(p.part == "database" for p in report.problems):
                for kind in ("image", "caption"):
                    self.builder.rebuild_faiss(kind)
            self._galleries, self._generation = {}, -1
        report.repaired = True
        return report

    # -- writing (the builder) ----------------------------------------------------
    def add_images(self, *roots: str | Path, progress: bool = True) -> AddReport:
        """Index the new or changed image files under ``roots``.

        A file whose path, size and modification time are already indexed is
        skipped without reading; one whose content hash is unchanged is only
        re-stamped; others are (re-)encoded. Unreadable files are reported and left
        out.

        Under ``torchrun`` every process calls this with the same ``roots``: each
        ``commit_every`` files are dealt out to the ranks in whole batches, each rank
        reads and encodes its share, and rank 0 (the only one that opened the index
        writable) gathers and commits them in file order, giving the same index as
        one process.
        """
        return self.builder.add_images(*roots, progress=progress)

    def add_captions(
        self, captions: str | Path | Iterable[CaptionEntry], progress: bool = True
    ) -> int:
        """Index captions (a caption file, see :func:`read_caption_file`, or entries)
        not indexed yet; returns how many were added."""
        return self.builder.add_captions(captions, progress)

    def remove(self, paths: Sequence[str | Path]) -> int:
        """Remove images by path (files or folders: everything indexed under them) and
        the captions written for any image under them (indexed or not); returns the
        number of images removed.

        A path is matched as images are indexed: made absolute without resolving
        symbolic links (so removing a folder removes the images found through links
        in it, and removing a link leaves its target). A path under which nothing is
        indexed is matched resolved instead (indexes written before)."""
        return self.builder.remove(paths)

    def remove_captions(
        self,
        captions: str | Path | Iterable[CaptionEntry] | None = None,
        all_captions: bool = False,
    ) -> int:
        """Remove captions: those of a caption file (read as :meth:`add_captions` reads
        it: same text and image) or given entries, or with ``all_captions`` every one.
        Captions not in the index are ignored; returns the number removed."""
        return self.builder.remove_captions(captions, all_captions)

    # -- reading -----------------------------------------------------------------
    def gallery(self, kind: Kind) -> SegmentGallery:
        """The live items of ``kind``; a new snapshot when another process committed."""
        with self._lock:
            generation = self.store.generation()
            if generation != self._generation:
                self._galleries = {}
                self._generation = generation
            if kind not in self._galleries:
                self._galleries[kind] = SegmentGallery(self.store, kind, self.cfg)
            return self._galleries[kind]

    def image_features(self, image_id: int) -> ImageFeatures:
        """The stored tokens of one indexed image; :class:`KeyError` for an unknown id."""
        gallery = self.gallery("image")
        if image_id not in gallery.position:
            raise KeyError(f"no image with id {image_id} in the index")
        return gallery.features(torch.tensor([gallery.position[image_id]]))

    # -- searching ---------------------------------------------------------------
    def search_text(self, query: str, k: int = 10, exhaustive: bool = False) -> list[Hit]:
        """The ``k`` indexed images that best match ``query`` under HAT's score."""
        if not query.strip():
            raise ValueError("the text query is empty")
        return self._search(self.encoder.encode_captions([query]), "image", k, exhaustive)

    def search_image(
        self, image: str | Path | Image.Image, k: int = 10, exhaustive: bool = False
    ) -> list[Hit]:
        """The ``k`` indexed captions that best match ``image`` under HAT's score, or,
        when the index holds no captions, the ``k`` most similar indexed images (the
        per-level cosine of mean-pooled tokens, summed)."""
        from PIL import Image

        from hat.data import load_image

        if not isinstance(image, Image.Image):
            image = load_image(image)
        query = self.encoder.encode_image(image)
        kind = "caption" if self.store.count("caption") else "image"
        return self._search(query, kind, k, exhaustive)

    def _search(
        self, query: ImageFeatures | TextFeatures, kind: Kind, k: int, exhaustive: bool
    ) -> list[Hit]:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        gallery = self.gallery(kind)
        if not len(gallery):
            return []
        if not exhaustive and not self.model.has_trained_global:
            if not self._warned_untrained:
                log.warning(
                    "model %s has untrained global heads (imported, or trained without "
                    "train.global_loss_weight): scoring every item exactly; `hat fit-global` "
                    "fits them for two-stage search", self.store.manifest.model_path,
                )  # fmt: skip
                self._warned_untrained = True
            exhaustive = True
        ranked = self.searcher.search(query, gallery, k, exhaustive)
        found = [
            (int(gallery.ids[p]), j)
            for j, p in enumerate(ranked.positions[0].tolist())
            if p != MISSING
        ]
        rows = (self.store.image_rows if kind == "image" else self.store.caption_rows)(
            [item for item, _ in found]
        )
        hits = []
        for item_id, j in found:
            row = rows.get(item_id)
            if row is None:  # removed by a writer since this snapshot
                continue
            hits.append(
                Hit(
                    id=item_id,
                    kind=kind,
                    score=float(ranked.total[0, j]),
                    level_scores=tuple(ranked.levels[:, 0, j].tolist()),
                    path=row.get("path", row.get("image_path")),
                    text=row.get("text"),
                )
            )
        return hits

    # -- images --------------------------------------------------------------------
    def image_path(self, image_id: int) -> str:
        """The file of an indexed image; :class:`KeyError` for an unknown id."""
        row = self.store.image_rows([image_id]).get(image_id)
        if row is None:
            raise KeyError(f"no image with id {image_id} in the index")
        return row["path"]


def _verified(model: HAT, store: IndexStore, where: str) -> HAT:
    """``model`` if its fingerprint is the one the index was built with."""
    from hat.checkpoint import model_fingerprint

    fingerprint = model_fingerprint(model)
    manifest = store.manifest
    if fingerprint != manifest.fingerprint:
        raise IndexFormatError(
            f"index {store.root} was built with model {manifest.model_path} "
            f"(fingerprint {manifest.fingerprint[:12]}), but {where} has fingerprint "
            f"{fingerprint[:12]}: its features would not match; open the index with the "
            f"model it was built with or rebuild it with `hat index build`"
        )
    return model
