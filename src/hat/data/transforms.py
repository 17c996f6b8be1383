"""Image loading and the transforms of spec section 3."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import transforms as T

from hat.config import ImageTowerConfig
from hat.data.records import DataError

__all__ = ["IMAGE_EXTENSIONS", "build_transform", "is_image_file", "load_image"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


def build_transform(image_cfg: ImageTowerConfig, train: bool) -> T.Compose:
    """PIL image -> normalised tensor ``(3, image_size, image_size)``.

    Train: RandomResizedCrop (scale ``train_crop_scale``) and, when ``train_hflip``,
    a horizontal flip; eval: Resize(``eval_resize``) + CenterCrop. Then ToTensor and
    the configured mean/std normalisation.
    """
    if train:
        geometry = [T.RandomResizedCrop(image_cfg.image_size, scale=image_cfg.train_crop_scale)]
        if image_cfg.train_hflip:
            geometry.append(T.RandomHorizontalFlip())
    else:
        geometry = [T.Resize(image_cfg.eval_resize), T.CenterCrop(image_cfg.image_size)]
    return T.Compose([*geometry, T.ToTensor(), T.Normalize(image_cfg.mean, image_cfg.std)])


def load_image(path: str | Path) -> Image.Image:
    """An RGB image with its EXIF orientation applied; errors name the file."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except FileNotFoundError as err:
        raise DataError(f"{path}: image file not found") from err
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot read image: {err}") from err


def is_image_file(path: str | Path) -> bool:
    """Whether a file name has one of the :data:`IMAGE_EXTENSIONS` (any case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS
