"""Image loading and the transforms of spec section 3."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import transforms as T

from hat.config import ImageTowerConfig
from hat.data.records import DataError

__all__ = ["build_transform", "load_image"]


def build_transform(cfg: ImageTowerConfig, train: bool) -> T.Compose:
    """Train: RandomResizedCrop (+ horizontal flip); eval: Resize + CenterCrop; then
    ToTensor and the configured mean/std normalisation."""
    if train:
        geometry = [T.RandomResizedCrop(cfg.image_size, scale=cfg.train_crop_scale)]
        if cfg.train_hflip:
            geometry.append(T.RandomHorizontalFlip())
    else:
        geometry = [T.Resize(cfg.eval_resize), T.CenterCrop(cfg.image_size)]
    return T.Compose([*geometry, T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])


def load_image(path: str | Path) -> Image.Image:
    """An RGB image with its EXIF orientation applied; errors name the file."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except FileNotFoundError as err:
        raise DataError(f"{path}: image file not found") from err
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot read image: {err}") from err
