"""Evaluation: encode each image once and each caption once, score all pairs, report.

One function, :func:`evaluate`, serves validation during training and the final
test (spec section 5). Shape legend: ``N`` images, ``M = N * cpi`` captions,
``K`` levels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hat.align import scoring_dtype
from hat.config import ModelConfig, RetrievalConfig
from hat.data import CaptionTokenizer, ImageDataset, ImageRecord, build_transform, image_collate
from hat.metrics import fold_metrics, retrieval_metrics
from hat.model import HAT, ImageFeatures, Scores, TextFeatures, similarity
from hat.search import TwoStageScores, two_stage_similarity

__all__ = [
    "EvalReport",
    "encode_captions",
    "encode_images",
    "evaluate",
    "format_report",
    "score_all",
    "two_stage_metrics",
]

METRIC_ORDER = (
    "i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
    "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr", "rsum",
)  # fmt: skip
RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


@dataclass
class EvalReport:
    """Metrics of one evaluation.

    Attributes:
        metrics: ``{"hat": {...}, "level1": {...}, ...}``, each a
            :func:`~hat.metrics.retrieval_metrics` dict over all images.
        fold_metrics: the same, averaged over ``folds`` blocks of images (MSCOCO 1K),
            empty when no folds were asked for.
        num_images, num_captions: sizes of the evaluated split.
    """

    metrics: dict[str, dict[str, float]]
    fold_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    num_images: int = 0
    num_captions: int = 0
    folds: int = 0

    def to_dict(self) -> dict:
        return {
            "num_images": self.num_images,
            "num_captions": self.num_captions,
            "all": self.metrics,
            **({f"{self.folds}fold": self.fold_metrics} if self.fold_metrics else {}),
        }


@torch.no_grad()
def encode_images(
    model: HAT,
    records: Sequence[ImageRecord],
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    storage_dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> ImageFeatures:
    """Per-level tokens of every image, encoded once, kept on the CPU in ``storage_dtype``."""
    transform = build_transform(model.config.image, train=False)
    loader = DataLoader(
        ImageDataset(records, transform),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=image_collate,
    )
    parts = []
    for batch in tqdm(loader, desc="encode images", disable=not progress, leave=False):
        feats = model.encode_image(batch["images"].to(device))
        parts.append(feats.to(device="cpu", dtype=storage_dtype))
    return ImageFeatures.cat(parts)


@torch.no_grad()
def encode_captions(
    model: HAT,
    captions: Sequence[str],
    tokenizer: CaptionTokenizer,
    batch_size: int,
    device: torch.device,
    storage_dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> TextFeatures:
    """Per-level tokens and lengths of every caption, encoded once, on the CPU."""
    parts = []
    starts = range(0, len(captions), batch_size)
    for start in tqdm(starts, desc="encode captions", disable=not progress, leave=False):
        batch = tokenizer(list(captions[start : start + batch_size]))
        feats = model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        parts.append(feats.to(device="cpu", dtype=storage_dtype))
    return TextFeatures.cat(parts)


@torch.no_grad()
def score_all(
    model_cfg: ModelConfig,
    images: ImageFeatures,
    captions: TextFeatures,
    device: torch.device,
    retrieval: RetrievalConfig = RetrievalConfig(),
) -> Scores:
    """All-pairs scores ``(K, N, M)`` and ``(N, M)`` under ``model_cfg``'s alignment,
    results on the CPU.

    Captions go to ``device`` once; images one block of ``retrieval.image_block`` at a
    time, each cast to the compute dtype there.
    """
    dtype = scoring_dtype(retrieval.compute_dtype, device)
    caps = captions.to(device=device, dtype=dtype)
    step = retrieval.image_block
    parts = [
        similarity(
            images[i : i + step].to(device=device, dtype=dtype), caps, model_cfg
        ).levels.cpu()
        for i in range(0, len(images), step)
    ]
    levels = torch.cat(parts, dim=1)  # (K, N, M)
    return Scores(levels=levels, total=levels.sum(dim=0))


def evaluate(
    model: HAT,
    records: Sequence[ImageRecord],
    tokenizer: CaptionTokenizer,
    device: torch.device,
    captions_per_image: int = 5,
    batch_size: int = 64,
    num_workers: int = 0,
    folds: int = 0,
    retrieval: RetrievalConfig = RetrievalConfig(),
    progress: bool = True,
) -> EvalReport:
    """Retrieval metrics of ``model`` on ``records`` for each level alone and for HAT's sum.

    Each image must have at least ``captions_per_image`` captions; the first ones are
    used (spec section 5). ``folds > 1`` adds the metrics averaged over that many
    consecutive blocks of images (MSCOCO 1K: ``folds=5`` on the 5K test).
    Tokens are kept on the host in ``retrieval.storage_dtype``.
    ``retrieval.shortlist_k > 0`` adds ``hat_two_stage``: each query's ``k`` candidates by global
    embedding reranked with HAT's exact score; a positive outside the shortlist counts
    as ranked last.
    """
    short = [r.image_id for r in records if len(r.captions) < captions_per_image]
    if short:
        raise ValueError(
            f"{len(short)} image(s) have fewer than {captions_per_image} captions, "
            f"e.g. {short[:5]}; evaluation needs exactly {captions_per_image} per image"
        )
    was_training = model.training
    model.eval()
    try:
        captions = [c for r in records for c in r.captions[:captions_per_image]]
        storage = getattr(torch, retrieval.storage_dtype)
        img = encode_images(model, records, batch_size, device, num_workers, storage, progress)
        txt = encode_captions(model, captions, tokenizer, batch_size, device, storage, progress)
        scores = score_all(model.config, img, txt, device, retrieval)
        two = None
        if retrieval.shortlist_k > 0:
            two = two_stage_similarity(
                model.config, img, txt, retrieval.shortlist_k, device, retrieval
            )
    finally:
        model.train(was_training)
    named = {"hat": scores.total, **{f"level{k + 1}": s for k, s in enumerate(scores.levels)}}
    metrics = {name: retrieval_metrics(s, captions_per_image) for name, s in named.items()}
    if two is not None:
        metrics["hat_two_stage"] = two_stage_metrics(two, captions_per_image)
    folded = (
        {name: fold_metrics(s, captions_per_image, folds) for name, s in named.items()}
        if folds > 1
        else {}
    )
    return EvalReport(metrics, folded, len(records), len(captions), folds)


def _outside_shortlist_last(sims: torch.Tensor, captions_per_image: int) -> torch.Tensor:
    """Scores where a positive outside the shortlist (``-inf``) ranks below every other pair."""
    n, m = sims.shape
    positive = torch.arange(m)[None, :] // captions_per_image == torch.arange(n)[:, None]  # (N, M)
    missing = torch.isinf(sims)
    low = sims.masked_fill(missing, torch.finfo(sims.dtype).min)
    return low.masked_fill(missing & positive, float("-inf"))


def two_stage_metrics(two: TwoStageScores, captions_per_image: int) -> dict[str, float]:
    """Metrics of shortlisted scores: i2t from each image's shortlist, t2i from each
    caption's; a positive outside its query's shortlist ranks last."""
    cpi = captions_per_image
    i2t = retrieval_metrics(_outside_shortlist_last(two.i2t, cpi), cpi)
    t2i = retrieval_metrics(_outside_shortlist_last(two.t2i, cpi), cpi)
    merged = {k: (i2t if k.startswith("i2t") else t2i)[k] for k in i2t if k != "rsum"}
    merged["rsum"] = sum(merged[k] for k in RECALL_KEYS)
    return merged


def format_report(report: EvalReport) -> str:
    """A plain-text table: one row per level and for HAT's sum, one column per metric."""
    header = f"{'':10s}" + "".join(f"{m:>10s}" for m in METRIC_ORDER)
    lines = []
    sections = [("all images", report.metrics)]
    if report.fold_metrics:
        sections.append((f"{report.folds}-fold average", report.fold_metrics))
    for title, table in sections:
        lines.append(f"{title} ({report.num_images} images, {report.num_captions} captions)")
        lines.append(header)
        for name, values in table.items():
            lines.append(f"{name:10s}" + "".join(f"{values[m]:10.2f}" for m in METRIC_ORDER))
    return "\n".join(lines)
