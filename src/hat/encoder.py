"""One Encoder: a model with its tokenizer, evaluation transform and device.

Evaluation, the index (build and search), fitting the global heads, explanations
and the server all turn images and captions into features through an
:class:`Encoder`, so the tokenizer and the evaluation transform are built in one
place, next to the model they belong to::

    encoder = hat.Encoder.load("runs/demo/model")           # or Encoder(model, device)
    images = encoder.encode_images(records)                 # ImageFeatures, on the CPU
    captions = encoder.encode_captions(["a red circle"])    # TextFeatures
    scores = encoder.scorer().all_pairs(images, captions)   # Scores (K, N, M), (N, M)

Under ``torchrun`` :meth:`Encoder.encode_images` and :meth:`Encoder.encode_captions`
share the work: each process encodes a run of whole batches (the batches one
process would use) and every process gets all features, in order.

Shape legend: ``N`` images, ``M`` captions, ``B`` batch, ``L`` words, ``d`` joint width.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from hat import distributed
from hat.align import mean_words
from hat.config import ModelConfig, RetrievalConfig
from hat.features import ImageFeatures, TextFeatures
from hat.scorer import Scorer

if TYPE_CHECKING:
    from PIL import Image

    from hat.data import CaptionTokenizer, ImageRecord
    from hat.model import HAT

__all__ = ["Encoder", "TextCache", "load_any_model"]

DEFAULT_BATCH_SIZE = 64


class Encoder:
    """A :class:`~hat.model.HAT` in evaluation mode on ``device`` with the caption
    tokenizer of its text tower and the evaluation transform of its image tower.

    Every ``encode_*`` method runs without gradients, with the model in evaluation mode
    (its mode is restored after), and returns features on the CPU.
    """

    def __init__(
        self,
        model: HAT,
        device: str | torch.device = "cpu",
        tokenizer: CaptionTokenizer | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self._tokenizer = tokenizer
        self._transform: Callable | None = None
        self._text_cache: TextCache | None = None

    def use_text_cache(self, cache: TextCache | None) -> None:
        """Read the text backbone's hidden states of the captions ``cache`` holds from it
        instead of recomputing them (:meth:`text_hidden`); ``None`` stops that.

        Raises:
            ValueError: the cache was computed by a text backbone with other weights.
        """
        from hat.checkpoint import module_fingerprint

        if cache is not None and cache.backbone_digest != module_fingerprint(
            self.model.text_tower.encoder
        ):
            raise ValueError(
                "the text cache was computed by a text backbone with other weights than "
                "this encoder's model: its hidden states would be wrong here"
            )
        self._text_cache = cache

    def text_hidden(self, input_ids: Tensor, attention_mask: Tensor) -> list[Tensor]:
        """``(B, L)`` token ids and mask -> the text backbone's ``(B, L, H)`` hidden
        states of each level's layer, from the text cache when it holds every caption of
        the batch, else computed."""
        cache = self._text_cache
        cached = None if cache is None else cache.get(input_ids, attention_mask)
        if cached is not None:
            return [h.to(self.device) for h in cached]
        return self.model.text_tower.layer_tokens(input_ids, attention_mask)

    @classmethod
    def load(cls, source: str | os.PathLike | HAT, device: str | torch.device = "cpu") -> Encoder:
        """An encoder for a model directory, a run or checkpoint (its best model), or a
        loaded model (see :func:`hat.checkpoint.resolve_model`)."""
        return cls(load_any_model(source), device)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def tokenizer(self) -> CaptionTokenizer:
        """The caption tokenizer of the model's text tower (built at first use)."""
        if self._tokenizer is None:
            from hat.data import CaptionTokenizer

            self._tokenizer = CaptionTokenizer.from_config(self.config.text)
        return self._tokenizer

    @property
    def transform(self) -> Callable:
        """PIL image -> ``(3, H, W)`` normalised tensor: the evaluation transform."""
        if self._transform is None:
            from hat.data import build_transform

            self._transform = build_transform(self.config.image, train=False)
        return self._transform

    def scorer(self, retrieval: RetrievalConfig = RetrievalConfig()) -> Scorer:
        """The :class:`~hat.scorer.Scorer` of this model on this device."""
        budget = int(retrieval.block_mb * 2**20) if retrieval.block_mb else None
        return Scorer(self.config, self.device, retrieval.compute_dtype, budget)

    # -- batches ----------------------------------------------------------------------
    def image_batches(
        self,
        records: Sequence[ImageRecord],
        batch_size: int = DEFAULT_BATCH_SIZE,
        num_workers: int = 0,
        progress: bool = False,
    ) -> Iterator[Tensor]:
        """The records' images in order, transformed, as ``(B, 3, H, W)`` on the device."""
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        from hat.data import ImageDataset, image_collate

        loader = DataLoader(
            ImageDataset(records, self.transform),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=image_collate,
        )
        for batch in tqdm(loader, desc="encode images", disable=not progress, leave=False):
            yield batch["images"].to(self.device)

    def caption_batches(
        self, captions: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """The captions in order as ``(B, L)`` token ids and attention masks on the device."""
        from tqdm.auto import tqdm

        starts = range(0, len(captions), batch_size)
        for start in tqdm(starts, desc="encode captions", disable=not progress, leave=False):
            batch = self.tokenizer(list(captions[start : start + batch_size]))
            yield batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    # -- features ---------------------------------------------------------------------
    @contextmanager
    def _inference(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def encode_pixels(self, pixels: Tensor) -> ImageFeatures:
        """Features of one batch of transformed images ``(B, 3, H, W)``."""
        with self._inference():
            return self.model.encode_image(pixels.to(self.device)).to("cpu")

    def encode_image(self, image: Image.Image) -> ImageFeatures:
        """Features of one PIL image (one row)."""
        return self.encode_pixels(self.transform(image.convert("RGB"))[None])

    def encode_images(
        self,
        records: Sequence[ImageRecord],
        batch_size: int = DEFAULT_BATCH_SIZE,
        num_workers: int = 0,
        storage_dtype: torch.dtype = torch.float32,
        progress: bool = False,
    ) -> ImageFeatures:
        """Per-level tokens and global embeddings of every record's image, in order, on
        the CPU in ``storage_dtype``; shared out under ``torchrun``."""

        def encode(part: Sequence[ImageRecord]) -> ImageFeatures:
            batches = self.image_batches(part, batch_size, num_workers, progress)
            return ImageFeatures.cat(
                [self.model.encode_image(b).to("cpu", storage_dtype) for b in batches]
            )

        with self._inference():
            return _shared(records, batch_size, encode, _gather_images, self.config)

    def encode_captions(
        self,
        captions: Sequence[str],
        batch_size: int = DEFAULT_BATCH_SIZE,
        storage_dtype: torch.dtype = torch.float32,
        progress: bool = False,
    ) -> TextFeatures:
        """Per-level tokens, lengths and global embeddings of every caption, in order, on
        the CPU in ``storage_dtype``; shared out under ``torchrun``."""

        def encode(part: Sequence[str]) -> TextFeatures:
            batches = self.caption_batches(part, batch_size, progress)
            return TextFeatures.cat(
                [
                    self.model.encode_text_hidden(self.text_hidden(i, m), m).to(
                        "cpu", storage_dtype
                    )
                    for i, m in batches
                ]
            )

        with self._inference():
            return _shared(captions, batch_size, encode, _gather_captions, self.config)

    def pooled_images(
        self,
        records: Sequence[ImageRecord],
        batch_size: int = DEFAULT_BATCH_SIZE,
        num_workers: int = 0,
        progress: bool = False,
    ) -> Tensor:
        """``(N, d)`` pooled tokens of level ``global_level`` (the global head's input)."""
        batches = self.image_batches(records, batch_size, num_workers, progress)
        with self._inference():
            return torch.cat(
                [self.model.pool_image(self.model.image_tower(b)).float().cpu() for b in batches]
            )

    def pooled_captions(
        self, captions: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False
    ) -> Tensor:
        """``(M, d)`` pooled tokens of level ``global_level`` of every caption."""
        batches = self.caption_batches(captions, batch_size, progress)
        with self._inference():
            return torch.cat(
                [
                    self.model.pool_text(self.model.text_tower.project(self.text_hidden(i, m)), m)
                    .float()
                    .cpu()
                    for i, m in batches
                ]
            )

    def caption_tokens(self, caption: str) -> tuple[dict[str, Tensor], list[str], list[int]]:
        """One tokenised caption, its valid tokens as strings and the positions of its
        non-special tokens (every position when all are special)."""
        batch = self.tokenizer([caption])
        length = int(batch["attention_mask"][0].sum())
        ids = batch["input_ids"][0, :length].tolist()
        tokens = self.tokenizer.tokenizer.convert_ids_to_tokens(ids)
        special = set(self.tokenizer.tokenizer.all_special_ids)
        shown = [i for i, token_id in enumerate(ids) if token_id not in special]
        return batch, tokens, shown or list(range(length))


class TextCache:
    """Hidden states of a FROZEN text backbone, computed once per distinct caption.

    ``train.cache_text``: the backbone runs once over every training and validation
    caption in eval mode (no dropout) and keeps, per level, each caption's ``(L_c, H)``
    hidden states packed one after another in float32; :meth:`lookup` gives a batch's
    states padded as the tokenizer padded the batch. The projections on top still
    train, so :meth:`HAT.encode_text_hidden` of a lookup equals :meth:`HAT.encode_text`
    of an eval-mode backbone, to float rounding (padding positions differ, and never
    count). Training reads it, and so does every :class:`Encoder` given it
    (:meth:`Encoder.use_text_cache`) whose backbone has the same weights
    (``backbone_digest``, :func:`hat.checkpoint.module_fingerprint`): validation, and
    fitting the global heads after training.
    """

    def __init__(
        self,
        encoder: Encoder,
        captions: Sequence[str],
        batch_size: int,
        extra: Sequence[str] = (),
    ) -> None:
        """``extra`` (validation's captions) are encoded after ``captions``, in batches
        of their own, so that adding them changes none of the states ``captions`` get."""
        from hat.checkpoint import module_fingerprint

        model = encoder.model
        backbone = model.text_tower.encoder
        self.backbone_digest = module_fingerprint(backbone)
        self.device = encoder.device
        # Each group's distinct captions by length: batches of one length, no padding to
        # compute through.
        groups: list[list[str]] = []
        total = 0  # tokens of every distinct caption
        seen: set[str] = set()
        for group in (captions, extra):
            distinct = sorted(set(group) - seen)
            seen.update(distinct)
            if distinct:
                lengths = encoder.tokenizer(distinct)["attention_mask"].sum(dim=1).tolist()
                groups.append([c for _, c in sorted(zip(lengths, distinct))])
                total += sum(lengths)
        width = backbone.config.hidden_size
        # Filled in place: the last row stays zero, what padding positions read.
        self.levels = [torch.zeros(total + 1, width) for _ in model.config.levels]  # (T + 1, H)
        self.pad_row = total
        self._means = torch.zeros(len(seen), width)  # (distinct captions, H)
        self._mean_row = {c: i for i, c in enumerate(c for g in groups for c in g)}
        self._rows: dict[tuple[int, ...], int] = {}  # token ids -> first row in levels
        offset, first = 0, 0
        was_training = backbone.training
        backbone.eval()
        with torch.no_grad():
            for group in groups:
                for ids, mask in encoder.caption_batches(group, batch_size):
                    hidden = model.text_tower.layer_tokens(ids, mask)  # (B, L, H) per level
                    valid = mask.bool().reshape(-1)  # (B * L,)
                    tokens = int(valid.sum())
                    for level, h in zip(self.levels, hidden):  # the valid tokens, row-major
                        level[offset : offset + tokens] = h.float().reshape(-1, width)[valid]
                    lengths = mask.sum(dim=1)  # (B,)
                    self._means[first : first + len(ids)] = mean_words(hidden[-1].float(), lengths)
                    for row, length in enumerate(lengths.tolist()):
                        self._rows[tuple(ids[row, :length].tolist())] = offset
                        offset += length
                    first += len(ids)
        backbone.train(was_training)

    def __len__(self) -> int:
        return len(self._rows)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.levels)

    def mean_states(self, captions: list[str]) -> Tensor:
        """The top level's hidden states of each caption averaged over its tokens:
        ``(len(captions), H)`` on the CPU."""
        try:
            rows = [self._mean_row[c] for c in captions]
        except KeyError as err:
            raise KeyError("a caption outside the text cache (train.cache_text)") from err
        return self._means[rows]

    def get(self, input_ids: Tensor, attention_mask: Tensor) -> list[Tensor] | None:
        """``(B, L)`` token ids and mask -> one ``(B, L, H)`` hidden-state tensor per
        level on the cache's device, or ``None`` when a caption of the batch is not in
        the cache."""
        lengths = attention_mask.sum(dim=1).tolist()
        starts = [self._rows.get(tuple(ids[:n].tolist())) for ids, n in zip(input_ids, lengths)]
        if None in starts:
            return None
        positions = torch.arange(input_ids.shape[1])  # (L,)
        index = torch.tensor(starts)[:, None] + positions[None, :]  # (B, L)
        index = torch.where(attention_mask.cpu().bool(), index, self.pad_row)  # (B, L)
        return [level[index].to(self.device) for level in self.levels]

    def lookup(self, input_ids: Tensor, attention_mask: Tensor) -> list[Tensor]:
        """:meth:`get` of a batch of cached captions.

        Raises:
            KeyError: a caption of the batch is not in the cache.
        """
        hidden = self.get(input_ids, attention_mask)
        if hidden is None:
            raise KeyError("a caption outside the text cache (train.cache_text)")
        return hidden


def load_any_model(source: str | os.PathLike | HAT) -> HAT:
    """``source`` itself when it is a loaded model, else the model at that path
    (:func:`hat.checkpoint.resolve_model`)."""
    from hat.checkpoint import resolve_model
    from hat.model import HAT

    return source if isinstance(source, HAT) else resolve_model(source)


def _shared(items: Sequence, batch_size: int, encode: Callable, gather: Callable, cfg):
    """``encode(items)``, or under ``torchrun`` each process's run of whole batches
    encoded and ``gather``-ed in rank order, so every process gets one process's result."""
    if not distributed.is_distributed():
        return encode(items)
    lo, hi = distributed.shard_bounds(
        len(items), batch_size, distributed.rank(), distributed.world_size()
    )
    return gather(encode(items[lo:hi]) if hi > lo else None, len(cfg.levels))


def _present(parts: list[Tensor | None]) -> list[Tensor]:
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
