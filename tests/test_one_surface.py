"""One pixel limit and one JSONL caption schema, shared by every reader."""

from __future__ import annotations

import inspect
import io
import json
import re

import pytest
from PIL import Image

from hat.config import DEFAULT_MAX_PIXELS, ServeConfig
from hat.data import DataError
from hat.data.records import parse_caption_line, read_jsonl
from hat.data.transforms import load_image
from hat.index import read_caption_file


def test_the_loader_and_the_server_share_one_pixel_limit() -> None:
    assert inspect.signature(load_image).parameters["max_pixels"].default == DEFAULT_MAX_PIXELS
    assert ServeConfig().max_pixels == DEFAULT_MAX_PIXELS


def test_the_server_decodes_uploads_under_its_own_limit(monkeypatch) -> None:
    """``serve.max_pixels`` reaches the loader too, not only the server's header probe."""
    import asyncio

    from fastapi import HTTPException, UploadFile

    import hat.serve

    limits = []

    def loader(source, max_pixels=DEFAULT_MAX_PIXELS):
        limits.append(max_pixels)
        return load_image(source, max_pixels=max_pixels)

    monkeypatch.setattr(hat.serve, "load_image", loader)
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20)).save(buffer, format="PNG")

    def upload(max_pixels: int) -> Image.Image:
        file = UploadFile(io.BytesIO(buffer.getvalue()), filename="x.png")
        return asyncio.run(hat.serve._read_upload(file, ServeConfig(max_pixels=max_pixels)))

    assert upload(400).size == (20, 20) and limits == [400]
    with pytest.raises(HTTPException, match="limit 399"):
        upload(399)


LINES = [
    {"image": "a.png", "captions": ["a red circle", "a round red thing"], "split": "train"},
    {"image": "b.png", "caption": "a blue square", "split": "test"},
]


def test_one_schema_for_datasets_and_the_index(tmp_path) -> None:
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in LINES))
    records = read_jsonl(path, tmp_path)
    assert [(r.image_id, r.captions, r.split) for r in records] == [
        ("a.png", ("a red circle", "a round red thing"), "train"),
        ("b.png", ("a blue square",), "test"),
    ]
    entries = read_caption_file(path)
    assert [(e.text, e.image_path) for e in entries] == [
        (c, str(tmp_path / r.image_id)) for r in records for c in r.captions
    ]


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"image": "a.png"}, 'a "caption" string or a "captions" list'),
        ({"image": "a.png", "caption": "x", "captions": ["y"]}, "not both"),
        ({"image": 3, "caption": "x"}, '"image" must be a path string, got 3'),
        ({"caption": " "}, "empty caption"),
        ({"captions": []}, '"captions" must be a non-empty list'),
        ({"caption": "x", "split": 1}, '"split" must be a non-empty string'),
    ],
)
def test_the_one_parser_names_the_line(item: dict, message: str) -> None:
    with pytest.raises(DataError, match=f"^where: .*{re.escape(message)}"):
        parse_caption_line(item, "where")
    line = parse_caption_line({"caption": "  x  "}, "where")
    assert (line.image, line.captions, line.split) == (None, ("x",), None)
