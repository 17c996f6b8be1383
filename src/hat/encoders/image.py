"""Image tower: a hierarchical timm backbone giving HAT's per-stage tokens.

Shape legend: ``B`` images, ``T`` tokens of a stage (``H * W``), ``C`` stage width,
``d`` joint width.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from hat.config import ImageTowerConfig
from hat.encoders.common import Projection

__all__ = ["ImageTower", "PretrainedWeightsMissing"]


class PretrainedWeightsMissing(FileNotFoundError):
    """A pretrained backbone was asked for but its local file is not there."""


class ImageTower(nn.Module):
    """timm backbone -> stage outputs -> per-stage LayerNorm -> projection.

    A stage output is the token sequence after that stage's blocks, before the
    patch merging that opens the next stage. The used stages other than the
    backbone's last get their own LayerNorm (HAT's extra ``norm_1``/``norm_2``); the
    last stage goes through the backbone's own final norm, as in the reference.

    ``grid_sizes`` holds each level's side ``H = W`` (its tokens are the ``H * W`` grid
    cells in row-major order), for drawing attention maps.

    Args:
        cfg: the image tower config.
        stages: 1-based stage numbers, one per level, in level order.
        embed_dim: joint width ``d``.
        init_std: std of the projections' normal init.
        pretrained: load ``cfg.pretrained_path`` when ``cfg.pretrained``; raise if the
            file is not set or missing.
    """

    def __init__(
        self,
        cfg: ImageTowerConfig,
        stages: tuple[int, ...],
        embed_dim: int,
        init_std: float,
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        load = pretrained and cfg.pretrained
        overlay = {"file": str(_require_file(cfg))} if load else None
        self.backbone = timm.create_model(
            cfg.backbone,
            pretrained=load,
            pretrained_cfg_overlay=overlay,
            num_classes=0,
            img_size=cfg.image_size,
            **cfg.kwargs,
        )
        num_stages = len(self.backbone.feature_info)
        for stage in stages:
            if not 1 <= stage <= num_stages:
                raise ValueError(
                    f"image stage {stage} out of range 1..{num_stages} of {cfg.backbone}"
                )
        self.stages = tuple(stages)
        self.widths = tuple(self.backbone.feature_info[s - 1]["num_chs"] for s in stages)
        self.last_stage = num_stages
        self.grid_sizes = tuple(
            cfg.image_size // self.backbone.feature_info[s - 1]["reduction"] for s in stages
        )
        self.stage_norms = nn.ModuleDict(
            {str(s): nn.LayerNorm(w) for s, w in zip(stages, self.widths) if s != num_stages}
        )
        self.projections = nn.ModuleList(Projection(w, embed_dim, init_std) for w in self.widths)
        # (1, T, C) per level, added to the normalised stage tokens: where a region is.
        self.region_positions = (
            nn.ParameterList(
                nn.Parameter(torch.randn(1, g * g, w) * init_std)
                for g, w in zip(self.grid_sizes, self.widths)
            )
            if cfg.region_positions
            else None
        )

    def stage_norm(self, stage: int) -> nn.Module:
        """The LayerNorm applied to a stage's output."""
        if stage == self.last_stage:
            return self.backbone.norm
        return self.stage_norms[str(stage)]

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Everything but the projections: what the freeze schedule freezes."""
        proj = {id(p) for p in self.projections.parameters()}
        if self.region_positions is not None:
            proj |= {id(p) for p in self.region_positions.parameters()}
        return [p for p in self.parameters() if id(p) not in proj]

    def stage_tokens(self, images: Tensor) -> list[Tensor]:
        """Normalised stage outputs, one ``(B, T, C)`` per level, before projection."""
        indices = sorted({s - 1 for s in self.stages})
        maps = self.backbone.forward_intermediates(
            images, indices=indices, norm=False, stop_early=True, intermediates_only=True
        )
        by_stage = {i + 1: fmap for i, fmap in zip(indices, maps)}  # (B, C, H, W) each
        out = []
        for stage in self.stages:
            tokens = by_stage[stage].flatten(2).transpose(1, 2)  # (B, T, C), row-major H*W
            out.append(self.stage_norm(stage)(tokens))
        return out

    def forward(self, images: Tensor) -> list[Tensor]:
        """Projected tokens: images (B, 3, H, W) -> one ``(B, T, d)`` per level."""
        tokens = self.stage_tokens(images)  # (B, T, C) per level
        if self.region_positions is not None:
            tokens = [t + pos for t, pos in zip(tokens, self.region_positions)]
        return [proj(t) for proj, t in zip(self.projections, tokens)]


def _require_file(cfg: ImageTowerConfig) -> Path:
    hint = (
        f"download the timm weights '{cfg.pretrained_source}' on a machine with internet "
        f"(e.g. `python -c \"import timm; timm.create_model('{cfg.pretrained_source}', "
        f'pretrained=True)"` then copy model.safetensors from the Hugging Face cache '
        f"folder 'models--timm--{cfg.pretrained_source}'), put it on this machine and set "
        f"model.image.pretrained_path=/path/to/model.safetensors"
    )
    if not cfg.pretrained_path:
        raise PretrainedWeightsMissing(f"no local image backbone weights configured: {hint}")
    path = Path(cfg.pretrained_path)
    if not path.is_file():
        raise PretrainedWeightsMissing(f"image backbone weights {path} not found: {hint}")
    return path
