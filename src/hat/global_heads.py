"""Fit the global-embedding heads of a trained model, towers frozen.

Two-stage search shortlists by global embedding. A model trained without the
InfoNCE term (``train.global_loss_weight = 0``, the ``paper`` recipe) or imported from
the official release has random heads: :func:`fit_global_heads` trains just those
two Linear layers on pooled features of a training split, which costs one forward
pass over the split and seconds of head training, and never changes HAT's scores.

Shape legend: ``N`` images, ``M`` captions, ``B`` batch, ``d`` joint width.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hat.config import GlobalFitConfig
from hat.data import ImageRecord
from hat.encoder import DEFAULT_BATCH_SIZE, Encoder
from hat.losses import info_nce_loss

__all__ = ["GlobalFitReport", "PooledFeatures", "fit_global_heads", "pooled_features"]


@dataclass
class PooledFeatures:
    """Pooled tokens of level ``global_level`` (the global heads' inputs).

    Attributes:
        images: ``(N, d)`` one row per image.
        captions: ``(M, d)`` one row per caption, the captions of image 0 first.
        first_caption: ``(N,)`` row in ``captions`` of each image's first caption.
        caption_counts: ``(N,)`` number of captions of each image.
    """

    images: Tensor
    captions: Tensor
    first_caption: Tensor
    caption_counts: Tensor


@dataclass
class GlobalFitReport:
    """What :func:`fit_global_heads` did: sizes, last epoch's mean loss, seconds."""

    images: int
    captions: int
    epochs: int
    loss: float
    encode_seconds: float
    fit_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pooled_features(
    encoder: Encoder,
    records: Sequence[ImageRecord],
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_workers: int = 0,
    progress: bool = True,
) -> PooledFeatures:
    """Encode every image (evaluation transform) and every caption of ``records`` once
    and keep only the pooled tokens, on the CPU in float32."""
    images = encoder.pooled_images(records, batch_size, num_workers, progress)  # (N, d)
    captions = [c for r in records for c in r.captions]
    texts = encoder.pooled_captions(captions, batch_size, progress)  # (M, d)
    counts = torch.tensor([len(r.captions) for r in records])  # (N,)
    return PooledFeatures(images, texts, torch.cumsum(counts, 0) - counts, counts)


def fit_global_heads(
    encoder: Encoder,
    records: Sequence[ImageRecord],
    cfg: GlobalFitConfig = GlobalFitConfig(),
    progress: bool = True,
) -> GlobalFitReport:
    """Train the encoder model's ``image_global`` / ``text_global`` in place (see the
    module docstring), on the encoder's device, and mark its global embeddings as
    trained."""
    empty = [r.image_id for r in records if not r.captions]
    if not records or empty:
        raise ValueError(
            "fitting the global heads needs images with captions; "
            + (f"images without captions: {empty[:5]}" if empty else "the split is empty")
        )
    start = time.perf_counter()
    feats = pooled_features(encoder, records, cfg.encode_batch_size, cfg.num_workers, progress)
    model, device = encoder.model, encoder.device
    encoded = time.perf_counter()
    heads = [*model.image_global.parameters(), *model.text_global.parameters()]
    optimizer = torch.optim.AdamW(heads, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    images = feats.images.to(device)  # (N, d)
    captions = feats.captions.to(device)  # (M, d)
    n = len(images)
    epoch_loss = float("nan")
    with torch.enable_grad():
        for _ in tqdm(range(cfg.epochs), desc="fit global heads", disable=not progress):
            order = torch.randperm(n, generator=generator)  # (N,)
            # One caption of its own per image, a different draw each epoch.
            draw = (torch.rand(n, generator=generator) * feats.caption_counts).long()
            caption_of = (feats.first_caption + draw).to(device)  # (N,)
            total = 0.0
            for lo in range(0, n, cfg.batch_size):
                batch = order[lo : lo + cfg.batch_size].to(device)  # (B,)
                img = model.image_global_embedding(images[batch])  # (B, g)
                txt = model.text_global_embedding(captions[caption_of[batch]])  # (B, g)
                loss = info_nce_loss(img @ txt.T / cfg.temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(batch)
            epoch_loss = total / n
    model.global_trained.fill_(True)
    return GlobalFitReport(
        images=n,
        captions=len(captions),
        epochs=cfg.epochs,
        loss=epoch_loss,
        encode_seconds=encoded - start,
        fit_seconds=time.perf_counter() - encoded,
    )
