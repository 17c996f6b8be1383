"""An index's items as a :class:`hat.search.Gallery`: memory-mapped segments and faiss.

A :class:`SegmentGallery` is a snapshot of the live items of one kind (images or
captions) at one store generation: where each item's tokens sit (segment, row), the
faiss index of their global embeddings, and the gathering of tokens by position
that the :class:`~hat.search.Searcher` reranks from.

Shape legend: ``n`` items, ``T_k`` tokens of level ``k``, ``L`` words, ``d`` joint
width, ``g`` global width, ``c`` candidates.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hat.config import IndexConfig
from hat.features import ImageFeatures, TextFeatures
from hat.index.store import DamagedFile, IndexStore, Kind
from hat.search import MISSING, global_index

__all__ = ["SegmentGallery", "gather"]

log = logging.getLogger(__name__)

FLOAT32_BYTES = 4


class SegmentGallery:
    """The live items of ``kind`` in ``store`` at the generation it was made at.

    Attributes:
        ids: ``(n,)`` item ids in the store's order; a position is an index into it.
        segments, rows: ``(n,)`` where each item's tokens are stored.
        faiss: the global-embedding index (ids as faiss ids), ``None`` when empty.
    """

    def __init__(self, store: IndexStore, kind: Kind, cfg: IndexConfig) -> None:
        self.store, self.kind = store, kind
        self.ids, self.segments, self.rows = store.locations(kind)
        self.position = {int(i): p for p, i in enumerate(self.ids)}
        manifest = store.manifest
        if kind == "image":
            tokens = sum(manifest.tokens)
        else:
            tokens = len(manifest.tokens) * max(
                (store.segment(kind, int(s)).levels[0].shape[1] for s in np.unique(self.segments)),
                default=0,
            )
        self.item_bytes = tokens * manifest.embed_dim * FLOAT32_BYTES
        self.faiss = self._read_faiss(cfg)

    def _read_faiss(self, cfg: IndexConfig) -> Any:
        try:
            index = self.store.read_faiss(self.kind)
        except DamagedFile as err:  # derived from the segments: rebuilt below
            log.warning("%s; using the global embeddings of the segments instead", err)
            index = None
        if index is None and len(self.ids):
            log.info("the %s faiss index is stale; rebuilding it in memory", self.kind)
            embeddings = gather(self.store, self.kind, self.segments, self.rows, global_only=True)
            index = global_index(embeddings, self.ids, cfg)
        if index is not None and hasattr(index, "nprobe"):
            index.nprobe = cfg.nprobe
        return index

    def __len__(self) -> int:
        return len(self.ids)

    def shortlist(self, queries: Tensor, count: int) -> Tensor:
        """``(Q, c)`` positions of each query's best items by global inner product."""
        count = min(count, len(self))
        if self.faiss is None:
            return torch.full((len(queries), count), MISSING, dtype=torch.long)
        _, found = self.faiss.search(
            np.ascontiguousarray(queries.detach().float().cpu().numpy()), count
        )  # (Q, c) ids
        positions = [[self.position.get(int(i), MISSING) for i in row] for row in found]
        return torch.tensor(positions, dtype=torch.long).reshape(len(queries), count)

    def features(self, positions: Tensor) -> ImageFeatures | TextFeatures:
        """Tokens of the items at ``positions``, in float32, checked finite."""
        p = positions.numpy()
        return gather(self.store, self.kind, self.segments[p], self.rows[p])


def gather(
    store: IndexStore, kind: Kind, segments: np.ndarray, rows: np.ndarray, global_only: bool = False
) -> Any:
    """Features of the items at (segment, row), in that order: the ``(n, g)`` global
    embeddings if ``global_only``, else :class:`ImageFeatures` / :class:`TextFeatures`
    in float32. Every value read is checked finite (:class:`DamagedFile` otherwise)."""
    order = np.argsort(segments, kind="stable")
    levels: list[list[np.ndarray]] = [[] for _ in store.manifest.tokens]
    glob, lengths = [], []
    for seg in np.unique(segments):
        take = rows[order][segments[order] == seg]
        arrays = store.segment(kind, int(seg))
        folder = store.segment_dir(kind, int(seg))
        glob.append(_finite(arrays.global_embedding[take], folder / "global.npy", store))
        if global_only:
            continue
        for k, level in enumerate(arrays.levels):
            name = store.level_file(kind, int(seg), k)
            levels[k].append(_finite(level[take], folder / name, store))  # (m, T_k, d) decoded
        if arrays.lengths is not None:
            lengths.append(arrays.lengths[take])
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    g = store.manifest.global_dim
    global_embedding = (np.concatenate(glob) if glob else np.zeros((0, g), np.float32))[inverse]
    if global_only:
        return global_embedding
    glob_t = torch.from_numpy(global_embedding)
    if kind == "image":
        tensors = [torch.from_numpy(np.concatenate(ts)[inverse]).float() for ts in levels]
        return ImageFeatures(tensors, glob_t)
    longest = max(t.shape[1] for t in levels[0])
    padded = [
        np.concatenate([np.pad(t, ((0, 0), (0, longest - t.shape[1]), (0, 0))) for t in ts])
        for ts in levels
    ]  # (n, L, d) each
    tensors = [torch.from_numpy(t[inverse]).float() for t in padded]
    return TextFeatures(tensors, torch.from_numpy(np.concatenate(lengths)[inverse]), glob_t)


def _finite(rows: np.ndarray, path: Path, store: IndexStore) -> np.ndarray:
    """``rows`` of a segment array, read into memory, if every value is finite."""
    values = np.asarray(rows)
    if not np.isfinite(values).all():
        raise DamagedFile(path, "holds values that are not finite (damaged)", store.root)
    return values
