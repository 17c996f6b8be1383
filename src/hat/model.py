"""The HAT model: two towers, their levels, and the summed alignment score.

Shape legend: ``N`` images, ``M`` captions, ``R`` regions of a level, ``L`` words
(padded), ``d`` joint width, ``K`` levels.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hat import align
from hat.config import ModelConfig, get_preset, list_presets
from hat.encoders import ImageTower, TextTower
from hat.encoders.common import Projection
from hat.features import ImageFeatures, Scores, TextFeatures
from hat.scorer import Scorer

__all__ = ["HAT", "create_model", "list_models"]


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
        the words of the ``(M, L)`` right-padded attention mask."""
        tokens = levels[self.config.global_level]  # (M, L, d)
        return align.mean_words(tokens, attention_mask.sum(dim=1))  # (M, d)

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

    def similarity(self, images: ImageFeatures, captions: TextFeatures) -> Scores:
        """Per-level and summed scores of all image/caption pairs: ``(K, N, M)`` and
        ``(N, M)``, differentiable, where the features are (:meth:`Scorer.for_training`)."""
        return Scorer.for_training(self.config).all_pairs(images, captions)

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
