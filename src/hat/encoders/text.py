"""Text tower: a BERT-like Hugging Face encoder giving HAT's per-layer tokens.

Shape legend: ``B`` captions, ``L`` tokens (padded), ``H`` encoder width, ``d``
joint width.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn
from transformers import AutoConfig, AutoModel

from hat.config import TextTowerConfig
from hat.encoders.common import Projection, resolve_local_path

__all__ = ["PretrainedTextMissing", "TextTower", "build_text_encoder"]


class PretrainedTextMissing(FileNotFoundError):
    """A pretrained text encoder was asked for but its local directory is not there."""


def build_text_encoder(cfg: TextTowerConfig, pretrained: bool) -> nn.Module:
    """The HF encoder without its pooler, from a local directory or from a config.

    With ``pretrained`` (and ``cfg.pretrained``), weights are read from ``cfg.path``
    (never downloaded). Otherwise the architecture comes from ``cfg.config`` (a
    ``BertConfig`` dict; empty = bert-base) or, when only ``cfg.path`` is given,
    from the config file in that directory, with random weights.
    """
    if pretrained and cfg.pretrained:
        path = _require_dir(cfg)
        # Loaded with its pooler so that the load report flags only real mismatches;
        # HAT never uses the pooler, so it is dropped right after.
        encoder = AutoModel.from_pretrained(path, local_files_only=True)
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None
        return encoder
    if cfg.config or not cfg.path:
        options = dict(cfg.config)
        config = AutoConfig.for_model(options.pop("model_type", "bert"), **options)
    else:
        config = AutoConfig.from_pretrained(_require_dir(cfg), local_files_only=True)
    return AutoModel.from_config(config, add_pooling_layer=False)


def _require_dir(cfg: TextTowerConfig) -> str:
    hint = (
        f"download '{cfg.pretrained_source}' on a machine with internet (e.g. "
        f"`huggingface-cli download {cfg.pretrained_source} --local-dir {cfg.pretrained_source}`), "
        f"copy the folder here and set model.text.path=/path/to/{cfg.pretrained_source}"
    )
    if not cfg.path:
        raise PretrainedTextMissing(f"no local text encoder configured: {hint}")
    path = resolve_local_path(cfg.path)
    if not (Path(path) / "config.json").is_file():
        raise PretrainedTextMissing(f"text encoder directory {path} has no config.json: {hint}")
    return path


class TextTower(nn.Module):
    """HF encoder -> ``hidden_states[k]`` for each level's layer k -> projection.

    ``hidden_states[0]`` is the embedding output, so the 1-based encoder layer k is
    ``hidden_states[k]``. Token type ids are all zero.

    Args:
        cfg: the text tower config.
        layers: 1-based encoder layers, one per level, in level order.
        embed_dim: joint width ``d``.
        init_std: std of the projections' normal init.
        pretrained: load the encoder's weights from ``cfg.path``.
    """

    def __init__(
        self,
        cfg: TextTowerConfig,
        layers: tuple[int, ...],
        embed_dim: int,
        init_std: float,
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = build_text_encoder(cfg, pretrained)
        num_layers = self.encoder.config.num_hidden_layers
        for layer in layers:
            if not 1 <= layer <= num_layers:
                raise ValueError(f"text layer {layer} out of range 1..{num_layers}")
        self.layers = tuple(layers)
        width = self.encoder.config.hidden_size
        self.projections = nn.ModuleList(Projection(width, embed_dim, init_std) for _ in layers)

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The encoder's parameters: what the freeze schedule freezes."""
        return list(self.encoder.parameters())

    def layer_tokens(self, input_ids: Tensor, attention_mask: Tensor) -> list[Tensor]:
        """Hidden states of the configured layers, one ``(B, L, H)`` per level."""
        out = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
        )
        return [out.hidden_states[k] for k in self.layers]

    def project(self, hidden: list[Tensor]) -> list[Tensor]:
        """One ``(B, L, H)`` hidden state per level -> one ``(B, L, d)`` per level."""
        return [proj(h) for proj, h in zip(self.projections, hidden)]

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> list[Tensor]:
        """Projected tokens: ids (B, L) -> one ``(B, L, d)`` per level."""
        return self.project(self.layer_tokens(input_ids, attention_mask))
