"""Writing an index: reader -> Encoder -> store writer, composed by a timed runner.

``add_images``: find files -> read, hash and decode (DataLoader workers, the
*reader*) -> encode in batches (:class:`hat.encoder.Encoder`) -> write segments (one
committed transaction per ``commit_every`` images, the *writer*) -> rebuild the
global-embedding faiss index. The runner times each stage, as clip-retrieval's
inference runner does: :attr:`AddReport.seconds` holds the read, encode and write
seconds, and each batch's are logged at debug level.

Shape legend: ``n`` items, ``T_k`` tokens of level ``k``, ``L`` words, ``d`` joint
width, ``g`` global width.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hat import distributed
from hat.config import IndexConfig
from hat.encoder import Encoder
from hat.index.gallery import gather
from hat.index.reader import (
    CaptionEntry,
    ImageFile,
    ImageFileDataset,
    collate_image_files,
    find_images,
    read_caption_file,
)
from hat.index.store import IndexStore, Kind, SegmentArrays
from hat.search import global_index

__all__ = ["STAGES", "AddReport", "IndexBuilder"]

log = logging.getLogger(__name__)

# The runner's stages, in pipeline order.
STAGES = ("read", "encode", "write")


@dataclass
class AddReport:
    """What an ``add`` did: counts, each file left out with the reason, and the
    seconds spent in each stage of the pipeline (:data:`STAGES`)."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    captions: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    def summary(self) -> str:
        text = (
            f"{self.added} image(s) added, {self.updated} updated, {self.unchanged} unchanged, "
            f"{self.captions} caption(s) added, {len(self.skipped)} skipped"
        )
        if any(self.seconds.values()):
            text += " (" + ", ".join(f"{s} {self.seconds[s]:.1f} s" for s in STAGES) + ")"
        return text + "".join(f"\n  skipped {p}: {why}" for p, why in self.skipped)


class IndexBuilder:
    """Adds and removes the items of one index; each public method takes the store's
    writer lock. ``encoder`` gives the :class:`~hat.encoder.Encoder` when a method first
    encodes, so removing never loads the model."""

    def __init__(self, store: IndexStore, encoder: Callable[[], Encoder], cfg: IndexConfig) -> None:
        self.store, self.cfg = store, cfg
        self._encoder = encoder

    @property
    def encoder(self) -> Encoder:
        return self._encoder()

    # -- images -------------------------------------------------------------------------
    def add_images(self, *roots: str | Path, progress: bool = True) -> AddReport:
        """Index the new or changed image files under ``roots`` (see
        :meth:`hat.index.Index.add_images`)."""
        from tqdm.auto import tqdm

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
                    started = time.perf_counter()
                    self._commit_chunk(shares, known, report)
                    report.seconds["write"] += time.perf_counter() - started
                for share in shares:
                    for stage in ("read", "encode"):
                        report.seconds[stage] += share["seconds"][stage]
            bar.close()
            if main:
                started = time.perf_counter()
                self.rebuild_faiss("image")
                report.seconds["write"] += time.perf_counter() - started
        distributed.barrier()
        for path, why in report.skipped:
            log.warning("skipped %s: %s", path, why)
        return report

    def _encode_files(self, files: Sequence[ImageFile], known: dict) -> dict:
        """Read, hash, decode and encode ``files``: ``decoded`` (metadata with the
        float16 level arrays and the global embedding), ``unchanged``, ``errors``, and
        the ``seconds`` spent reading and encoding."""
        from torch.utils.data import DataLoader

        dataset = ImageFileDataset(
            files,
            self.encoder.transform,
            {f.path: known[f.path][1] for f in files if f.path in known},
        )
        loader = DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            num_workers=self.cfg.num_workers,
            collate_fn=collate_image_files,
        )
        out: dict = {"decoded": [], "unchanged": [], "errors": [], "seconds": {}}
        seconds = dict.fromkeys(("read", "encode"), 0.0)
        batches = iter(loader)
        while True:
            started = time.perf_counter()
            batch = next(batches, None)
            read = time.perf_counter() - started
            seconds["read"] += read
            if batch is None:
                break
            out["unchanged"].extend(batch["unchanged"])
            out["errors"].extend(batch["errors"])
            if batch["images"] is None:
                continue
            started = time.perf_counter()
            feats = self.encoder.encode_pixels(batch["images"])
            levels = [t.to(torch.float16).numpy() for t in feats.levels]  # (B, T_k, d) each
            glob = feats.global_embedding.float().numpy()  # (B, g)
            encoded = time.perf_counter() - started
            seconds["encode"] += encoded
            log.debug("batch of %d images: read %.3f s, encode %.3f s", len(glob), read, encoded)
            for i, item in enumerate(batch["decoded"]):
                out["decoded"].append({**item, "levels": [t[i] for t in levels], "global": glob[i]})
        out["seconds"] = seconds
        return out

    def _commit_chunk(self, shares: list[dict], known: dict, report: AddReport) -> None:
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

    # -- captions -----------------------------------------------------------------------
    def add_captions(
        self, captions: str | Path | Iterable[CaptionEntry], progress: bool = True
    ) -> int:
        """Index captions not indexed yet; returns how many were added."""
        from tqdm.auto import tqdm

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
                feats = self.encoder.encode_captions([e.text for e in chunk], self.cfg.batch_size)
                arrays = SegmentArrays(
                    [t.to(torch.float16).numpy() for t in feats.levels],  # (n, L, d) each
                    feats.global_embedding.float().numpy(),  # (n, g)
                    feats.lengths.numpy(),
                )
                self.store.commit_captions([(e.text, e.image_path) for e in chunk], arrays)
            if new:
                self.rebuild_faiss("caption")
        return len(new)

    # -- removing -----------------------------------------------------------------------
    def remove(self, paths: Sequence[str | Path]) -> int:
        """Remove images by path and the captions written for any image under them (see
        :meth:`hat.index.Index.remove`); returns the number of images removed."""
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
            self.rebuild_faiss("image")
            self.rebuild_faiss("caption")
        return removed

    def remove_captions(
        self,
        captions: str | Path | Iterable[CaptionEntry] | None = None,
        all_captions: bool = False,
    ) -> int:
        """Remove captions (see :meth:`hat.index.Index.remove_captions`)."""
        if (captions is None) != all_captions:
            raise ValueError("give captions to remove or all_captions=True (one of them)")
        keys = None
        if isinstance(captions, str | Path):
            captions = read_caption_file(captions)
        if captions is not None:
            keys = sorted({(e.text, e.image_path) for e in captions}, key=repr)
        with self.store.writer():
            removed = self.store.remove_captions(keys)
            self.rebuild_faiss("caption")
        return removed

    def rebuild_faiss(self, kind: Kind) -> None:
        """Rewrite the faiss file of ``kind`` from the global embeddings of its segments."""
        ids, segments, rows = self.store.locations(kind)
        embeddings = gather(self.store, kind, segments, rows, global_only=True)
        self.store.write_faiss(kind, global_index(embeddings, ids, self.cfg))
