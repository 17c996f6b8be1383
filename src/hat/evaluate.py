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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hat import distributed
from hat.align import scoring_dtype
from hat.config import ModelConfig, RetrievalConfig
from hat.data import CaptionTokenizer, ImageDataset, ImageRecord, build_transform, image_collate
from hat.metrics import fold_metrics, retrieval_metrics
from hat.model import HAT, ImageFeatures, Scores, TextFeatures, similarity
from hat.search import TwoStageScores, two_stage_similarity

log = logging.getLogger(__name__)

__all__ = [
    "caption_batches",
    "image_batches",
    "EvalReport",
    "encode_and_score",
    "ensemble_report",
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


def image_batches(
    model: HAT,
    records: Sequence[ImageRecord],
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    progress: bool = True,
) -> Iterator[torch.Tensor]:
    """The records' images in order, evaluation transform applied, as ``(B, 3, H, W)``
    batches on ``device``."""
    loader = DataLoader(
        ImageDataset(records, build_transform(model.config.image, train=False)),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=image_collate,
    )
    for batch in tqdm(loader, desc="encode images", disable=not progress, leave=False):
        yield batch["images"].to(device)


def caption_batches(
    captions: Sequence[str],
    tokenizer: CaptionTokenizer,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The captions in order as ``(B, L)`` token ids and attention masks on ``device``."""
    starts = range(0, len(captions), batch_size)
    for start in tqdm(starts, desc="encode captions", disable=not progress, leave=False):
        batch = tokenizer(list(captions[start : start + batch_size]))
        yield batch["input_ids"].to(device), batch["attention_mask"].to(device)


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
    parts = []
    for images in image_batches(model, records, batch_size, device, num_workers, progress):
        parts.append(model.encode_image(images).to(device="cpu", dtype=storage_dtype))
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
    for input_ids, mask in caption_batches(captions, tokenizer, batch_size, device, progress):
        parts.append(model.encode_text(input_ids, mask).to(device="cpu", dtype=storage_dtype))
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


def _present(parts: list[torch.Tensor | None]) -> list[torch.Tensor]:
    return [p for p in parts if p is not None]


def _gather_images(local: ImageFeatures | None, num_levels: int) -> ImageFeatures:
    """Every process's image features (``None``: an empty shard), concatenated in rank order."""
    levels = [
        torch.cat(_present(distributed.gather_tensors(local.levels[k] if local else None)))
        for k in range(num_levels)
    ]  # (N, R_k, d) each
    glob = distributed.gather_tensors(local.global_embedding if local else None)
    return ImageFeatures(levels, torch.cat(_present(glob)))  # global (N, g)


def _gather_captions(local: TextFeatures | None, num_levels: int) -> TextFeatures:
    """Every process's caption features (``None``: an empty shard), concatenated in rank
    order and zero-padded to the longest caption, as :meth:`TextFeatures.cat` does."""
    levels = [
        distributed.gather_tensors(local.levels[k] if local else None) for k in range(num_levels)
    ]  # per level, per process (M_p, L_p, d)
    lengths = distributed.gather_tensors(local.lengths if local else None)  # (M_p,) each
    glob = distributed.gather_tensors(local.global_embedding if local else None)  # (M_p, g) each
    parts = [
        TextFeatures([per_level[p] for per_level in levels], lengths[p], glob[p])
        for p in range(len(lengths))
        if lengths[p] is not None
    ]
    return TextFeatures.cat(parts)


def encode_and_score(
    model: HAT,
    records: Sequence[ImageRecord],
    captions: Sequence[str],
    tokenizer: CaptionTokenizer,
    batch_size: int,
    device: torch.device,
    num_workers: int,
    storage: torch.dtype,
    retrieval: RetrievalConfig,
    progress: bool,
) -> tuple[ImageFeatures, TextFeatures, Scores]:
    """:func:`encode_images`, :func:`encode_captions` and :func:`score_all` of ``records``
    and ``captions``; in a process group shared out at the batches and blocks a single
    process uses, then gathered, so that every process gets a single process's result.

    Returns:
        image features (``N``), caption features (``M``) and scores ``(K, N, M)``, on the CPU.
    """
    if not distributed.is_distributed():
        img = encode_images(model, records, batch_size, device, num_workers, storage, progress)
        txt = encode_captions(model, captions, tokenizer, batch_size, device, storage, progress)
        return img, txt, score_all(model.config, img, txt, device, retrieval)
    me, world = distributed.rank(), distributed.world_size()
    levels = model.num_levels
    lo, hi = distributed.shard_bounds(len(records), batch_size, me, world)
    my_images = (
        encode_images(model, records[lo:hi], batch_size, device, num_workers, storage, progress)
        if hi > lo
        else None
    )
    img = _gather_images(my_images, levels)
    lo, hi = distributed.shard_bounds(len(captions), batch_size, me, world)
    my_captions = (
        encode_captions(model, captions[lo:hi], tokenizer, batch_size, device, storage, progress)
        if hi > lo
        else None
    )
    txt = _gather_captions(my_captions, levels)
    lo, hi = distributed.shard_bounds(len(img), retrieval.image_block, me, world)
    block = score_all(model.config, img[lo:hi], txt, device, retrieval) if hi > lo else None
    parts = distributed.gather_tensors(block.levels if block else None)  # (K, N_p, M) each
    scored = torch.cat(_present(parts), dim=1)  # (K, N, M)
    return img, txt, Scores(levels=scored, total=scored.sum(dim=0))


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
    was_training = model.training
    model.eval()
    progress = progress and distributed.is_main_process()
    try:
        captions = [c for r in records for c in r.captions[:captions_per_image]]
        storage = getattr(torch, retrieval.storage_dtype)
        img, txt, scores = encode_and_score(
            model, records, captions, tokenizer, batch_size, device, num_workers, storage,
            retrieval, progress,
        )  # fmt: skip
        two = None
        if retrieval.shortlist_k > 0:
            if not model.has_trained_global:
                log.warning(
                    "two-stage scores with untrained global heads shortlist at random; "
                    "fit them with `hat fit-global` first"
                )  # fmt: skip
            two = two_stage_similarity(
                model.config,
                img,
                txt,
                retrieval.shortlist_k,
                device,
                retrieval,
                caption_k=retrieval.shortlist_k * captions_per_image,
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
