"""The training recipe: setup, train, validate, save, load, resume.

Every choice of the recipe (optimiser, schedule, freezing, margin, AMP, batch) is
read from :class:`~hat.config.TrainConfig`. A run folder holds::

    config.yaml              the final config of the run
    checkpoints/latest.pt    all state after the last finished epoch (or step)
    checkpoints/best.pt      the same at the best validation epoch
    metrics.jsonl            one JSON object per logged step and per validation
    tb/                      TensorBoard events

Under ``torchrun`` (``docs/distributed.md``) every process runs the same Trainer on
its share of each global batch, the model wrapped in ``DistributedDataParallel``;
only the process of global rank 0 writes the run folder and shows progress bars.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from hat import distributed
from hat._optional import needs_extra
from hat.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_state_strict,
    load_training_checkpoint,
    restore_rng_state,
    save_training_checkpoint,
)
from hat.config import (
    DEVICE_AUTO,
    RUN_CONFIG,
    ConfigError,
    ExperimentConfig,
    TrainConfig,
    config_to_dict,
    resolve_device,
    save_config,
)
from hat.data import (
    CaptionTokenizer,
    DataError,
    DecodedImages,
    ImageCaptionsDataset,
    PairCollator,
    PairDataset,
    build_transform,
    load_records,
    select_split,
)
from hat.encoder import Encoder, TextCache
from hat.evaluate import EvalReport, evaluate
from hat.losses import global_batch_scores, info_nce_loss, positive_mask, triplet_loss
from hat.metrics import chance_metrics
from hat.model import HAT, TextFeatures

__all__ = [
    "EpochOrder",
    "NeighbourGroups",
    "backbones_trainable",
    "build_optimizer",
    "Trainer",
    "TrainingDiverged",
    "TrainingInterrupted",
    "TextCache",
    "TrainingObjective",
    "batch_diagnostics",
    "pick_device",
    "pick_threads",
    "seed_everything",
]


log = logging.getLogger(__name__)
# Signals after which the Trainer saves its state at the end of the current step and stops.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Pairs whose nearest neighbours NeighbourGroups finds in one (chunk, S) similarity block,
# and the nearest pairs it keeps per pair to fill a group from.
NEIGHBOUR_CHUNK = 1024
NEIGHBOUR_CANDIDATES = 32


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM or SIGINT stopped training after saving ``checkpoints/latest.pt`` at the
    end of the last finished step: ``--resume`` continues exactly from there.

    Attributes:
        signal_number: the signal received (in a process group: by any process).
    """

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.signal_number = signal_number


def pick_device(name: str | None = None) -> torch.device:
    """The device ``name`` names (default and ``auto``: the config's one rule,
    :func:`hat.config.resolve_device`)."""
    return torch.device(resolve_device(name or DEVICE_AUTO))


def _busy_cores(samples: int = 10, interval_s: float = 0.01) -> int:
    """Runnable threads of OTHER processes right now: the median over a few samples of
    the kernel's runnable count (``/proc/loadavg``) less this thread; 0 where unknown.
    The load average itself lags by a minute and would count our own last run."""
    counts = []
    for _ in range(samples):
        try:
            running = Path("/proc/loadavg").read_text().split()[3].split("/")[0]
        except (OSError, IndexError):
            return 0
        counts.append(max(int(running) - 1, 0))
        time.sleep(interval_s)
    return int(np.median(counts))


def pick_threads(requested: int = 0) -> int:
    """Threads for torch's CPU kernels: ``requested`` when > 0; else the cores this
    process may run on (``os.sched_getaffinity``) less the ones other processes keep
    busy now, at least 1."""
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) - _busy_cores())


def backbones_trainable(cfg: TrainConfig, epoch: int) -> dict[str, bool]:
    """Whether each tower's backbone trains in 0-based ``epoch`` (the projections always
    do): frozen for the first ``freeze_*_epochs`` epochs, for good when that is -1."""

    def trains(frozen_epochs: int) -> bool:
        return frozen_epochs >= 0 and epoch >= frozen_epochs

    return {"image": trains(cfg.freeze_image_epochs), "text": trains(cfg.freeze_text_epochs)}


