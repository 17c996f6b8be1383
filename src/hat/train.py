"""The training recipe: setup, train, validate, save, load, resume.

Every choice of the recipe (optimiser, schedule, freezing, margin, AMP, batch) is
read from :class:`~hat.config.TrainConfig`. A run folder holds::

    config.yaml              the final config of the run
    checkpoints/latest.pt    all state after the last finished epoch (or step)
    checkpoints/best.pt      the same at the best validation epoch
    metrics.jsonl            one JSON object per logged step and per validation
    tb/                      TensorBoard events
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from hat.checkpoint import (
    capture_rng_state,
    load_state_strict,
    load_training_checkpoint,
    restore_rng_state,
    save_training_checkpoint,
)
from hat.config import ExperimentConfig, config_to_dict, save_config
from hat.data import (
    CaptionTokenizer,
    PairCollator,
    PairDataset,
    build_transform,
    load_records,
    select_split,
)
from hat.evaluate import EvalReport, evaluate
from hat.losses import info_nce_loss, triplet_loss
from hat.model import HAT

__all__ = ["Trainer", "TrainingDiverged", "pick_device", "seed_everything"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def pick_device(name: str | None = None) -> torch.device:
    """``name`` when given, else the best available of cuda, mps and cpu."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class SeededPairs(Dataset):
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


class EpochOrder(Sampler[int]):
    """A permutation fixed by (seed, epoch), started at ``offset`` items for mid-epoch resume."""

    def __init__(self, size: int, seed: int, epoch: int, offset: int = 0) -> None:
        self.size, self.seed, self.epoch, self.offset = size, seed, epoch, offset

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator)[self.offset :].tolist())

    def __len__(self) -> int:
        return self.size - self.offset


