"""Data: dataset readers, the built-in scene generator, transforms, tokenisation, datasets."""

from hat.data.datasets import (
    DecodedImages,
    ImageCaptionsDataset,
    ImageDataset,
    PairCollator,
    PairDataset,
    image_collate,
)
from hat.data.records import (
    DataError,
    ImageRecord,
    load_records,
    read_csv,
    read_jsonl,
    read_karpathy,
    select_split,
)
from hat.data.synth import SCENE_STYLES, SceneStyle, generate_scenes
from hat.data.tokenize import CaptionTokenizer
from hat.data.transforms import ImageError, build_transform, load_image

__all__ = [
    "SCENE_STYLES",
    "CaptionTokenizer",
    "DataError",
    "DecodedImages",
    "ImageCaptionsDataset",
    "ImageDataset",
    "ImageError",
    "ImageRecord",
    "PairCollator",
    "PairDataset",
    "SceneStyle",
    "build_transform",
    "generate_scenes",
    "image_collate",
    "load_image",
    "load_records",
    "read_csv",
    "read_jsonl",
    "read_karpathy",
    "select_split",
]
