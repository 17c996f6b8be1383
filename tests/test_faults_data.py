"""Fault injection for the data path: a corpus of broken images and caption files,
generated here, each read correctly or rejected with an error naming the file and
the entry, or skipped and counted with ``skip_bad``."""

from __future__ import annotations

import io
import json
import logging
import random
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from hat.config import get_preset
from hat.data import (
    CaptionTokenizer,
    DataError,
    ImageDataset,
    ImageError,
    PairCollator,
    PairDataset,
    build_transform,
    image_collate,
    load_image,
    read_csv,
    read_jsonl,
    read_karpathy,
)
from hat.data.records import MAX_CAPTION_CHARS
from hat.data.transforms import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, is_image_file

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)
SIZE = (32, 24)
JPEG_TOLERANCE = 12  # per channel, for lossy formats
EXIF_ORIENTATION = 0x0112
ROTATED_90 = 6  # display rotated 90 degrees clockwise
PNG_SIGNATURE_AND_IHDR_HEADER = 16  # 8-byte signature, 4-byte length, b"IHDR"
HALF_ALPHA = 128
PILLOW_LIMIT = Image.MAX_IMAGE_PIXELS


def _close(pixel: tuple[int, ...], expected: tuple[int, ...], tol: int = 0) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected))


def _noise(size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    """An RGB image that compresses badly, so that a cut file lacks pixel data."""
    return Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3))


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def _truncated(path: Path, fmt: str) -> Path:
    buffer = io.BytesIO()
    _noise().save(buffer, fmt)
    data = buffer.getvalue()
    path.write_bytes(data[: len(data) // 2])
    return path


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A few-byte PNG whose header claims ``width x height`` pixels (a decompression
    bomb's header: nothing is allocated unless the pixels are decoded)."""
    buffer = io.BytesIO()
    Image.new("1", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    start = PNG_SIGNATURE_AND_IHDR_HEADER
    data[start : start + 8] = struct.pack(">II", width, height)
    ihdr_end = start + 13  # width, height, depth, colour type, compression, filter, interlace
    data[ihdr_end : ihdr_end + 4] = struct.pack(">I", zlib.crc32(data[start - 4 : ihdr_end]))
    path.write_bytes(bytes(data))
    return path


# ---------------------------------------------------------------- images read correctly


def _sixteen_bit(path: Path) -> Path:
    image = Image.new("I;16", SIZE, 0)
    image.putpixel((1, 0), 32768)
    image.putpixel((2, 0), 65535)
    return _save(image, path)


def _palette_with_transparency(path: Path) -> Path:
    image = Image.new("P", SIZE, 0)
    image.putpalette([*RED, *BLUE])
    image.putpixel((1, 0), 1)
    return _save(image, path, transparency=0)  # red is the transparent entry


def _rgba(path: Path) -> Path:
    image = Image.new("RGBA", SIZE, (*BLUE, 0))  # fully transparent
    image.putpixel((1, 0), (*BLUE, 255))
    image.putpixel((2, 0), (*BLACK, HALF_ALPHA))
    return _save(image, path)


def _exif_rotated(path: Path) -> Path:
    image = Image.new("RGB", (40, 20), RED)
    image.paste(BLUE, (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATED_90
    return _save(image, path, exif=exif, quality=95)


def _animated(path: Path, fmt: str) -> Path:
    frames = [Image.new("RGB", SIZE, colour) for colour in (RED, GREEN, BLUE)]
    return _save(frames[0], path, format=fmt, save_all=True, append_images=frames[1:])


# name -> (writer, expected size, {pixel: colour}, tolerance)
GOOD = {
    "photo.JPG": (lambda p: _save(Image.new("RGB", SIZE, RED), p, quality=95), SIZE, {}, 8),
    "cmyk.jpg": (lambda p: _save(Image.new("CMYK", SIZE, (0, 255, 255, 0)), p), SIZE, {}, 8),
    "cmyk.tiff": (lambda p: _save(Image.new("CMYK", SIZE, (0, 255, 255, 0)), p), SIZE, {}, 0),
    "palette.png": (
        _palette_with_transparency,
        SIZE,
        {(0, 0): WHITE, (1, 0): BLUE},
        0,
    ),
    "sixteen.png": (_sixteen_bit, SIZE, {(0, 0): BLACK, (1, 0): (127,) * 3, (2, 0): WHITE}, 1),
    "sixteen.tif": (_sixteen_bit, SIZE, {(1, 0): (127,) * 3, (2, 0): WHITE}, 1),
    "rgba.png": (_rgba, SIZE, {(0, 0): WHITE, (1, 0): BLUE, (2, 0): (127,) * 3}, 1),
    "grey_alpha.png": (lambda p: _save(Image.new("LA", SIZE, (0, 0)), p), SIZE, {}, 0),
    "grey.png": (lambda p: _save(Image.new("L", SIZE, 200), p), SIZE, {(0, 0): (200,) * 3}, 0),
    "bilevel.bmp": (lambda p: _save(Image.new("1", SIZE, 1), p), SIZE, {(0, 0): WHITE}, 0),
    "plain.webp": (lambda p: _save(Image.new("RGB", SIZE, RED), p, lossless=True), SIZE, {}, 0),
    "animated.gif": (lambda p: _animated(p, "GIF"), SIZE, {}, 0),
    "animated.webp": (lambda p: _animated(p, "WEBP"), SIZE, {}, JPEG_TOLERANCE),
    "png_named.jpg": (lambda p: _save(Image.new("RGB", SIZE, RED), p, format="PNG"), SIZE, {}, 0),
    "rotated.jpg": (_exif_rotated, (20, 40), {(10, 5): RED, (10, 35): BLUE}, JPEG_TOLERANCE),
}
DEFAULT_COLOUR = {"grey_alpha.png": WHITE}  # fully transparent black on white


@pytest.mark.parametrize("name", sorted(GOOD))
def test_images_read_as_rgb(tmp_path: Path, name: str) -> None:
    write, size, pixels, tol = GOOD[name]
    image = load_image(write(tmp_path / name))
    assert image.mode == "RGB" and image.size == size
    if not pixels:
        pixels = {(0, 0): DEFAULT_COLOUR.get(name, RED)}  # first frame, CMYK as red
    for xy, colour in pixels.items():
        assert _close(image.getpixel(xy), colour, tol), (name, xy, image.getpixel(xy))


# ---------------------------------------------------------------- images rejected


BAD = {
    "zero.jpg": (lambda p: p.write_bytes(b""), "empty file"),
    "text.jpg": (lambda p: p.write_text("hello, not a picture\n"), "not a recognised image"),
    "cut.jpg": (lambda p: _truncated(p, "JPEG"), "truncated or corrupt JPEG"),
    "cut.png": (lambda p: _truncated(p, "PNG"), "truncated or corrupt PNG"),
    "cut.webp": (lambda p: _truncated(p, "WEBP"), "truncated or corrupt"),
    "cut.gif": (lambda p: _truncated(p, "GIF"), "truncated or corrupt GIF"),
    "header_only.png": (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n"), "cannot read image"),
    "ppm.png": (lambda p: _save(Image.new("RGB", SIZE), p, format="PPM"), "accepted formats"),
    "folder.jpg": (lambda p: p.mkdir(), "cannot read image"),
    "missing.jpg": (lambda p: None, "image file not found"),
    # 81 Mpx: our limit only; 100 Mpx: Pillow's warning; 400 Mpx: Pillow's error.
    "bomb81.png": (lambda p: _png_claiming(p, 9000, 9000), "too large: 9000x9000"),
    "bomb100.png": (lambda p: _png_claiming(p, 10_000, 10_000), "too large"),
    "bomb400.png": (lambda p: _png_claiming(p, 20_000, 20_000), "too large"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_images_are_rejected_naming_the_file(tmp_path: Path, name: str) -> None:
    write, reason = BAD[name]
    path = tmp_path / name
    write(path)
    with pytest.raises(ImageError, match=reason) as info:
        load_image(path)
    assert str(info.value).startswith(f"{path}: ")
    assert isinstance(info.value, DataError)


FUZZ_CASES = 300
MAX_FLIPS = 8


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on corrupt metadata
def test_random_corruption_gives_an_image_or_an_image_error() -> None:
    rng = random.Random(0)
    seeds = []
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"):
        buffer = io.BytesIO()
        _noise((24, 20), seed=len(seeds)).save(buffer, fmt)
        seeds.append(buffer.getvalue())
    outcomes = {"read": 0, "rejected": 0}
    for _ in range(FUZZ_CASES):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, MAX_FLIPS)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.5:
            data = data[: rng.randrange(1, len(data))]
        try:
            image = load_image(io.BytesIO(bytes(data)))
        except ImageError as err:
            assert str(err).startswith("<stream>: ")
            outcomes["rejected"] += 1
        else:
            assert image.mode == "RGB"
            outcomes["read"] += 1
    assert min(outcomes.values()) > 0


def test_pixel_limit_is_checked_from_the_header() -> None:
    assert 9000 * 9000 > DEFAULT_MAX_PIXELS and DEFAULT_MAX_PIXELS < PILLOW_LIMIT
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20)).save(buffer, "PNG")
    assert load_image(io.BytesIO(buffer.getvalue()), max_pixels=400).size == (20, 20)
    with pytest.raises(
        ImageError, match="<stream>: image too large: 20x20 = 400 pixels, limit 399"
    ):
        load_image(io.BytesIO(buffer.getvalue()), max_pixels=399)


def test_image_extensions_any_case() -> None:
    assert all(ext == ext.lower() and ext.startswith(".") for ext in IMAGE_EXTENSIONS)
    assert is_image_file("a/B.JPG") and is_image_file("x.TiFf") and is_image_file(Path("y.webp"))
    assert not is_image_file("notes.txt") and not is_image_file("jpg")


# ---------------------------------------------------------------- caption files


def _karpathy_image(i: int, raw: str = "a caption") -> dict:
    return {"filename": f"{i}.jpg", "imgid": i, "split": "train", "sentences": [{"raw": raw}]}


def test_truncated_and_bom_karpathy(tmp_path: Path) -> None:
    text = json.dumps({"images": [_karpathy_image(0), _karpathy_image(1)]})
    path = tmp_path / "dataset.json"
    path.write_text(text[: len(text) // 2])
    with pytest.raises(DataError, match=r"dataset.json: invalid JSON at line 1 column \d+: .*"):
        read_karpathy(path, tmp_path, captions_per_image=1)
    with pytest.raises(DataError, match="the file is incomplete"):
        read_karpathy(path, tmp_path, captions_per_image=1)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert len(read_karpathy(path, tmp_path, captions_per_image=1)) == 2
    path.write_bytes(text.encode("utf-16"))
    with pytest.raises(DataError, match="dataset.json: the file is UTF-16 text"):
        read_karpathy(path, tmp_path, captions_per_image=1)


def test_non_utf8_caption_is_a_bad_entry_in_every_format(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    karpathy = tmp_path / "dataset.json"
    good = json.dumps(_karpathy_image(0)).encode()
    bad = json.dumps(_karpathy_image(1, "caf@")).encode().replace(b"@", b"\xe9")
    karpathy.write_bytes(b'{"images": [' + good + b", " + bad + b"]}")
    jsonl = tmp_path / "caps.jsonl"
    jsonl.write_bytes(
        b'{"image": "a.jpg", "captions": ["ok"]}\n{"image": "b.jpg", "captions": ["caf\xe9"]}\n'
    )
    csv_path = tmp_path / "caps.csv"
    csv_path.write_bytes(b"image,caption\na.jpg,ok\nb.jpg,caf\xe9\n")
    cases = [
        (lambda s: read_karpathy(karpathy, tmp_path, captions_per_image=1, skip_bad=s),
         r"dataset.json: images\[1\].sentences\[0\]: not valid UTF-8", "a caption"),
        (lambda s: read_jsonl(jsonl, tmp_path, split_ratios=(1, 0, 0), skip_bad=s),
         "caps.jsonl: line 2: not valid UTF-8", "ok"),
        (lambda s: read_csv(csv_path, tmp_path, split_ratios=(1, 0, 0), skip_bad=s),
         "caps.csv: line 3: column caption: not valid UTF-8", "ok"),
    ]  # fmt: skip
    for read, message, kept in cases:
        with pytest.raises(DataError, match=message):
            read(False)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            records = read(True)
        assert [r.captions for r in records] == [(kept,)]
        assert "skipped 1 bad entries" in caplog.text and message.split(":")[0] in caplog.text


@pytest.mark.parametrize(
    ("caption", "message"),
    [
        ("\u3000 \t ", "empty caption"),
        ("x" * (MAX_CAPTION_CHARS + 1), f"caption of {MAX_CAPTION_CHARS + 1} characters, limit"),
    ],
)
def test_empty_and_overlong_captions(tmp_path: Path, caption: str, message: str) -> None:
    path = tmp_path / "caps.jsonl"
    lines = [{"image": "a.jpg", "captions": ["fine"]}, {"image": "b.jpg", "captions": [caption]}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(DataError, match=rf"caps.jsonl: line 2: captions\[0\]: {message}"):
        read_jsonl(path, tmp_path)
    kept = read_jsonl(path, tmp_path, split_ratios=(1, 0, 0), skip_bad=True)
    assert [r.image_id for r in kept] == ["a.jpg"]


def test_longest_allowed_caption_and_line_separators_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "caps.jsonl"
    items = [
        {"image": "a.jpg", "captions": ["y" * MAX_CAPTION_CHARS]},
        {"image": "b.jpg", "captions": ["one\u2028two\x0cthree"]},  # not line breaks in JSONL
    ]
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\r\n" for x in items))
    records = read_jsonl(path, tmp_path, split_ratios=(1, 0, 0))
    assert [len(r.captions[0]) for r in records] == [MAX_CAPTION_CHARS, 13]


def test_incomplete_jsonl_and_ragged_csv_skip_and_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    jsonl = tmp_path / "caps.jsonl"
    line = json.dumps({"image": "b.jpg", "captions": ["two"]})
    jsonl.write_text(json.dumps({"image": "a.jpg", "captions": ["one"]}) + "\n" + line[:-9])
    with pytest.raises(DataError, match="caps.jsonl: line 2: invalid JSON"):
        read_jsonl(jsonl, tmp_path)
    assert len(read_jsonl(jsonl, tmp_path, split_ratios=(1, 0, 0), skip_bad=True)) == 1

    csv_path = tmp_path / "caps.csv"
    rows = ["image,caption", "a.jpg,one", "b.jpg", "c.jpg,x,y", "d.jpg,four", "e.jpg,  "]
    csv_path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match="caps.csv: line 3: expected 2 columns"):
        read_csv(csv_path, tmp_path)
    with caplog.at_level(logging.WARNING):
        records = read_csv(csv_path, tmp_path, split_ratios=(1, 0, 0), skip_bad=True)
    assert [r.image_id for r in records] == ["a.jpg", "d.jpg"]
    assert "caps.csv: skipped 3 bad entries" in caplog.text
    for number in (3, 4, 6):
        assert f"caps.csv: line {number}:" in caplog.text


def test_csv_unclosed_quote_is_named(tmp_path: Path) -> None:
    path = tmp_path / "caps.csv"
    after = "".join(f"{i}.jpg,a caption that the open quote swallows\n" for i in range(200))
    path.write_text('image,caption\na.jpg,fine\nb.jpg,"open quote\n' + after)
    with pytest.raises(DataError, match=r"caps.csv: line \d+: caption of \d+ characters"):
        read_csv(path, tmp_path)
    assert [r.image_id for r in read_csv(path, tmp_path, skip_bad=True)] == ["a.jpg"]
    huge = tmp_path / "huge.csv"  # past the csv module's own field limit
    huge.write_text('image,caption\nb.jpg,"' + "z" * 200_000 + "\nc.jpg,after\n")
    with pytest.raises(DataError, match="huge.csv: after line 1: malformed CSV"):
        read_csv(huge, tmp_path)
    assert [r.image_id for r in read_csv(huge, tmp_path, skip_bad=True)] == ["c.jpg"]


# ---------------------------------------------------------------- datasets mid-epoch


@pytest.fixture(scope="module")
def tokenizer() -> CaptionTokenizer:
    return CaptionTokenizer.from_config(get_preset("tiny").model.text)


def _mixed_set(tmp_path: Path) -> list:
    """Four images, two of them bad (truncated, missing), two captions each."""
    _save(Image.new("RGB", SIZE, RED), tmp_path / "good0.jpg")
    _truncated(tmp_path / "cut.png", "PNG")
    _save(Image.new("RGBA", SIZE, (*GREEN, HALF_ALPHA)), tmp_path / "good1.png")
    items = [
        {"image": name, "captions": [f"{name} one", f"{name} two"]}
        for name in ("good0.jpg", "cut.png", "good1.png", "gone.jpg")
    ]
    path = tmp_path / "caps.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return read_jsonl(path, tmp_path, split_ratios=(1, 0, 0))


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_image_mid_epoch_names_file_and_record(
    tmp_path: Path, tokenizer: CaptionTokenizer, workers: int
) -> None:
    records = _mixed_set(tmp_path)
    pairs = PairDataset(records, build_transform(get_preset("tiny").model.image, train=False))
    loader = torch.utils.data.DataLoader(
        pairs, batch_size=2, num_workers=workers, collate_fn=PairCollator(tokenizer)
    )
    with pytest.raises(ImageError, match=r"cut.png: cannot read image: .*image_id='cut.png'"):
        list(loader)


def test_skip_bad_drops_and_counts_bad_items(
    tmp_path: Path, tokenizer: CaptionTokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    records = _mixed_set(tmp_path)
    transform = build_transform(get_preset("tiny").model.image, train=False)
    pairs = PairDataset(records, transform, skip_bad=True)
    loader = torch.utils.data.DataLoader(pairs, batch_size=3, collate_fn=PairCollator(tokenizer))
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    assert sum(int(b["skipped"]) for b in batches) == 4
    kept = torch.cat([b["image_index"] for b in batches]).tolist()
    assert kept == [0, 0, 2, 2]
    assert all(b["images"].shape[0] == b["input_ids"].shape[0] for b in batches)
    assert "gone.jpg: image file not found" in caplog.text and "image_id='gone.jpg'" in caplog.text

    last = PairCollator(tokenizer)([pairs[6], pairs[7]])  # both pairs of the missing image
    assert last["images"].shape[0] == last["input_ids"].shape[0] == 0 and int(last["skipped"]) == 2

    images = ImageDataset(records, transform, skip_bad=True)
    batch = image_collate([images[i] for i in range(len(images))])
    assert batch["image_index"].tolist() == [0, 2] and int(batch["skipped"]) == 2
    assert batch["images"].shape[0] == 2
    with pytest.raises(ImageError, match=r"gone.jpg: image file not found \(record image_id"):
        ImageDataset(records, transform)[3]