def build_optimizer(
    params: list[nn.Parameter], cfg: TrainConfig, steps_per_epoch: int = 1
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam (no weight decay in ``paper``) and the recipe's learning-rate schedule:
    ``step`` is stepped once per epoch (StepLR), ``cosine`` once per optimisation step
    (a linear warm-up over ``warmup_steps``, then a cosine from ``lr`` to 0 at the last
    of ``epochs * steps_per_epoch`` steps)."""
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.lr_schedule == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=cfg.lr_step_epochs, gamma=cfg.lr_gamma
        )
        return optimizer, scheduler
    total, warmup = max(cfg.epochs * steps_per_epoch, 1), cfg.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total) / max(total - warmup, 1)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class SeededItems(Dataset):
    """Makes each item's random augmentation a function of (seed, epoch, index) only,
    so that data order and augmentation survive a resume and any worker count."""

    def __init__(self, inner: Dataset, seed: int) -> None:
        self.inner = inner
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF)
            return self.inner[index]


class NeighbourGroups:
    """Each training pair's nearest pairs of other images by a fixed embedding, and
    the epoch order that serves them together (``train.neighbour_group``).

    ``embeddings`` ``(S, D)``: one row per pair (the frozen text tower's mean caption
    state); ``images`` ``(S,)``: each pair's image. :meth:`arrange` walks a
    permutation: each pair not yet taken becomes an anchor, followed by up to
    ``group - 1`` of its ``candidates`` nearest pairs that are neither taken nor of an
    image already in its group. Every pair still appears exactly once.
    """

    def __init__(
        self, embeddings: Tensor, images: Tensor, group: int,
        candidates: int = NEIGHBOUR_CANDIDATES,
    ) -> None:  # fmt: skip
        unit = nn.functional.normalize(embeddings.float(), dim=1)  # (S, D)
        k = min(candidates, len(unit) - 1)
        rows = []
        for start in range(0, len(unit), NEIGHBOUR_CHUNK):
            block = unit[start : start + NEIGHBOUR_CHUNK]  # (b, D)
            sims = block @ unit.T  # (b, S)
            same = images[start : start + NEIGHBOUR_CHUNK, None] == images[None, :]  # (b, S)
            rows.append(sims.masked_fill(same, -math.inf).topk(k, dim=1).indices)  # (b, k)
        self.nearest = torch.cat(rows).tolist() if rows else []  # S lists of k pair ids
        self.images = images.tolist()
        self.group = group

    def arrange(self, order: Tensor) -> Tensor:
        """A permutation ``(S,)`` of the pairs -> the grouped permutation ``(S,)``."""
        taken = [False] * len(self.images)
        arranged: list[int] = []
        for anchor in order.tolist():
            if taken[anchor]:
                continue
            taken[anchor] = True
            arranged.append(anchor)
            seen = {self.images[anchor]}
            for near in self.nearest[anchor]:
                if len(seen) == self.group:
                    break
                if not taken[near] and self.images[near] not in seen:
                    taken[near] = True
                    arranged.append(near)
                    seen.add(self.images[near])
        return torch.tensor(arranged, dtype=torch.long)


class EpochOrder(Sampler[int]):
    """This process's items of a permutation fixed by (seed, epoch), grouped by
    ``neighbours`` when given (:meth:`NeighbourGroups.arrange`).

    The permutation, from ``offset`` items on (mid-epoch resume), is cut into global
    batches of ``world_size * batch_size`` items; process ``rank`` takes the
    ``rank``-th run of ``batch_size`` items of each. The global batch of a step is
    thus the same whatever the number of processes, and an incomplete last global
    batch is left out (every process gets the same number of whole batches). With
    the defaults (one process, ``batch_size=1``) it is the plain permutation.
    """

    def __init__(
        self,
        size: int,
        seed: int,
        epoch: int,
        offset: int = 0,
        batch_size: int = 1,
        rank: int = 0,
        world_size: int = 1,
        neighbours: NeighbourGroups | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
        self.size, self.seed, self.epoch, self.offset = size, seed, epoch, offset
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.neighbours = neighbours

    def _steps(self) -> int:
        return max(self.size - self.offset, 0) // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)  # (S,)
        if self.neighbours is not None:
            order = self.neighbours.arrange(order)  # (S,)
        order = order[self.offset :]  # (S - offset,)
        steps = self._steps()
        span = steps * self.batch_size * self.world_size
        mine = order[:span].view(steps, self.world_size, self.batch_size)[:, self.rank]  # (T, B)
        return iter(mine.reshape(-1).tolist())

    def __len__(self) -> int:
        return self._steps() * self.batch_size


@dataclass
class TrainState:
    """Progress counters saved in every checkpoint, and the CPU thread count the run
    trains with (0: not set by the Trainer), which a resume keeps: float sums depend
    on it, and exact resume needs the same ones."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1
    world_size: int = 1
    threads: int = 0


class TrainingObjective(nn.Module):
    """The training loss of one batch as ONE forward pass: the unit that
    ``DistributedDataParallel`` wraps, so that it synchronises the gradients of
    everything the loss uses.

    ``forward(images, input_ids, attention_mask, hardest)`` returns
    ``(objective, loss, level_scores)``: the tensor to back-propagate, the loss value to
    report, and the detached ``(K, B, B)`` per-level batch scores for diagnostics
    (``(1, WB, WB)`` summed scores with the global-batch loss). The first two are the
    same number except with ``cfg.global_batch_loss`` in a process group of ``W``
    processes, where the objective is ``W * loss``: each process then back-propagates
    the global batch's loss into its own features only, and DDP's average of the ``W``
    gradients is the whole global batch's gradient
    (:func:`hat.losses.global_batch_scores`).

    ``log_temperature`` is the learnt temperature of ``cfg.loss == "infonce"`` (a
    parameter of the objective, saved in training checkpoints, not in the model).
    """

    def __init__(
        self,
        model: HAT,
        cfg: TrainConfig,
        device_type: str,
        amp: bool,
        amp_dtype: torch.dtype,
        text_cache: TextCache | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.device_type, self.amp, self.amp_dtype = device_type, amp, amp_dtype
        self.text_cache = text_cache
        learnt = cfg.loss == "infonce" and cfg.learn_temperature
        self.log_temperature = nn.Parameter(
            torch.tensor(math.log(cfg.temperature)), requires_grad=learnt
        )

    @property
    def temperature(self) -> Tensor:
        """The InfoNCE temperature, at least ``cfg.min_temperature``."""
        return self.log_temperature.exp().clamp_min(self.cfg.min_temperature)

    def score_loss(self, scores: Tensor, hardest: bool, caption_image: Tensor | None) -> Tensor:
        """The configured loss of one ``(B, C)`` batch score matrix (``caption_image``:
        each caption's image row; ``None``: positives on the diagonal): the hinge of
        ``cfg.margin`` or InfoNCE at the current temperature."""
        if self.cfg.loss == "infonce":
            return info_nce_loss(scores.float() / self.temperature, caption_image)
        return triplet_loss(
            scores.float(), self.cfg.margin, max_violation=hardest, caption_image=caption_image
        )

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> TextFeatures:
        if self.text_cache is None:
            return self.model.encode_text(input_ids, attention_mask)
        hidden = self.text_cache.lookup(input_ids, attention_mask)  # (B, L, H) per level
        return self.model.encode_text_hidden(hidden, attention_mask)

    def forward(
        self,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        hardest: bool,
        caption_image: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """images ``(B, 3, H, W)``, token ids and mask ``(C, L)``, each caption's image
        row ``(C,)`` (``None``: pairs, ``C == B``) -> ``(objective, loss, level_scores)``."""
        t = self.cfg
        spread = t.global_batch_loss and distributed.is_distributed()
        with torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.amp):
            img = self.model.encode_image(images)
            txt = self.encode_text(input_ids, attention_mask)
            if spread:
                scores, logits = global_batch_scores(img, txt, self.model.config)  # (WB, WB)
                levels = scores[None]  # (1, WB, WB)
            else:
                both = self.model.similarity(img, txt)
                scores, levels, logits = both.total, both.levels, None  # (B, C), (K, B, C)
        # spread + level loss or grouped captions: refused at setup
        loss = self.score_loss(scores, hardest, caption_image)
        if t.level_loss_weight > 0 and not spread:
            loss = loss + t.level_loss_weight * sum(
                self.score_loss(s, hardest, caption_image) for s in levels
            )
        if t.global_loss_weight > 0:
            if logits is None:
                logits = self.model.global_similarity(img, txt)  # (B, C)
            loss = loss + t.global_loss_weight * info_nce_loss(
                logits.float() / t.global_temperature, caption_image
            )
        scale = distributed.world_size() if spread else 1
        return loss * scale, loss.detach(), levels.detach()


def batch_diagnostics(
    level_scores: Tensor, margin: float, caption_image: Tensor | None = None
) -> dict[str, float]:
    """How far a batch's scores separate positives from negatives, per level and summed.

    ``level_scores``: ``(K, B, C)`` scores; ``caption_image``: each caption's image row
    ``(C,)`` (``None``: positives on the diagonal, ``B == C``). Each positive pair is two
    queries, its image and its caption. For each level ``levelk`` and for their sum
    ``hat``: ``_pos`` the mean positive score, ``_hardneg`` the mean over all ``2C``
    queries of the hardest negative (a caption not of the image; another image),
    ``_gap`` their difference, ``_active`` the share of (query, negative) pairs whose
    hinge ``margin + s_neg - s_pos`` is still positive. A level whose gap stays at 0
    with every score alike is dead; a collapse shows as the ``hat`` gap near 0.
    """
    k = level_scores.shape[0]
    named = {f"level{i + 1}": level_scores[i] for i in range(k)} if k > 1 else {}
    named["hat"] = level_scores.sum(dim=0)
    positives, rows = positive_mask(level_scores[0], caption_image)  # (B, C), (C,)
    own_negatives = ~positives[rows]  # (C, C): the captions that are not the pair's image's
    pairs = own_negatives.sum() + (~positives).sum()
    out = {}
    for name, s in named.items():
        s = s.float()
        pos = s.gather(0, rows[None, :])[0]  # (C,)
        negatives = s.masked_fill(positives, -torch.inf)  # (B, C)
        hardest = torch.cat([negatives.max(dim=1).values[rows], negatives.max(dim=0).values])
        hinge_images = (margin + s[rows] - pos[:, None] > 0) & own_negatives  # (C, C)
        hinge_captions = (margin + s - pos[None, :] > 0) & ~positives  # (B, C)
        active = (hinge_images.sum() + hinge_captions.sum()) / max(int(pairs), 1)
        out[f"{name}_pos"] = float(pos.mean())
        out[f"{name}_hardneg"] = float(hardest.mean())
        out[f"{name}_gap"] = float(pos.mean() - hardest.mean())
        out[f"{name}_active"] = float(active)
    return out


def _grad_norm(params: list[nn.Parameter]) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0


class Trainer:
    """Train HAT with the recipe of ``cfg.train`` on ``cfg.data``.

    Usage::

        trainer = Trainer(cfg, run_dir="runs/x")
        trainer.fit()

    ``resume=True`` loads ``run_dir/checkpoints/latest.pt`` and continues exactly
    where it stopped; ``cfg`` must then be the run's config (``run_dir/config.yaml``),
    possibly with more epochs. ``device`` (default: ``cfg.device``) follows the config's
    one rule (:func:`hat.config.resolve_device`).

    Under ``torchrun`` the Trainer joins the process group itself
    (:func:`hat.distributed.init_from_env`; leave it with
    :func:`hat.distributed.teardown`), ``cfg.train.batch_size`` is per process, and
    ``run_dir`` must be visible to every process for ``resume``. A run resumes on any
    number of processes from the end of an epoch; mid-epoch only on as many as it
    was saved with.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        run_dir: str | Path,
        device: str | None = None,
        resume: bool = False,
        progress: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.device = distributed.init_from_env(pick_device(device or cfg.device))
        self.is_main = distributed.is_main_process()
        self.progress = progress and self.is_main
        latest = self.ckpt_dir / "latest.pt"
        checkpoint = load_training_checkpoint(latest) if resume else None
        self.cfg = cfg
        if self.device.type == "cpu":
            # Denormal floats (tiny attention weights, Adam moments) are ~100x slower on
            # x86 CPUs and made long CPU runs crawl; flushing them to zero changes nothing
            # measurable in the scores.
            torch.set_flush_denormal(True)
        threads = self._set_threads(checkpoint)
        seed_everything(cfg.train.seed)
        self.state = TrainState(world_size=distributed.world_size(), threads=threads)
        self._setup()
        if distributed.is_distributed():
            # Same initial weights everywhere (seeded above); from here on each process
            # draws its own dropout.
            seed_everything(cfg.train.seed + distributed.rank())
        if checkpoint is not None:
            self.load_state(checkpoint)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / RUN_CONFIG)

    def _setup(self) -> None:
        cfg = self.cfg
        records = load_records(cfg.data)
        self.train_records = select_split(records, "train")
        self.val_records = select_split(records, cfg.train.val_split)
        if cfg.train.val_max_images:
            self.val_records = self.val_records[: cfg.train.val_max_images]
        self.model = HAT(cfg.model, pretrained=True).to(self.device)
        self.model.global_trained.fill_(cfg.train.global_loss_weight > 0)
        self.tokenizer = CaptionTokenizer.from_config(cfg.model.text)
        self.encoder = Encoder(self.model, self.device, self.tokenizer)
        spread = cfg.train.global_batch_loss and distributed.is_distributed()
        if cfg.train.level_loss_weight > 0 and spread:
            raise ConfigError(
                "train.level_loss_weight > 0 cannot be combined with train.global_batch_loss "
                "under torchrun: the global batch gathers summed scores only"
            )
        if cfg.data.skip_bad and spread:
            raise ConfigError(
                "data.skip_bad cannot be combined with train.global_batch_loss under torchrun: "
                "a skipped image would leave the processes with batches of different sizes; "
                "clean the data or turn one of them off"
            )
        if cfg.train.group_captions and spread:
            raise ConfigError(
                "train.group_captions cannot be combined with train.global_batch_loss under "
                "torchrun: the global batch gathers one caption per image"
            )
        dataset = ImageCaptionsDataset if cfg.train.group_captions else PairDataset
        cache = DecodedImages(cfg.data.image_cache_mb * 2**20) if cfg.data.image_cache_mb else None
        items = dataset(
            self.train_records,
            build_transform(cfg.model.image, train=True),
            skip_bad=cfg.data.skip_bad,
            cache=cache,
        )
        self.items = SeededItems(items, cfg.train.seed)
        self.collate = PairCollator(self.tokenizer)
        self.amp = cfg.train.amp and self.device.type == "cuda"
        self.amp_dtype = getattr(torch, cfg.train.amp_dtype)
        use_scaler = self.amp and self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.text_cache = self._text_cache()
        self.encoder.use_text_cache(self.text_cache)  # validation reads it too
        self.objective = TrainingObjective(
            self.model, cfg.train, self.device.type, self.amp, self.amp_dtype,
            text_cache=self.text_cache,
        )  # fmt: skip
        self.neighbours = self._neighbour_groups(items, self.text_cache)
        self.optimizer, self.scheduler = build_optimizer(
            [*self.model.parameters(), self.objective.log_temperature], cfg.train,
            self.steps_per_epoch(),
        )  # fmt: skip
        self._diagnostics: dict[str, float] = {}
        self._ddp: DistributedDataParallel | None = None
        self._ddp_trainable: tuple[bool, ...] = ()
        self._writer = None
        self._stop_signal: int | None = None

    def _set_threads(self, checkpoint: dict[str, Any] | None) -> int:
        """On the CPU without ``OMP_NUM_THREADS``: the resumed run's thread count, else
        :func:`pick_threads`; returns it (0 where the Trainer leaves threads alone)."""
        if self.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
            return 0
        saved = checkpoint["state"].get("threads", 0) if checkpoint is not None else 0
        threads = saved or pick_threads(self.cfg.train.num_threads)
        torch.set_num_threads(threads)
        log.info("training on %d CPU thread(s)%s", threads, " (as saved)" if saved else "")
        return threads

    def _text_cache(self) -> TextCache | None:
        """The frozen text backbone's hidden states of every training and validation
        caption (``train.cache_text``), or ``None``."""
        t = self.cfg.train
        if not t.cache_text:
            return None
        if 0 <= t.freeze_text_epochs < t.epochs:
            raise ConfigError(
                f"train.cache_text needs a text backbone frozen for the whole run "
                f"(train.freeze_text_epochs=-1), but train.freeze_text_epochs="
                f"{t.freeze_text_epochs} < train.epochs={t.epochs}"
            )
        start = time.perf_counter()
        captions = [c for r in self.train_records for c in r.captions]
        val = [c for r in self.val_records for c in r.captions]
        cache = TextCache(self.encoder, captions, t.eval_batch_size, extra=val)
        log.info(
            "text cache: %d captions, %.1f MiB, %.1f s",
            len(cache), cache.nbytes() / 2**20, time.perf_counter() - start,
        )  # fmt: skip
        return cache

    def _neighbour_groups(
        self, items: PairDataset, text_cache: TextCache | None
    ) -> NeighbourGroups | None:
        """The pairs' neighbours by cached caption state (``train.neighbour_group``)."""
        group = self.cfg.train.neighbour_group
        if group == 1 or text_cache is None:  # the config allows > 1 only with the cache
            return None
        start = time.perf_counter()
        pairs = items.pairs
        captions = [items.records[i].captions[j] for i, j in pairs]
        images = torch.tensor([i for i, _ in pairs])  # (S,)
        neighbours = NeighbourGroups(text_cache.mean_states(captions), images, group)
        log.info(
            "neighbour groups of %d over %d pairs: %.1f s",
            group, len(pairs), time.perf_counter() - start,
        )  # fmt: skip
        return neighbours

    def _loader(self, epoch: int, offset_steps: int) -> DataLoader:
        self.items.epoch = epoch
        batch, world = self.cfg.train.batch_size, distributed.world_size()
        sampler = EpochOrder(
            len(self.items), self.cfg.train.seed, epoch, offset_steps * batch * world,
            batch, distributed.rank(), world, self.neighbours,
        )  # fmt: skip
        return DataLoader(
            self.items,
            batch_size=batch,
            sampler=sampler,
            num_workers=self.cfg.data.num_workers,
            collate_fn=self.collate,
            drop_last=True,
            persistent_workers=False,
            # Its own generator: starting an epoch's iterator then draws nothing from the
            # global RNG, whose state (dropout) a mid-epoch checkpoint restores exactly.
            generator=torch.Generator().manual_seed(self.cfg.train.seed),
        )

    def steps_per_epoch(self) -> int:
        """Optimisation steps of one epoch: whole global batches, capped by
        ``max_steps_per_epoch``."""
        steps = len(self.items) // (self.cfg.train.batch_size * distributed.world_size())
        limit = self.cfg.train.max_steps_per_epoch
        return min(steps, limit) if limit else steps

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """ALL state of the run: model, optimiser, scheduler, scaler, counters, RNG, config.

        In a process group every process must call it (each one's RNG state is
        gathered under ``rng_per_rank``; ``rng`` is rank 0's).
        """
        rng = capture_rng_state()
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "log_temperature": self.objective.log_temperature.detach().clone(),
            "state": vars(self.state).copy(),
            "rng": rng,
            "config": config_to_dict(self.cfg),
        }
        if distributed.is_distributed():
            state["rng_per_rank"] = distributed.gather_objects(rng)
        return state

    def load_state(self, checkpoint: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s state; each process takes its own RNG state when
        the checkpoint was written by as many processes."""
        saved = TrainState(**checkpoint["state"])
        world = distributed.world_size()
        if saved.step_in_epoch and saved.world_size != world:
            raise CheckpointError(
                f"the checkpoint was saved mid-epoch by {saved.world_size} process(es); "
                f"resume it on as many (now {world}), or from the end of an epoch"
            )
        load_state_strict(self.model, checkpoint["model"], "training checkpoint")
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        if "log_temperature" in checkpoint:
            with torch.no_grad():
                self.objective.log_temperature.copy_(checkpoint["log_temperature"])
        self.state = dataclasses.replace(saved, world_size=world)
        per_rank = checkpoint.get("rng_per_rank")
        if per_rank is not None and len(per_rank) == world:
            restore_rng_state(per_rank[distributed.rank()])
        else:
            restore_rng_state(checkpoint["rng"])

    def save(self, name: str) -> Path:
        """Write ``checkpoints/{name}.pt`` (rank 0 writes; every process must call it)."""
        path = self.ckpt_dir / f"{name}.pt"
        state = self.state_dict()
        if self.is_main:
            save_training_checkpoint(path, state)
        distributed.barrier()
        return path

    # --------------------------------------------------------------- logging
    def _log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        if self._writer is None:
            with needs_extra("train"):
                from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tb"))
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        step = record["global_step"]
        for key, value in record.items():
            if isinstance(value, int | float) and key not in ("global_step", "epoch"):
                self._writer.add_scalar(key, value, step)

    @contextlib.contextmanager
    def _closing_writer(self) -> Iterator[None]:
        """Close the TensorBoard writer however training ends."""
        try:
            yield
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    # -------------------------------------------------------------- training
    def _freeze_for(self, epoch: int) -> None:
        self.model.set_backbones_trainable(**backbones_trainable(self.cfg.train, epoch))
        if not distributed.is_distributed():
            return
        # DDP synchronises the parameters that need gradients when it is built: build it
        # again whenever the freeze schedule changes that set.
        trainable = tuple(p.requires_grad for p in self.model.parameters())
        if self._ddp is None or trainable != self._ddp_trainable:
            self._ddp = DistributedDataParallel(
                self.objective,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                # The global heads take no gradient when their loss weight is 0.
                find_unused_parameters=self.cfg.train.global_loss_weight == 0,
            )
            self._ddp_trainable = trainable

    def train_step(self, batch: dict[str, torch.Tensor], diagnose: bool = False) -> float:
        """One optimisation step on a batch; returns the loss (in a process group, the
        mean over processes of their batch losses; with ``global_batch_loss``, the
        global batch's loss). With ``diagnose``, this step's :func:`batch_diagnostics`,
        gradient norms and temperature are kept for the log and the collapse warning."""
        t = self.cfg.train
        images = batch["images"].to(self.device, non_blocking=True)
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        mask = batch["attention_mask"].to(self.device, non_blocking=True)
        caption_image = batch["caption_image"].to(self.device, non_blocking=True)  # (C,)
        hardest = t.max_violation and self.state.epoch >= t.max_violation_warmup_epochs
        spread = t.global_batch_loss and distributed.is_distributed()  # (1, WB, WB) scores
        forward = self._ddp if self._ddp is not None else self.objective
        objective, loss, level_scores = forward(images, ids, mask, hardest, caption_image)
        loss = distributed.all_reduce_mean(loss)
        if not torch.isfinite(loss):
            latest = self.ckpt_dir / "latest.pt"
            kept = (
                f"the last good checkpoint, {latest}, is kept (continue with --resume)"
                if latest.is_file()
                else "no checkpoint was written yet"
            )
            raise TrainingDiverged(
                f"loss is {float(loss)} at epoch {self.state.epoch} step "
                f"{self.state.step_in_epoch}; stopped before the update, {kept}; "
                "a lower train.lr or train.grad_clip > 0 may help"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(objective).backward()
        if t.grad_clip > 0 or diagnose:
            self.scaler.unscale_(self.optimizer)
        if diagnose:
            self._diagnostics = {
                **batch_diagnostics(level_scores, t.margin, None if spread else caption_image),
                **self._gradient_norms(),
                "temperature": float(self.objective.temperature.detach()),
            }
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if t.lr_schedule == "cosine":
            self.scheduler.step()
        return loss.item()

    def _gradient_norms(self) -> dict[str, float]:
        """l2 norms of the gradients of each tower's backbone and of each level's two
        projections (``grad_image``, ``grad_text``, ``grad_levelk_image`` / ``_text``)."""
        towers = self.model.backbone_parameters()
        out = {f"grad_{tower}": _grad_norm(params) for tower, params in towers.items()}
        pairs = zip(self.model.image_tower.projections, self.model.text_tower.projections)
        for k, (image_proj, text_proj) in enumerate(pairs):
            out[f"grad_level{k + 1}_image"] = _grad_norm(list(image_proj.parameters()))
            out[f"grad_level{k + 1}_text"] = _grad_norm(list(text_proj.parameters()))
        return out

    def train_epoch(self) -> None:
        """Train from the current position to the end of the current epoch."""
        epoch, t = self.state.epoch, self.cfg.train
        self._freeze_for(epoch)
        self.model.train()
        total = self.steps_per_epoch()
        loader = self._loader(epoch, self.state.step_in_epoch)
        bar = tqdm(
            total=total, initial=self.state.step_in_epoch, desc=f"epoch {epoch + 1}/{t.epochs}",
            disable=not self.progress, dynamic_ncols=True,
        )  # fmt: skip
        start, seen, skipped = time.perf_counter(), 0, 0
        for batch in loader:
            if self.state.step_in_epoch >= total:
                break
            skipped += int(batch["skipped"])
            if batch["images"].shape[0] == 0:
                self._skip_empty_batch(epoch)
                bar.update()
                continue
            diagnose = (self.state.global_step + 1) % t.log_every == 0
            loss = self.train_step(batch, diagnose=diagnose)
            self.state.step_in_epoch += 1
            self.state.global_step += 1
            seen += batch["images"].shape[0] * distributed.world_size()
            rate = seen / max(time.perf_counter() - start, 1e-9)
            lr = self.optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", samples_s=f"{rate:.1f}")
            bar.update()
            if diagnose:
                self._log(
                    {"epoch": epoch, "global_step": self.state.global_step, "loss": loss,
                     "lr": lr, "samples_per_s": rate, **self._diagnostics}
                )  # fmt: skip
            if self._stop_requested():
                bar.close()
                self.save("latest")
                self._interrupt()
        bar.close()
        if skipped:
            unit = "images" if t.group_captions else "pairs"
            log.warning(
                "epoch %d: skipped %d %s whose image was unreadable (data.skip_bad)",
                epoch + 1, skipped, unit,
            )  # fmt: skip
            self._log({"epoch": epoch, "global_step": self.state.global_step,
                       f"skipped_{unit}": skipped})  # fmt: skip

    def _skip_empty_batch(self, epoch: int) -> None:
        """A batch whose every image was unreadable (``data.skip_bad``): no update, but
        the step counts, so that the resume position stays that of the sampler."""
        if distributed.is_distributed():
            raise DataError(
                f"epoch {epoch + 1} step {self.state.step_in_epoch}: every image of this "
                "process's batch was unreadable (data.skip_bad); the other processes cannot "
                "step without it: clean the data or use a larger train.batch_size"
            )
        self.state.step_in_epoch += 1
        self.state.global_step += 1

    # ---------------------------------------------------------- interruption
    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """While training, SIGTERM and SIGINT only ask the Trainer to stop after the
        current step (handlers can only be set from the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def ask_to_stop(signum: int, frame: object) -> None:
            self._stop_signal = signum

        previous = {s: signal.signal(s, ask_to_stop) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _stop_requested(self) -> bool:
        """Whether a stop signal reached this process (in a process group: any process;
        every process must ask at the same step)."""
        asked = self._stop_signal or 0
        return distributed.all_reduce_max(asked) > 0

    def _interrupt(self) -> None:
        signum = distributed.all_reduce_max(self._stop_signal or 0)
        raise TrainingInterrupted(
            f"stopped by {signal.Signals(signum).name} at epoch {self.state.epoch} step "
            f"{self.state.step_in_epoch}; saved {self.ckpt_dir / 'latest.pt'}; "
            "continue with --resume",
            signum,
        )

    def _warn_on_collapse(self, rsum: float, chance_rsum: float) -> bool:
        """Warn when validation stays within ``collapse_ratio`` x chance once the
        warm-ups are over; returns whether it warned."""
        t = self.cfg.train
        warmed_up = self.state.epoch > t.max_violation_warmup_epochs
        if not warmed_up or rsum >= t.collapse_ratio * chance_rsum or not self.is_main:
            return False
        diag = self._diagnostics
        gaps = ", ".join(
            f"{k.removesuffix('_gap')} {v:+.3f}" for k, v in diag.items() if k.endswith("_gap")
        )
        grads = ", ".join(f"{k.removeprefix('grad_')} {v:.2g}" for k, v in diag.items()
                          if k.startswith("grad_"))  # fmt: skip
        log.warning(
            "epoch %d: validation rSum %.1f is within %.1fx of chance (%.1f): the model is not "
            "learning or has collapsed. Last logged batch: positive-minus-hardest-negative gap "
            "%s; active hinges %.0f%%; gradient norms %s. Try: train.loss=infonce (every "
            "negative, learnt temperature), model.direction=t2i (words attend to regions; "
            "for images that are mostly background), a lower train.lr, or more "
            "train.max_violation_warmup_epochs; see metrics.jsonl / TensorBoard for the curves",
            self.state.epoch, rsum, t.collapse_ratio, chance_rsum, gaps or "n/a",
            100 * diag.get("hat_active", float("nan")), grads or "n/a",
        )  # fmt: skip
        self._log({"epoch": self.state.epoch, "global_step": self.state.global_step,
                   "collapse_warning": 1})  # fmt: skip
        return True

    def validate(self) -> EvalReport:
        """The validation split through the same :func:`~hat.evaluate.evaluate` as the test."""
        return evaluate(
            self.encoder,
            self.val_records,
            captions_per_image=self.cfg.data.captions_per_image,
            batch_size=self.cfg.train.eval_batch_size,
            num_workers=self.cfg.data.num_workers,
            progress=self.progress,
        )

    def fit(self) -> dict[str, Any]:
        """Train until ``cfg.train.epochs``, validating and checkpointing after each epoch.

        Returns a summary with the best epoch, its score and the last validation metrics.

        Raises:
            TrainingInterrupted: SIGTERM or SIGINT arrived; ``latest.pt`` was saved at
                the end of the step in progress, mid-epoch included.
            TrainingDiverged: the loss became NaN or infinite; nothing was saved.
        """
        t = self.cfg.train
        last: dict[str, float] = {}
        with self._stop_on_signals(), self._closing_writer():
            while self.state.epoch < t.epochs:
                self.train_epoch()
                report = self.validate()
                last = report.metrics["hat"]
                score = sum(last[m] for m in t.select_metric)
                if t.lr_schedule == "step":
                    self.scheduler.step()
                self.state.epoch += 1
                self.state.step_in_epoch = 0
                improved = score > self.state.best_score
                if improved:
                    self.state.best_score, self.state.best_epoch = score, self.state.epoch
                chance = chance_metrics(report.num_images, self.cfg.data.captions_per_image)
                self._log(
                    {"epoch": self.state.epoch, "global_step": self.state.global_step,
                     **{f"val_{k}": v for k, v in last.items()}, "val_select": score,
                     "val_chance_rsum": chance["rsum"]}
                )  # fmt: skip
                self._warn_on_collapse(last["rsum"], chance["rsum"])
                self.save("latest")
                if improved:
                    self.save("best")
                if self.state.epoch < t.epochs and self._stop_requested():
                    self._interrupt()
        return {
            "best_epoch": self.state.best_epoch,
            "best_score": self.state.best_score,
            "last_val": last,
            "run_dir": str(self.run_dir),
        }
