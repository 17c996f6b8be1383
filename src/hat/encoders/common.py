"""Pieces shared by both towers."""

from __future__ import annotations

from torch import nn

__all__ = ["Projection", "resolve_local_path"]


class Projection(nn.Linear):
    """A level's projection into the joint space: Linear with bias, N(0, std) init, bias 0."""

    def __init__(self, in_features: int, out_features: int, init_std: float) -> None:
        super().__init__(in_features, out_features, bias=True)
        nn.init.normal_(self.weight, mean=0.0, std=init_std)
        nn.init.zeros_(self.bias)


def resolve_local_path(path: str) -> str:
    """Expand the special name ``minilm`` to the bundled all-MiniLM-L6-v2 directory."""
    if path == "minilm":
        from hat.config import minilm_path

        return minilm_path()
    return path
