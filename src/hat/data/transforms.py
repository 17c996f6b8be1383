"""Image loading and the transforms of spec section 3.

:func:`load_image` is the one way this package reads an image file: training,
evaluation, indexing and serving all go through it, so every image meets the same
checks (format, pixel count, complete data) and the same conversion to RGB.
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from hat.config import DEFAULT_MAX_PIXELS, ImageTowerConfig
from hat.data.records import DataError

if TYPE_CHECKING:
    from torchvision import transforms as T

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "IMAGE_FORMATS",
    "ImageError",
    "build_transform",
    "eval_geometry",
    "is_image_file",
    "load_image",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
# The Pillow decoders load_image accepts (the JPEG one also reads MPO, as phones write).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

WHITE = (255, 255, 255)
OPAQUE = 255
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
SIXTEEN_TO_EIGHT_BITS = 255 / 65535  # 16-bit grey (and 32-bit "I", read as 16-bit) to 8-bit
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

# What Pillow's decoders raise on malformed data (truncated streams, bad chunks,
# impossible header fields; UserWarning about corrupt metadata where warnings are
# errors): each becomes an ImageError naming the file.
_DECODE_ERRORS = (
    UserWarning,
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    IndexError,
    EOFError,
    ZeroDivisionError,
    struct.error,
)


class ImageError(DataError):
    """An image file cannot be used: missing, empty, not an image, truncated or too large.

    The message starts with the file (``"<path>: <reason>"``). A single-message
    exception, so that it survives being re-raised from a DataLoader worker.
    """


def build_transform(image_cfg: ImageTowerConfig, train: bool) -> T.Compose:
    """PIL image -> normalised tensor ``(3, image_size, image_size)``.

    Train: RandomResizedCrop (scale ``train_crop_scale``) and, when ``train_hflip``,
    a horizontal flip; eval: Resize(``eval_resize``) + CenterCrop. Then ToTensor and
    the configured mean/std normalisation.
    """
    from torchvision import transforms as T

    if train:
        geometry = [T.RandomResizedCrop(image_cfg.image_size, scale=image_cfg.train_crop_scale)]
        if image_cfg.train_hflip:
            geometry.append(T.RandomHorizontalFlip())
    else:
        geometry = [eval_geometry(image_cfg)]
    return T.Compose([*geometry, T.ToTensor(), T.Normalize(image_cfg.mean, image_cfg.std)])


def eval_geometry(image_cfg: ImageTowerConfig) -> T.Compose:
    """PIL image -> PIL image: Resize(``eval_resize``) + CenterCrop(``image_size``), the
    pixels the model sees at evaluation (and that attention maps are drawn over)."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(image_cfg.eval_resize), T.CenterCrop(image_cfg.image_size)])


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: 16-bit grey scaled (not clipped) to 8 bits, transparency
    (alpha channel, palette or ``tRNS`` transparency) composited on white, CMYK,
    palette, grey, bilevel and float (read as 0-255) converted by Pillow."""
    if image.mode in SIXTEEN_BIT_MODES:
        image = image.convert("I").point(lambda value: value * SIXTEEN_TO_EIGHT_BITS)
        image = image.convert("L")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*WHITE, OPAQUE))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _open_checked(source: str | Path | BinaryIO, name: str, max_pixels: int) -> Image.Image:
    """The first frame of ``source``, decoded, once its header passed the checks."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its own limit and twice it; make that an error
            # here too. (If another thread's catch_warnings interleaves, the warning is
            # merely printed, and with the default limit the pixel check below still
            # rejects the image.)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source, formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{name}: image too large: {err}") from err
    except UnidentifiedImageError as err:
        raise ImageError(
            f"{name}: cannot read image: not a recognised image file "
            f"(accepted formats: {', '.join(IMAGE_FORMATS)})"
        ) from err
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except _DECODE_ERRORS as err:
        raise ImageError(
            f"{name}: cannot read image: truncated or corrupt data ({type(err).__name__}: {err})"
        ) from err
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(
                f"{name}: image too large: {width}x{height} = {width * height} pixels, "
                f"limit {max_pixels}"
            )
        if width < 1 or height < 1:
            raise ImageError(f"{name}: cannot read image: empty size {width}x{height}")
        try:
            image.seek(0)  # the first frame of an animated GIF / WebP / PNG
            image.load()
            upright = ImageOps.exif_transpose(image)
        except _DECODE_ERRORS as err:
            raise ImageError(
                f"{name}: cannot read image: truncated or corrupt {image.format} data "
                f"({type(err).__name__}: {err})"
            ) from err
        try:
            return _to_rgb(upright)
        except (ValueError, OSError) as err:
            raise ImageError(
                f"{name}: cannot read image: colour mode {upright.mode} cannot be converted "
                f"to RGB ({err})"
            ) from err


def load_image(source: str | Path | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image file (or binary stream) as an 8-bit RGB image.

    Accepted: JPEG (MPO included), PNG, WebP, GIF, BMP and TIFF, whatever the extension.
    The EXIF orientation is applied; an animated file gives its first frame; palette,
    grey, bilevel, CMYK and 16-bit grey images are converted (16-bit scaled to 8-bit);
    transparent pixels are composited on white.

    The pixel count ``width * height`` is checked against ``max_pixels`` from the file
    header, before anything is decoded (Pillow's own decompression-bomb limit,
    ``Image.MAX_IMAGE_PIXELS``, also applies).

    Raises:
        ImageError: a missing, empty, unreadable, non-image, truncated or too large
            file; the message starts with the file name and gives the reason.
    """
    name = str(source) if isinstance(source, str | Path) else getattr(source, "name", "<stream>")
    if isinstance(source, str | Path):
        try:
            size = Path(source).stat().st_size
        except FileNotFoundError as err:
            raise ImageError(f"{name}: image file not found") from err
        except OSError as err:
            raise ImageError(f"{name}: cannot read image: {err}") from err
        if size == 0:
            raise ImageError(f"{name}: cannot read image: empty file (0 bytes)")
    try:
        return _open_checked(source, name, max_pixels)
    except FileNotFoundError as err:  # removed between the check and the read
        raise ImageError(f"{name}: image file not found") from err
    except OSError as err:  # a directory, no permission, an I/O error
        raise ImageError(f"{name}: cannot read image: {err}") from err


def is_image_file(path: str | Path) -> bool:
    """Whether a file name has one of the :data:`IMAGE_EXTENSIONS` (any case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS
