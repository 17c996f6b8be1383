"""The HAT model: two towers, their levels, and the summed alignment score.

Shape legend: ``N`` images, ``M`` captions, ``R`` regions of a level, ``L`` words
(padded), ``d`` joint width, ``K`` levels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hat import align
from hat.config import ModelConfig, get_preset, list_presets
from hat.encoders import ImageTower, TextTower
from hat.encoders.common import Projection

__all__ = [
    "HAT",
    "ImageFeatures",
    "Scores",
    "TextFeatures",
    "create_model",
    "list_models",
    "grouped_similarity",
    "similarity",
]


@dataclass
class ImageFeatures:
    """Projected image tokens per level.

    Attributes:
        levels: one ``(N, R_k, d)`` tensor per level (every token is valid).
        global_embedding: ``(N, g)`` l2-normalised global embedding for shortlisting.
    """

    levels: list[Tensor]
    global_embedding: Tensor

    def __len__(self) -> int:
        return self.levels[0].shape[0]

    def __getitem__(self, index: slice | Tensor) -> ImageFeatures:
        return ImageFeatures([t[index] for t in self.levels], self.global_embedding[index])

    def to(self, *args, **kwargs) -> ImageFeatures:
        return ImageFeatures(
            [t.to(*args, **kwargs) for t in self.levels], self.global_embedding.to(*args, **kwargs)
        )

    @staticmethod
    def cat(parts: Sequence[ImageFeatures]) -> ImageFeatures:
        return ImageFeatures(
            [torch.cat(ts) for ts in zip(*(p.levels for p in parts))],
            torch.cat([p.global_embedding for p in parts]),
        )


@dataclass
class TextFeatures:
    """Projected caption tokens per level and the captions' lengths.

    Attributes:
        levels: one ``(M, L, d)`` tensor per level; positions ``>= lengths`` are padding.
        lengths: ``(M,)`` number of valid tokens, ``[CLS]`` and ``[SEP]`` included.
        global_embedding: ``(M, g)`` l2-normalised global embedding for shortlisting.
    """

    levels: list[Tensor]
    lengths: Tensor
    global_embedding: Tensor

    def __len__(self) -> int:
        return self.lengths.shape[0]

    def __getitem__(self, index: slice | Tensor) -> TextFeatures:
        lengths = self.lengths[index]
        longest = int(lengths.max()) if lengths.numel() else 0
        return TextFeatures(
            [t[index, :longest] for t in self.levels], lengths, self.global_embedding[index]
        )

    def to(self, *args, **kwargs) -> TextFeatures:
        """Move/cast the token and global tensors; lengths stay integer on the CPU side's device."""
        levels = [t.to(*args, **kwargs) for t in self.levels]
        device = levels[0].device
        return TextFeatures(
            levels, self.lengths.to(device), self.global_embedding.to(*args, **kwargs)
        )

    @staticmethod
    def cat(parts: Sequence[TextFeatures]) -> TextFeatures:
        longest = max(p.levels[0].shape[1] for p in parts)
        levels = [
            torch.cat([nn.functional.pad(t, (0, 0, 0, longest - t.shape[1])) for t in ts])
            for ts in zip(*(p.levels for p in parts))
        ]
        return TextFeatures(
            levels,
            torch.cat([p.lengths for p in parts]),
            torch.cat([p.global_embedding for p in parts]),
        )


@dataclass
class Scores:
    """Alignment scores of every image against every caption.

    Attributes:
        levels: ``(K, N, M)`` score of each level.
        total: ``(N, M)`` HAT's score, the plain sum over levels.
    """

    levels: Tensor
    total: Tensor


class HAT(nn.Module):
    """Hierarchical Alignment Transformers.

    Build it with :func:`create_model` (a named preset) or from a
    :class:`~hat.config.ModelConfig`. ``pretrained`` loads the backbones from the
    local paths in the config; without it both towers are randomly initialised.
    """

    def __init__(self, cfg: ModelConfig, pretrained: bool = False) -> None:
        super().__init__()
        self.config = cfg
        stages = tuple(level.image_stage for level in cfg.levels)
        layers = tuple(level.text_layer for level in cfg.levels)
        self.image_tower = ImageTower(
            cfg.image, stages, cfg.embed_dim, cfg.proj_init_std, pretrained=pretrained
        )
        self.text_tower = TextTower(
            cfg.text, layers, cfg.embed_dim, cfg.proj_init_std, pretrained=pretrained
        )
        self.image_global = Projection(cfg.embed_dim, cfg.global_dim, cfg.proj_init_std)
        self.text_global = Projection(cfg.embed_dim, cfg.global_dim, cfg.proj_init_std)
        # Whether the global heads were trained for the towers they sit on (by
        # ``train.global_loss_weight > 0`` or :func:`hat.global_heads.fit_global_heads`);
        # saved with the weights, so an imported or InfoNCE-free model is known to have
        # random heads and search does not shortlist with them.
        self.register_buffer("global_trained", torch.zeros((), dtype=torch.bool))

    @property
    def num_levels(self) -> int:
        return len(self.config.levels)

    def encode_image(self, images: Tensor) -> ImageFeatures:
        """images ``(N, 3, H, W)`` normalised -> per-level ``(N, R_k, d)`` tokens and the
        ``(N, g)`` global embedding."""
        levels = self.image_tower(images)
        return ImageFeatures(levels, self.image_global_embedding(self.pool_image(levels)))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> TextFeatures:
        """token ids and mask ``(M, L)`` -> per-level ``(M, L, d)`` tokens, lengths and the
        ``(M, g)`` global embedding."""
        return self.encode_text_hidden(
            self.text_tower.layer_tokens(input_ids, attention_mask), attention_mask
        )

    def encode_text_hidden(self, hidden: list[Tensor], attention_mask: Tensor) -> TextFeatures:
        """The text backbone's ``(M, L, H)`` hidden states of each level's layer (what
        ``text_tower.layer_tokens`` gives, or a cache of it) and the ``(M, L)`` mask ->
        the features :meth:`encode_text` returns."""
        levels = self.text_tower.project(hidden)
        pooled = self.pool_text(levels, attention_mask)
        return TextFeatures(levels, attention_mask.sum(dim=1), self.text_global_embedding(pooled))

    def pool_image(self, levels: list[Tensor]) -> Tensor:
        """``(N, d)`` mean of level ``global_level``'s ``(N, R, d)`` projected tokens."""
        return levels[self.config.global_level].mean(dim=1)

    def pool_text(self, levels: list[Tensor], attention_mask: Tensor) -> Tensor:
        """``(M, d)`` mean of level ``global_level``'s ``(M, L, d)`` projected tokens over
        the words of the ``(M, L)`` attention mask."""
        mask = attention_mask.to(levels[0].dtype)[:, :, None]  # (M, L, 1)
        tokens = levels[self.config.global_level]  # (M, L, d)
        return (tokens * mask).sum(dim=1) / mask.sum(dim=1)

    def image_global_embedding(self, pooled: Tensor) -> Tensor:
        """``(N, d)`` pooled tokens -> ``(N, g)`` l2-normalised global embeddings."""
        return F.normalize(self.image_global(pooled), dim=-1)

    def text_global_embedding(self, pooled: Tensor) -> Tensor:
        """``(M, d)`` pooled tokens -> ``(M, g)`` l2-normalised global embeddings."""
        return F.normalize(self.text_global(pooled), dim=-1)

    @property
    def has_trained_global(self) -> bool:
        """Whether the global embeddings are worth shortlisting with (see ``global_trained``)."""
        return bool(self.global_trained)

    def similarity(
        self, images: ImageFeatures, captions: TextFeatures, block_bytes: int | None = None
    ) -> Scores:
        """Per-level and summed scores of all image/caption pairs: ``(K, N, M)`` and ``(N, M)``."""
        return similarity(images, captions, self.config, block_bytes)

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Scores:
        """Scores of a batch of images against a batch of captions."""
        return self.similarity(
            self.encode_image(images), self.encode_text(input_ids, attention_mask)
        )

    @staticmethod
    def global_similarity(images: ImageFeatures, captions: TextFeatures) -> Tensor:
        """``(N, M)`` cosine of the global embeddings (the shortlisting score)."""
        return images.global_embedding @ captions.global_embedding.T

    def backbone_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameters frozen by the freeze schedule, per tower (``image``, ``text``)."""
        return {
            "image": self.image_tower.backbone_parameters(),
            "text": self.text_tower.backbone_parameters(),
        }

    def set_backbones_trainable(self, image: bool, text: bool) -> None:
        """Freeze or unfreeze each tower's backbone; projections always train."""
        for tower, flag in (("image", image), ("text", text)):
            for p in self.backbone_parameters()[tower]:
                p.requires_grad_(flag)


def similarity(
    images: ImageFeatures,
    captions: TextFeatures,
    cfg: ModelConfig,
    block_bytes: int | None = None,
) -> Scores:
    """HAT's scores of all image/caption pairs under ``cfg``'s alignment settings.

    The alignment has no parameters, so scoring needs the config only, not the model.
    Returns per-level ``(K, N, M)`` and summed ``(N, M)`` scores.
    """
    kwargs = {} if block_bytes is None else {"block_bytes": block_bytes}

    def level_score(img: Tensor, cap: Tensor) -> Tensor:
        if cfg.alignment == "mean_pool":
            return align.pooled_similarity(img, cap, captions.lengths)
        return align.similarity(
            img, cap, captions.lengths, cfg.direction, cfg.lambda_softmax, **kwargs
        )

    per_level = torch.stack(
        [level_score(img, cap) for img, cap in zip(images.levels, captions.levels)]
    )  # (K, N, M)
    return Scores(levels=per_level, total=per_level.sum(dim=0))


def grouped_similarity(
    image_levels: list[Tensor],
    caption_levels: list[Tensor],
    caption_lengths: Tensor,
    cfg: ModelConfig,
) -> Tensor:
    """``(K, Q, A, B)`` per-level scores of ``Q`` groups, each of ``A`` images
    (``(Q, A, R_k, d)`` per level) against its own ``B`` captions (``(Q, B, L, d)`` per
    level, lengths ``(Q, B)``): the entries :func:`similarity` gives for those pairs,
    without the pairs across groups (:func:`hat.align.grouped_similarity`)."""

    def level_score(img: Tensor, cap: Tensor) -> Tensor:
        if cfg.alignment == "mean_pool":
            q, a, r, d = img.shape
            _, b, length, _ = cap.shape
            image_mean, caption_mean = align.pooled_embeddings(
                img.reshape(q * a, r, d), cap.reshape(q * b, length, d), caption_lengths.reshape(-1)
            )
            return image_mean.view(q, a, d) @ caption_mean.view(q, b, d).transpose(1, 2)
        return align.grouped_similarity(
            img, cap, caption_lengths, cfg.direction, cfg.lambda_softmax
        )  # (Q, A, B)

    return torch.stack([level_score(i, c) for i, c in zip(image_levels, caption_levels)])


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return list_presets()


def create_model(name: str, pretrained: bool = False, **overrides) -> HAT:
    """Build the HAT model of a named preset (``paper``, ``cpu``, ``tiny``).

    ``overrides`` replace top-level :class:`~hat.config.ModelConfig` fields, e.g.
    ``create_model("tiny", lambda_softmax=4.0)``.
    """
    cfg = dataclasses.replace(get_preset(name).model, **overrides)
    return HAT(cfg, pretrained=pretrained)
