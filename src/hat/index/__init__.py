"""Index an image collection with a trained HAT model and search it by text or image."""

from hat.index.index import AddReport, Hit, Index, VerifyReport
from hat.index.reader import CaptionEntry, find_images, read_caption_file
from hat.index.store import FORMAT_VERSION, IndexFormatError

__all__ = [
    "FORMAT_VERSION",
    "AddReport",
    "CaptionEntry",
    "Hit",
    "Index",
    "IndexFormatError",
    "VerifyReport",
    "find_images",
    "read_caption_file",
]
