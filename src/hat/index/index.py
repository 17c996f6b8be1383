"""An index of an image collection searchable by text and by image with HAT.

Pipeline (``add_images``): find files -> read, hash and decode (DataLoader
workers) -> encode in batches -> write segments (one committed transaction per
``commit_every`` images) -> rebuild the global-embedding faiss index.
Search is two-stage by default: shortlist by global embedding (faiss), then rank
the shortlist with HAT's exact score; ``exhaustive=True`` scores every item, and so
does a model whose global heads were never trained (``HAT.has_trained_global``).

Shape legend: ``n`` items, ``T_k`` tokens of level ``k``, ``L`` words, ``d`` joint
width, ``g`` global width, ``K`` levels.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hat import align, distributed
from hat.checkpoint import model_fingerprint, resolve_model
from hat.config import IndexConfig
from hat.data import CaptionTokenizer, DataError, build_transform, load_image
from hat.index.reader import (
    CaptionEntry,
    ImageFile,
    ImageFileDataset,
    collate_image_files,
    find_images,
    read_caption_file,
)
from hat.index.store import (
    DamagedFile,
    IndexFormatError,
    IndexStore,
    Kind,
    Manifest,
    Problem,
    SegmentArrays,
)

if TYPE_CHECKING:
    from hat.explain import Explanation
    from hat.model import HAT, ImageFeatures, TextFeatures

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
class AddReport:
    """What an ``add`` did: counts, and each file left out with the reason."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    captions: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        text = (
            f"{self.added} image(s) added, {self.updated} updated, {self.unchanged} unchanged, "
            f"{self.captions} caption(s) added, {len(self.skipped)} skipped"
        )
        return text + "".join(f"\n  skipped {p}: {why}" for p, why in self.skipped)


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


