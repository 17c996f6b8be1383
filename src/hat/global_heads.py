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
from hat.data import CaptionTokenizer, ImageRecord
from hat.evaluate import caption_batches, image_batches
from hat.losses import info_nce_loss
from hat.model import HAT

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


@torch.no_grad()
def pooled_features(
    model: HAT,
    records: Sequence[ImageRecord],
    tokenizer: CaptionTokenizer,
    device: torch.device,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> PooledFeatures:
    """Encode every image (evaluation transform) and every caption of ``records`` once
    and keep only the pooled tokens, on the CPU in float32."""
    model.eval()
    images = [
        model.pool_image(model.image_tower(batch)).float().cpu()  # (B, d)
        for batch in image_batches(model, records, batch_size, device, num_workers, progress)
    ]
    captions = [c for r in records for c in r.captions]
    texts = [
        model.pool_text(model.text_tower(input_ids, mask), mask).float().cpu()  # (B, d)
        for input_ids, mask in caption_batches(captions, tokenizer, batch_size, device, progress)
    ]
    counts = torch.tensor([len(r.captions) for r in records])  # (N,)
    return PooledFeatures(
        torch.cat(images), torch.cat(texts), torch.cumsum(counts, 0) - counts, counts
    )


def fit_global_heads(
    model: HAT,
    records: Sequence[ImageRecord],
    tokenizer: CaptionTokenizer,
    device: torch.device,
    cfg: GlobalFitConfig = GlobalFitConfig(),
    progress: bool = True,
) -> GlobalFitReport:
    """Train ``model.image_global`` / ``model.text_global`` in place (see the module
    docstring) and mark the model's global embeddings as trained."""
    empty = [r.image_id for r in records if not r.captions]
    if not records or empty:
        raise ValueError(
            "fitting the global heads needs images with captions; "
            + (f"images without captions: {empty[:5]}" if empty else "the split is empty")
        )
    start = time.perf_counter()
    feats = pooled_features(
        model, records, tokenizer, device, cfg.encode_batch_size, cfg.num_workers, progress
    )
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