@dataclass
class TrainState:
    """Progress counters saved in every checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1


class Trainer:
    """Train HAT with the recipe of ``cfg.train`` on ``cfg.data``.

    Usage::

        trainer = Trainer(cfg, run_dir="runs/x")
        trainer.fit()

    ``resume=True`` loads ``run_dir/checkpoints/latest.pt`` and continues exactly
    where it stopped; ``cfg`` must then be the run's config (``run_dir/config.yaml``),
    possibly with more epochs.
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
        self.progress = progress
        latest = self.ckpt_dir / "latest.pt"
        checkpoint = load_training_checkpoint(latest) if resume else None
        self.cfg = cfg
        self.device = pick_device(device)
        if self.device.type == "cpu":
            # Denormal floats (tiny attention weights, Adam moments) are ~100x slower on
            # x86 CPUs and made long CPU runs crawl; flushing them to zero changes nothing
            # measurable in the scores.
            torch.set_flush_denormal(True)
        seed_everything(cfg.train.seed)
        self.state = TrainState()
        self._setup()
        if checkpoint is not None:
            self.load_state(checkpoint)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.yaml")

    def _setup(self) -> None:
        cfg = self.cfg
        records = load_records(cfg.data)
        self.train_records = select_split(records, "train")
        self.val_records = select_split(records, cfg.train.val_split)
        self.model = HAT(cfg.model, pretrained=True).to(self.device)
        self.tokenizer = CaptionTokenizer.from_config(cfg.model.text)
        pairs = PairDataset(self.train_records, build_transform(cfg.model.image, train=True))
        self.pairs = SeededPairs(pairs, cfg.train.seed)
        self.collate = PairCollator(self.tokenizer)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=cfg.train.lr_step_epochs, gamma=cfg.train.lr_gamma
        )
        self.amp = cfg.train.amp and self.device.type == "cuda"
        self.amp_dtype = getattr(torch, cfg.train.amp_dtype)
        use_scaler = self.amp and self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self._writer = None

    def _loader(self, epoch: int, offset_steps: int) -> DataLoader:
        self.pairs.epoch = epoch
        batch = self.cfg.train.batch_size
        sampler = EpochOrder(len(self.pairs), self.cfg.train.seed, epoch, offset_steps * batch)
        return DataLoader(
            self.pairs,
            batch_size=batch,
            sampler=sampler,
            num_workers=self.cfg.data.num_workers,
            collate_fn=self.collate,
            drop_last=True,
            persistent_workers=False,
        )

    def steps_per_epoch(self) -> int:
        steps = len(self.pairs) // self.cfg.train.batch_size
        limit = self.cfg.train.max_steps_per_epoch
        return min(steps, limit) if limit else steps

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """ALL state of the run: model, optimiser, scheduler, scaler, counters, RNG, config."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "state": vars(self.state).copy(),
            "rng": capture_rng_state(),
            "config": config_to_dict(self.cfg),
        }

    def load_state(self, checkpoint: dict[str, Any]) -> None:
        load_state_strict(self.model, checkpoint["model"], "training checkpoint")
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.state = TrainState(**checkpoint["state"])
        restore_rng_state(checkpoint["rng"])

    def save(self, name: str) -> Path:
        path = self.ckpt_dir / f"{name}.pt"
        save_training_checkpoint(path, self.state_dict())
        return path

    # --------------------------------------------------------------- logging
    def _log(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tb"))
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        step = record["global_step"]
        for key, value in record.items():
            if isinstance(value, int | float) and key not in ("global_step", "epoch"):
                self._writer.add_scalar(key, value, step)

    # -------------------------------------------------------------- training
    def _freeze_for(self, epoch: int) -> None:
        t = self.cfg.train
        self.model.set_backbones_trainable(
            image=epoch >= t.freeze_image_epochs, text=epoch >= t.freeze_text_epochs
        )

    def train_step(self, batch: dict[str, torch.Tensor]) -> float:
        """One optimisation step on a batch; returns the loss."""
        t = self.cfg.train
        images = batch["images"].to(self.device, non_blocking=True)
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        mask = batch["attention_mask"].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            img = self.model.encode_image(images)
            txt = self.model.encode_text(ids, mask)
            scores = self.model.similarity(img, txt)
        hardest = t.max_violation and self.state.epoch >= t.max_violation_warmup_epochs
        loss = triplet_loss(scores.total.float(), margin=t.margin, max_violation=hardest)
        if t.global_loss_weight > 0:
            logits = self.model.global_similarity(img, txt).float() / t.global_temperature
            loss = loss + t.global_loss_weight * info_nce_loss(logits)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss is {float(loss)} at epoch {self.state.epoch} step "
                f"{self.state.step_in_epoch}; the last good checkpoint is "
                f"{self.ckpt_dir / 'latest.pt'}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if t.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.item()

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
        start, seen = time.perf_counter(), 0
        for batch in loader:
            if self.state.step_in_epoch >= total:
                break
            loss = self.train_step(batch)
            self.state.step_in_epoch += 1
            self.state.global_step += 1
            seen += batch["images"].shape[0]
            rate = seen / max(time.perf_counter() - start, 1e-9)
            lr = self.optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", samples_s=f"{rate:.1f}")
            bar.update()
            if self.state.global_step % t.log_every == 0:
                self._log(
                    {"epoch": epoch, "global_step": self.state.global_step, "loss": loss,
                     "lr": lr, "samples_per_s": rate}
                )  # fmt: skip
        bar.close()

    def validate(self) -> EvalReport:
        """The validation split through the same :func:`~hat.evaluate.evaluate` as the test."""
        return evaluate(
            self.model,
            self.val_records,
            self.tokenizer,
            self.device,
            captions_per_image=self.cfg.data.captions_per_image,
            batch_size=self.cfg.train.eval_batch_size,
            num_workers=self.cfg.data.num_workers,
            progress=self.progress,
        )

    def fit(self) -> dict[str, Any]:
        """Train until ``cfg.train.epochs``, validating and checkpointing after each epoch.

        Returns a summary with the best epoch, its score and the last validation metrics.
        """
        t = self.cfg.train
        last: dict[str, float] = {}
        while self.state.epoch < t.epochs:
            self.train_epoch()
            report = self.validate()
            last = report.metrics["hat"]
            score = sum(last[m] for m in t.select_metric)
            self.scheduler.step()
            self.state.epoch += 1
            self.state.step_in_epoch = 0
            improved = score > self.state.best_score
            if improved:
                self.state.best_score, self.state.best_epoch = score, self.state.epoch
            self._log(
                {"epoch": self.state.epoch, "global_step": self.state.global_step,
                 **{f"val_{k}": v for k, v in last.items()}, "val_select": score}
            )  # fmt: skip
            self.save("latest")
            if improved:
                self.save("best")
        if self._writer is not None:
            self._writer.close()
        return {
            "best_epoch": self.state.best_epoch,
            "best_score": self.state.best_score,
            "last_val": last,
            "run_dir": str(self.run_dir),
        }
