"""Evaluation: encode each image once and each caption once, score all pairs, report.

One function, :func:`evaluate`, serves validation during training and the final
test (spec section 5). Shape legend: ``N`` images, ``M = N * cpi`` captions,
``K`` levels.

Under ``torchrun`` (a process group of ``W`` processes) :func:`evaluate` shares the
work: each process encodes a run of whole image batches and a run of whole caption
batches, all tokens are gathered on every process, each process scores a run of
whole image blocks against every caption, and the scores are gathered. Batches and
blocks are exactly those of a single process, so the scores, and the metrics, are
those of a single process. Every process returns the same report.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from hat import distributed
from hat.config import RetrievalConfig
from hat.encoder import Encoder
from hat.features import ImageFeatures, Scores, TextFeatures
from hat.metrics import fold_metrics, retrieval_metrics
from hat.search import TwoStageScores, two_stage_similarity

if TYPE_CHECKING:
    from hat.data import ImageRecord

log = logging.getLogger(__name__)

__all__ = [
    "EvalReport",
    "encode_and_score",
    "ensemble_report",
    "evaluate",
    "format_report",
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
        folds: number of folds of ``fold_metrics`` (0: none).
        scores: ``(N, M)`` HAT's summed scores on the CPU (what ensembles add up); not
            written by :meth:`to_dict`.
    """

    metrics: dict[str, dict[str, float]]
    fold_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    num_images: int = 0
    num_captions: int = 0
    folds: int = 0
    scores: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {
            "num_images": self.num_images,
            "num_captions": self.num_captions,
            "all": self.metrics,
            **({f"{self.folds}fold": self.fold_metrics} if self.fold_metrics else {}),
        }


def encode_and_score(
    encoder: Encoder,
    records: Sequence[ImageRecord],
    captions: Sequence[str],
    batch_size: int,
    num_workers: int,
    retrieval: RetrievalConfig,
    progress: bool,
) -> tuple[ImageFeatures, TextFeatures, Scores]:
    """Encode ``records`` and ``captions`` once (:meth:`Encoder.encode_images`,
    :meth:`Encoder.encode_captions`) and score every pair (:meth:`Scorer.all_pairs`);
    in a process group each process scores a run of whole image blocks (the blocks
    one process uses) and the scores are gathered, so that every process gets a
    single process's result.

    Returns:
        image features (``N``), caption features (``M``) and scores ``(K, N, M)``, on the CPU.
    """
    storage = getattr(torch, retrieval.storage_dtype)
    img = encoder.encode_images(records, batch_size, num_workers, storage, progress)
    txt = encoder.encode_captions(captions, batch_size, storage, progress)
    scorer = encoder.scorer(retrieval)
    cpu = torch.device("cpu")
    if not distributed.is_distributed():
        return img, txt, scorer.all_pairs(img, txt, out=cpu)
    me, world = distributed.rank(), distributed.world_size()
    lo, hi = distributed.shard_bounds(len(img), scorer.images_per_block(img), me, world)
    block = scorer.all_pairs(img[lo:hi], txt, out=cpu) if hi > lo else None
    parts = distributed.gather_tensors(block.levels if block else None)  # (K, N_p, M) each
    scored = torch.cat([p for p in parts if p is not None], dim=1)  # (K, N, M)
    return img, txt, Scores(levels=scored, total=scored.sum(dim=0))


def evaluate(
    encoder: Encoder,
    records: Sequence[ImageRecord],
    captions_per_image: int = 5,
    batch_size: int = 64,
    num_workers: int = 0,
    folds: int = 0,
    retrieval: RetrievalConfig = RetrievalConfig(),
    progress: bool = True,
) -> EvalReport:
    """Retrieval metrics of ``encoder``'s model on ``records`` for each level alone and
    for HAT's sum.

    Each image must have at least ``captions_per_image`` captions; the first ones are
    used (spec section 5). ``folds > 1`` adds the metrics averaged over that many
    consecutive blocks of images (MSCOCO 1K: ``folds=5`` on the 5K test).
    Tokens are kept on the host in ``retrieval.storage_dtype``. In a process group the
    work is shared out (see the module docstring) and every process gets the report;
    only rank 0 shows progress bars.
    ``retrieval.shortlist_k > 0`` adds ``hat_two_stage``: each caption's ``k`` candidate
    images and each image's ``k x captions_per_image`` candidate captions (the same share
    of either gallery) by global embedding, reranked with HAT's exact score; a positive
    outside the shortlist counts as ranked last.
    """
    short = [r.image_id for r in records if len(r.captions) < captions_per_image]
    if short:
        raise ValueError(
            f"{len(short)} image(s) have fewer than {captions_per_image} captions, "
            f"e.g. {short[:5]}; evaluation needs exactly {captions_per_image} per image"
        )
    progress = progress and distributed.is_main_process()
    captions = [c for r in records for c in r.captions[:captions_per_image]]
    img, txt, scores = encode_and_score(
        encoder, records, captions, batch_size, num_workers, retrieval, progress
    )
    two = None
    if retrieval.shortlist_k > 0:
        if not encoder.model.has_trained_global:
            log.warning(
                "two-stage scores with untrained global heads shortlist at random; "
                "fit them with `hat fit-global` first"
            )  # fmt: skip
        two = two_stage_similarity(
            encoder.scorer(retrieval),
            img,
            txt,
            retrieval.shortlist_k,
            caption_k=retrieval.shortlist_k * captions_per_image,
        )
    named = {"hat": scores.total, **{f"level{k + 1}": s for k, s in enumerate(scores.levels)}}
    metrics = {name: retrieval_metrics(s, captions_per_image) for name, s in named.items()}
    if two is not None:
        metrics["hat_two_stage"] = two_stage_metrics(two, captions_per_image)
    folded = (
        {name: fold_metrics(s, captions_per_image, folds) for name, s in named.items()}
        if folds > 1
        else {}
    )
    return EvalReport(metrics, folded, len(records), len(captions), folds, scores.total)


def ensemble_report(reports: Sequence[EvalReport], captions_per_image: int = 5) -> EvalReport:
    """The ensemble of several models evaluated on the same split: metrics of the SUM of
    their summed score matrices (SCAN-lineage papers sum an i2t-trained and a t2i-trained
    model), under the name ``ensemble``, with the same folds as the reports."""
    if len(reports) < 2:
        raise ValueError(f"an ensemble needs at least 2 models, got {len(reports)}")
    shapes = {tuple(r.scores.shape) for r in reports if r.scores is not None}
    if len(shapes) != 1 or any(r.scores is None for r in reports):
        raise ValueError(f"the reports must hold score matrices of one shape, got {shapes}")
    total = torch.stack([r.scores.double() for r in reports]).sum(dim=0)  # (N, M)
    first = reports[0]
    folded = {}
    if first.folds > 1:
        folded = {"ensemble": fold_metrics(total, captions_per_image, first.folds)}
    metrics = {"ensemble": retrieval_metrics(total, captions_per_image)}
    return EvalReport(metrics, folded, first.num_images, first.num_captions, first.folds, total)


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
    """A plain-text table: one row per level and for HAT's sum, one column per metric,
    then the number of queries whose positive tied with a candidate where there are any
    (ties count against the query, :mod:`hat.metrics`)."""
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
        tied = [
            f"{name} {values['i2t_tied']:.0f} i2t / {values['t2i_tied']:.0f} t2i"
            for name, values in table.items()
            if values.get("i2t_tied") or values.get("t2i_tied")
        ]
        if tied:
            lines.append("queries whose positive tied (counted against them): " + ", ".join(tied))
    return "\n".join(lines)
