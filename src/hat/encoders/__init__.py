"""The two towers: a timm image backbone and a Hugging Face text encoder, each giving
per-level token sequences projected into the joint space."""

from hat.encoders.image import ImageTower
from hat.encoders.text import TextTower

__all__ = ["ImageTower", "TextTower"]