@dataclass
class _Snapshot:
    """The searchable state of one kind at one generation."""

    ids: np.ndarray  # (n,) int64
    segments: np.ndarray  # (n,) int64
    rows: np.ndarray  # (n,) int64
    position: dict[int, int]
    faiss: Any | None


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
    ) -> None:
        self.store = store
        self.cfg = cfg
        self.device = device
        self._model = None if model is None else model.to(device).eval()
        self._tokenizer: CaptionTokenizer | None = None
        self._lock = threading.RLock()
        self._generation = -1
        self._snapshots: dict[str, _Snapshot] = {}
        self._warned_untrained = False

    @property
    def model(self) -> HAT:
        """The model the index was built with; loaded (and its fingerprint checked) on
        first use, so that ``info`` and ``remove`` never load it."""
        from hat.checkpoint import CheckpointError

        with self._lock:
            if self._model is None:
                source = self.store.manifest.model_path
                try:
                    model = resolve_model(source)
                except CheckpointError as err:
                    raise CheckpointError(
                        f"{err} ({source} is the model path recorded in the manifest of index "
                        f"{self.store.root}; if the model moved, give its place with --model)"
                    ) from err
                self._model = _verified(model, self.store, source)
                self._model.to(self.device).eval()
            return self._model

    @property
    def tokenizer(self) -> CaptionTokenizer:
        """The caption tokenizer of :attr:`model`'s text tower."""
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = CaptionTokenizer.from_config(self.model.config.text)
            return self._tokenizer

    # -- opening -----------------------------------------------------------------
    @classmethod
    def create(
        cls,
        root: str | Path,
        model_path: str | Path,
        cfg: IndexConfig = IndexConfig(),
        device: str | torch.device = "cpu",
    ) -> Index:
        """A new, empty index in ``root`` for the model at ``model_path``."""
        model = resolve_model(model_path)
        manifest = Manifest(
            model_path=str(Path(model_path).resolve()),
            fingerprint=model_fingerprint(model),
            tokens=tuple(g * g for g in model.image_tower.grid_sizes),
            grids=tuple(model.image_tower.grid_sizes),
            embed_dim=model.config.embed_dim,
            global_dim=model.config.global_dim,
        )
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
    ) -> Index:
        """Open an index; ``model`` (a path or a loaded :class:`HAT`) defaults to the
        model the index was built with, which is then loaded at its first use. A given
        model is checked now: one of another fingerprint is refused. ``strict=False``
        opens an index whose manifest is damaged from the copy its database keeps (for
        :meth:`verify`)."""
        store = IndexStore.open(root, readonly=not writable, strict=strict)
        loaded = None
        if model is not None:
            from hat.model import HAT

            try:
                if isinstance(model, HAT):
                    loaded = _verified(model, store, "the given model")
                else:
                    loaded = _verified(resolve_model(model), store, str(model))
            except BaseException:
                store.close()
                raise
        return cls(store, loaded, cfg, torch.device(device))

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
                    self._rebuild_faiss(kind)
            self._snapshots, self._generation = {}, -1
        report.repaired = True
        return report

    # -- writing -----------------------------------------------------------------
    @torch.no_grad()
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
        main = distributed.is_main_process()
        report = AddReport()
        files = find_images(*roots)
        with self.store.writer() if main else nullcontext():
            known = self.store.images_by_path()
            todo = []
            for f in files:
                old = known.get(f.path)
                if old is not None and (old[2], old[3]) == (f.bytes, f.mtime_ns):
                    report.unchanged += 1
                else:
                    todo.append(f)
            bar = tqdm(
                total=len(todo), desc="index images", unit="img", disable=not (progress and main)
            )
            step, batch = self.cfg.commit_every, self.cfg.batch_size
            for first in range(0, len(todo), step):
                chunk = todo[first : first + step]
                lo, hi = distributed.shard_bounds(
                    len(chunk), batch, distributed.rank(), distributed.world_size()
                )
                shares = distributed.gather_objects(self._encode_files(chunk[lo:hi], known))
                bar.update(len(chunk))
                if main:
                    self._commit_chunk(shares, known, report)
            bar.close()
            if main:
                self._rebuild_faiss("image")
        distributed.barrier()
        for path, why in report.skipped:
            log.warning("skipped %s: %s", path, why)
        return report

    def _encode_files(self, files: Sequence[ImageFile], known: dict) -> dict[str, list]:
        """Read, hash, decode and encode ``files``: ``decoded`` (metadata with the
        float16 level arrays and the global embedding), ``unchanged``, ``errors``."""
        dataset = ImageFileDataset(
            files,
            build_transform(self.model.config.image, train=False),
            {f.path: known[f.path][1] for f in files if f.path in known},
        )
        loader = DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            num_workers=self.cfg.num_workers,
            collate_fn=collate_image_files,
        )
        out: dict[str, list] = {"decoded": [], "unchanged": [], "errors": []}
        for batch in loader:
            out["unchanged"].extend(batch["unchanged"])
            out["errors"].extend(batch["errors"])
            if batch["images"] is None:
                continue
            feats = self.model.encode_image(batch["images"].to(self.device)).to("cpu")
            levels = [t.to(torch.float16).numpy() for t in feats.levels]  # (B, T_k, d) each
            glob = feats.global_embedding.float().numpy()  # (B, g)
            for i, item in enumerate(batch["decoded"]):
                out["decoded"].append({**item, "levels": [t[i] for t in levels], "global": glob[i]})
        return out

    def _commit_chunk(self, shares: list[dict[str, list]], known: dict, report: AddReport) -> None:
        """Rank 0: record what every rank read for one chunk, in file order."""
        unchanged = [it for share in shares for it in share["unchanged"]]
        self.store.touch_images(
            [(it["file"].mtime_ns, known[it["file"].path][0]) for it in unchanged]
        )
        report.unchanged += len(unchanged)
        report.skipped.extend(e for share in shares for e in share["errors"])
        decoded = [it for share in shares for it in share["decoded"]]
        if not decoded:
            return
        arrays = SegmentArrays(
            [np.stack(level) for level in zip(*(it["levels"] for it in decoded))],  # (n, T_k, d)
            np.stack([it["global"] for it in decoded]),  # (n, g)
        )
        rows = [
            {
                "path": it["file"].path,
                "sha256": it["sha256"],
                "bytes": it["file"].bytes,
                "mtime_ns": it["file"].mtime_ns,
                "width": it["width"],
                "height": it["height"],
            }
            for it in decoded
        ]
        replaces = [known[r["path"]][0] for r in rows if r["path"] in known]
        self.store.commit_images(rows, arrays, replaces)
        report.updated += len(replaces)
        report.added += len(rows) - len(replaces)

    @torch.no_grad()
    def add_captions(
        self, captions: str | Path | Iterable[CaptionEntry], progress: bool = True
    ) -> int:
        """Index captions (a caption file, see :func:`read_caption_file`, or entries)
        not indexed yet; returns how many were added."""
        entries = (
            read_caption_file(captions) if isinstance(captions, str | Path) else list(captions)
        )
        with self.store.writer():
            seen = self.store.caption_keys()
            new = []
            for e in entries:
                if (e.text, e.image_path) not in seen:
                    seen.add((e.text, e.image_path))
                    new.append(e)
            step = self.cfg.commit_every
            starts = range(0, len(new), step)
            for start in tqdm(starts, desc="index captions", disable=not progress or not new):
                chunk = new[start : start + step]
                feats = self._encode_texts([e.text for e in chunk])
                arrays = SegmentArrays(
                    [t.to(torch.float16).numpy() for t in feats.levels],  # (n, L, d) each
                    feats.global_embedding.float().numpy(),  # (n, g)
                    feats.lengths.numpy(),
                )
                self.store.commit_captions([(e.text, e.image_path) for e in chunk], arrays)
            if new:
                self._rebuild_faiss("caption")
        return len(new)

    def remove(self, paths: Sequence[str | Path]) -> int:
        """Remove images by path (files or folders: everything indexed under them) and
        the captions written for any image under them (indexed or not); returns the
        number of images removed.

        A path is matched as images are indexed: made absolute without resolving
        symbolic links (so removing a folder removes the images found through links
        in it, and removing a link leaves its target). A path under which nothing is
        indexed is matched resolved instead (indexes written before)."""
        with self.store.writer():
            indexed = list(self.store.images_by_path())
            captioned = [key for key in self.store.caption_keys() if key[1] is not None]
            known = indexed + [image for _, image in captioned]

            def under(path: str, target: str) -> bool:
                return path == target or path.startswith(target.rstrip("/") + "/")

            targets = []
            for p in paths:
                target = os.path.abspath(p)
                if not any(under(k, target) for k in known):
                    target = str(Path(p).resolve())
                targets.append(target)
            doomed = [p for p in indexed if any(under(p, t) for t in targets)]
            removed = self.store.remove_images(doomed)
            orphans = [k for k in captioned if any(under(k[1], t) for t in targets)]
            if orphans:
                self.store.remove_captions(orphans)
            self._rebuild_faiss("image")
            self._rebuild_faiss("caption")
        return removed

    def remove_captions(
        self,
        captions: str | Path | Iterable[CaptionEntry] | None = None,
        all_captions: bool = False,
    ) -> int:
        """Remove captions: those of a caption file (read as :meth:`add_captions` reads
        it: same text and image) or given entries, or with ``all_captions`` every one.
        Captions not in the index are ignored; returns the number removed."""
        if (captions is None) != all_captions:
            raise ValueError("give captions to remove or all_captions=True (one of them)")
        keys = None
        if isinstance(captions, str | Path):
            captions = read_caption_file(captions)
        if captions is not None:
            keys = sorted({(e.text, e.image_path) for e in captions}, key=repr)
        with self.store.writer():
            removed = self.store.remove_captions(keys)
            self._rebuild_faiss("caption")
        return removed

    def _rebuild_faiss(self, kind: Kind) -> None:
        ids, segments, rows = self.store.locations(kind)
        self.store.write_faiss(kind, self._global_index(kind, ids, segments, rows))

    def _global_index(self, kind: Kind, ids: np.ndarray, segments: np.ndarray, rows: np.ndarray):
        """A faiss index of the global embeddings of the items at (segment, row)."""
        from hat.search import global_index

        embeddings = self._gather(kind, segments, rows, global_only=True)
        return global_index(embeddings, ids, self.cfg)

    # -- reading -----------------------------------------------------------------
    def _snapshot(self, kind: Kind) -> _Snapshot:
        """The live items of ``kind``; reloaded when another process committed."""
        with self._lock:
            generation = self.store.generation()
            if generation != self._generation:
                self._snapshots = {}
                self._generation = generation
            if kind not in self._snapshots:
                ids, segments, rows = self.store.locations(kind)
                try:
                    index = self.store.read_faiss(kind)
                except DamagedFile as err:  # derived from the segments: rebuilt below
                    log.warning("%s; using the global embeddings of the segments instead", err)
                    index = None
                if index is None and len(ids):
                    log.info("the %s faiss index is stale; rebuilding it in memory", kind)
                    index = self._global_index(kind, ids, segments, rows)
                if index is not None and hasattr(index, "nprobe"):
                    index.nprobe = self.cfg.nprobe
                position = {int(i): p for p, i in enumerate(ids)}
                self._snapshots[kind] = _Snapshot(ids, segments, rows, position, index)
            return self._snapshots[kind]

    def _gather(
        self, kind: Kind, segments: np.ndarray, rows: np.ndarray, global_only: bool = False
    ) -> Any:
        """Features of the items at (segment, row), in that order: the ``(n, g)`` global
        embeddings if ``global_only``, else :class:`ImageFeatures` / :class:`TextFeatures`
        in float32."""
        order = np.argsort(segments, kind="stable")
        levels: list[list[np.ndarray]] = [[] for _ in self.store.manifest.tokens]
        glob, lengths = [], []
        for seg in np.unique(segments):
            take = rows[order][segments[order] == seg]
            arrays = self.store.segment(kind, int(seg))
            folder = self.store.segment_dir(kind, int(seg))
            glob.append(_finite(arrays.global_embedding[take], folder / "global.npy", self.store))
            if global_only:
                continue
            for k, level in enumerate(arrays.levels):
                levels[k].append(_finite(level[take], folder / f"level{k + 1}.npy", self.store))
            if arrays.lengths is not None:
                lengths.append(arrays.lengths[take])
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        g = self.store.manifest.global_dim
        global_embedding = (np.concatenate(glob) if glob else np.zeros((0, g), np.float32))[inverse]
        if global_only:
            return global_embedding
        from hat.model import ImageFeatures, TextFeatures

        glob_t = torch.from_numpy(global_embedding)
        if kind == "image":
            tensors = [torch.from_numpy(np.concatenate(ts)[inverse]).float() for ts in levels]
            return ImageFeatures(tensors, glob_t)
        longest = max(t.shape[1] for t in levels[0])
        padded = [
            np.concatenate([np.pad(t, ((0, 0), (0, longest - t.shape[1]), (0, 0))) for t in ts])
            for ts in levels
        ]
        tensors = [torch.from_numpy(t[inverse]).float() for t in padded]
        return TextFeatures(tensors, torch.from_numpy(np.concatenate(lengths)[inverse]), glob_t)

    # -- encoding ----------------------------------------------------------------
    @torch.no_grad()
    def _encode_texts(self, texts: Sequence[str]) -> TextFeatures:
        from hat.model import TextFeatures

        parts = []
        for start in range(0, len(texts), self.cfg.batch_size):
            batch = self.tokenizer(list(texts[start : start + self.cfg.batch_size]))
            feats = self.model.encode_text(
                batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            )
            parts.append(feats.to("cpu"))
        return TextFeatures.cat(parts)

    @torch.no_grad()
    def _encode_image(self, image: Image.Image) -> ImageFeatures:
        pixels = build_transform(self.model.config.image, train=False)(image.convert("RGB"))
        return self.model.encode_image(pixels[None].to(self.device)).to("cpu")

    # -- searching ---------------------------------------------------------------
    def search_text(self, query: str, k: int = 10, exhaustive: bool = False) -> list[Hit]:
        """The ``k`` indexed images that best match ``query`` under HAT's score."""
        from hat.model import similarity

        if not query.strip():
            raise ValueError("the text query is empty")
        text = self._encode_texts([query])
        return self._search(
            "image", text.global_embedding, k, exhaustive,
            lambda images: similarity(images, text, self.model.config).levels[:, :, 0],
        )  # fmt: skip

    def search_image(
        self, image: str | Path | Image.Image, k: int = 10, exhaustive: bool = False
    ) -> list[Hit]:
        """The ``k`` indexed captions that best match ``image`` under HAT's score, or,
        when the index holds no captions, the ``k`` most similar indexed images (the
        per-level cosine of mean-pooled tokens, summed)."""
        from hat.model import similarity

        if not isinstance(image, Image.Image):
            image = load_image(image)
        query = self._encode_image(image)
        if self.store.count("caption"):
            return self._search(
                "caption", query.global_embedding, k, exhaustive,
                lambda caps: similarity(query, caps, self.model.config).levels[:, 0, :],
            )  # fmt: skip
        return self._search(
            "image", query.global_embedding, k, exhaustive,
            lambda images: _pooled_image_similarity(query, images),
        )  # fmt: skip

    def _search(self, kind: Kind, query_global: torch.Tensor, k: int, exhaustive: bool, score):
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        snap = self._snapshot(kind)
        if not len(snap.ids):
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
        if exhaustive or snap.faiss is None:
            positions = np.arange(len(snap.ids))
        else:
            wanted = min(max(k, self.cfg.shortlist), len(snap.ids))
            _, found = snap.faiss.search(query_global.float().numpy(), wanted)
            positions = np.asarray(
                [snap.position[int(i)] for i in found[0] if int(i) in snap.position],
                dtype=np.int64,
            )
        level_scores = []  # (K, n) blocks
        for start in range(0, len(positions), self.cfg.search_block):
            block = positions[start : start + self.cfg.search_block]
            feats = self._gather(kind, snap.segments[block], snap.rows[block])
            level_scores.append(score(feats).float())
        levels = torch.cat(level_scores, dim=1)  # (K, n)
        total = levels.sum(dim=0)  # (n,)
        if not torch.isfinite(total).all():
            # The stored features are checked finite when gathered: the query is not.
            raise ValueError(
                f"the model scored this query {float(total[~torch.isfinite(total)][0])}: its "
                "features are not finite (a damaged model?); no results"
            )
        top = torch.topk(total, k=min(k, total.numel()))
        chosen = [int(snap.ids[positions[i]]) for i in top.indices.tolist()]
        rows = (self.store.image_rows if kind == "image" else self.store.caption_rows)(chosen)
        hits = []
        for i, item_id, value in zip(top.indices.tolist(), chosen, top.values.tolist()):
            row = rows.get(item_id)
            if row is None:  # removed by a writer since this snapshot
                continue
            hits.append(
                Hit(
                    id=item_id,
                    kind=kind,
                    score=value,
                    level_scores=tuple(levels[:, i].tolist()),
                    path=row.get("path", row.get("image_path")),
                    text=row.get("text"),
                )
            )
        return hits

    # -- images and explanations --------------------------------------------------
    def image_path(self, image_id: int) -> str:
        """The file of an indexed image; :class:`KeyError` for an unknown id."""
        row = self.store.image_rows([image_id]).get(image_id)
        if row is None:
            raise KeyError(f"no image with id {image_id} in the index")
        return row["path"]

    def explain(self, image_id: int, caption: str) -> Explanation:
        """Per-level word-region attention of an indexed image and ``caption``, from the
        stored features (the image file is read only for display)."""
        from hat.explain import caption_tokens, explain_features, model_view

        snap = self._snapshot("image")
        if image_id not in snap.position:
            raise KeyError(f"no image with id {image_id} in the index")
        p = snap.position[image_id]
        feats = self._gather("image", snap.segments[p : p + 1], snap.rows[p : p + 1])
        batch, tokens, shown = caption_tokens(self.tokenizer, caption)
        with torch.no_grad():
            text = self.model.encode_text(
                batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            ).to("cpu")
        try:
            view = model_view(load_image(self.image_path(image_id)), self.model.config.image)
        except DataError:
            size = self.model.config.image.image_size
            view = Image.new("RGB", (size, size), "gray")
        return explain_features(
            self.model.config, self.store.manifest.grids, feats, text, tokens, shown, caption, view
        )


def _verified(model: HAT, store: IndexStore, where: str) -> HAT:
    """``model`` if its fingerprint is the one the index was built with."""
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


def _finite(rows: np.ndarray, path: Path, store: IndexStore) -> np.ndarray:
    """``rows`` of a segment array, read into memory, if every value is finite."""
    values = np.asarray(rows)
    if not np.isfinite(values).all():
        raise DamagedFile(path, "holds values that are not finite (damaged)", store.root)
    return values


def _pooled_image_similarity(query: ImageFeatures, images: ImageFeatures) -> torch.Tensor:
    """``(K, n)`` per-level cosine of the query's and each image's mean-pooled tokens
    (:func:`hat.align.pooled_similarity` with every gallery token counted)."""
    every_token = torch.full((len(images),), images.levels[0].shape[1])
    return torch.stack(
        [
            align.pooled_similarity(q, g, every_token)[0]  # (n,)
            for q, g in zip(query.levels, images.levels)
        ]
    )  # (K, n)
