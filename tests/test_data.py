"""Data formats, clear errors on bad records, tokenizer, transforms, collation, scenes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from hat.config import DataConfig, get_preset
from hat.data import (
    CaptionTokenizer,
    DataError,
    PairCollator,
    PairDataset,
    build_transform,
    generate_scenes,
    load_records,
    read_csv,
    read_jsonl,
    read_karpathy,
    select_split,
)
from hat.data.synth import COLORS, SHAPES, _siblings, scene_captions


def _karpathy(tmp_path: Path, images: list[dict], name: str = "dataset.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"dataset": "x", "images": images}))
    return path


def _image(i: int, split: str, captions: int = 5, **extra) -> dict:
    sentences = [
        {"raw": f" caption {j} of {i} ", "tokens": [], "imgid": i} for j in range(captions)
    ]
    return {"filename": f"{i}.jpg", "imgid": i, "split": split, "sentences": sentences, **extra}


def test_karpathy_flickr_and_coco_layouts(tmp_path: Path) -> None:
    path = _karpathy(
        tmp_path,
        [
            _image(0, "train"),
            _image(1, "restval", filepath="val2014", cocoid=42),
            _image(2, "test", captions=7),
        ],
    )
    records = read_karpathy(path, tmp_path / "root")
    assert [r.split for r in records] == ["train", "train", "test"]
    assert records[0].path == tmp_path / "root" / "0.jpg"
    assert records[1].path == tmp_path / "root" / "val2014" / "1.jpg"
    assert records[1].image_id == "42"
    assert records[0].captions[0] == "caption 0 of 0"  # stripped
    assert len(records[2].captions) == 5  # the protocol uses the first 5
    kept_apart = read_karpathy(path, tmp_path, use_restval=False)
    assert [r.split for r in kept_apart] == ["train", "restval", "test"]


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ({"filename": "a.jpg", "split": "train"}, 'images\\[1\\]: missing field "sentences"'),
        (_image(1, "train", captions=3), r"images\[1\] \(1.jpg\): 3 captions, need 5"),
        (
            {**_image(1, "train"), "sentences": [{"raw": "  "}] * 5},
            "images\\[1\\].sentences\\[0\\]: empty",
        ),
        ({**_image(1, "train"), "sentences": [{"tokens": []}] * 5}, 'missing field "raw"'),
    ],
)
def test_karpathy_bad_records_name_file_and_entry(
    tmp_path: Path, image: dict, message: str
) -> None:
    path = _karpathy(tmp_path, [_image(0, "train"), image])
    with pytest.raises(DataError, match=message) as info:
        read_karpathy(path, tmp_path)
    assert str(path) in str(info.value)


def test_malformed_and_non_utf8_files(tmp_path: Path) -> None:
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"images": [')
    with pytest.raises(DataError, match="bad.json: invalid JSON"):
        read_karpathy(bad_json, tmp_path)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"image": "a.jpg", "captions": ["caf\xe9"]}\n')
    with pytest.raises(DataError, match="latin.jsonl: not valid UTF-8"):
        read_jsonl(latin, tmp_path)
    with pytest.raises(DataError, match="file not found"):
        read_karpathy(tmp_path / "missing.json", tmp_path)


def test_jsonl_with_and_without_split(tmp_path: Path) -> None:
    path = tmp_path / "caps.jsonl"
    lines = [{"image": f"d/{i}.jpg", "captions": [f"c{i}a", f"c{i}b"]} for i in range(20)]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    records = read_jsonl(path, tmp_path, split_ratios=(0.5, 0.25, 0.25), split_seed=3)
    assert sorted(r.split for r in records).count("train") == 10
    again = read_jsonl(path, tmp_path, split_ratios=(0.5, 0.25, 0.25), split_seed=3)
    assert [r.split for r in records] == [r.split for r in again]
    other = read_jsonl(path, tmp_path, split_ratios=(0.5, 0.25, 0.25), split_seed=4)
    assert [r.split for r in records] != [r.split for r in other]
    assert records[0].path == tmp_path / "d" / "0.jpg" and records[0].captions == ("c0a", "c0b")

    path.write_text(
        json.dumps({"image": "a.jpg", "captions": ["x"], "split": "test"})
        + "\n"
        + json.dumps({"image": "b.jpg", "captions": ["y"], "split": "train"})
        + "\n"
    )
    assert [r.split for r in read_jsonl(path, tmp_path)] == ["test", "train"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2: invalid JSON"),
        ('{"captions": ["x"]}', 'line 2: "image" must be'),
        ('{"image": "a.jpg", "captions": []}', 'line 2: "captions" must be a non-empty list'),
        ('{"image": "a.jpg", "captions": ["ok", "   "]}', r"line 2 captions\[1\]: empty caption"),
        ('{"image": "../etc/passwd", "captions": ["x"]}', "must be relative"),
    ],
)
def test_jsonl_bad_lines(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "caps.jsonl"
    path.write_text('{"image": "ok.jpg", "captions": ["fine"]}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        read_jsonl(path, tmp_path)


def test_csv_groups_rows_by_image(tmp_path: Path) -> None:
    path = tmp_path / "caps.csv"
    path.write_text(
        'image,caption,split\na.jpg,"one, with comma",train\nb.jpg,two,test\na.jpg,three,train\n'
    )
    records = read_csv(path, tmp_path)
    assert [(r.path.name, r.captions, r.split) for r in records] == [
        ("a.jpg", ("one, with comma", "three"), "train"),
        ("b.jpg", ("two",), "test"),
    ]
    path.write_text("picture,caption\na.jpg,x\n")
    with pytest.raises(DataError, match="caps.csv: header"):
        read_csv(path, tmp_path)
    path.write_text("image,caption\na.jpg,\n")
    with pytest.raises(DataError, match="caps.csv: line 2: empty caption"):
        read_csv(path, tmp_path)


def test_load_records_dispatch_and_split(tmp_path: Path) -> None:
    path = _karpathy(tmp_path, [_image(0, "train"), _image(1, "test")])
    records = load_records(DataConfig(annotations=str(path), image_root=str(tmp_path)))
    assert len(select_split(records, "test")) == 1
    with pytest.raises(DataError, match="split 'val' is empty"):
        select_split(records, "val")
    with pytest.raises(DataError, match="must both be set"):
        load_records(DataConfig())


def test_tokenizer_truncates_and_pads() -> None:
    tokenizer = CaptionTokenizer.from_config(get_preset("tiny").model.text)
    batch = tokenizer(["a red circle", " ".join(["word"] * 100)])
    assert batch["input_ids"].shape == (2, 32)
    assert batch["attention_mask"][0].sum() == 5  # [CLS] a red circle [SEP]
    assert batch["attention_mask"][1].sum() == 32
    cls_id, sep_id = tokenizer.tokenizer.cls_token_id, tokenizer.tokenizer.sep_token_id
    assert batch["input_ids"][0, 0] == cls_id and batch["input_ids"][0, 4] == sep_id
    assert batch["input_ids"][1, 31] == sep_id
    with pytest.raises(DataError, match="not found"):
        CaptionTokenizer("/nonexistent/tokenizer")


def test_transforms_sizes_and_collation(tmp_path: Path) -> None:
    cfg = get_preset("tiny").model.image
    image_path = tmp_path / "a.png"
    Image.new("RGB", (120, 90), (200, 10, 10)).save(image_path)
    for train in (True, False):
        tensor = build_transform(cfg, train)(Image.open(image_path).convert("RGB"))
        assert tensor.shape == (3, cfg.image_size, cfg.image_size)
    path = tmp_path / "caps.jsonl"
    path.write_text(json.dumps({"image": "a.png", "captions": ["one", "two words"]}) + "\n")
    records = read_jsonl(path, tmp_path, split_ratios=(1, 0, 0))
    dataset = PairDataset(records, build_transform(cfg, train=False))
    tokenizer = CaptionTokenizer.from_config(get_preset("tiny").model.text)
    batch = PairCollator(tokenizer)([dataset[0], dataset[1]])
    assert batch["images"].shape == (2, 3, cfg.image_size, cfg.image_size)
    assert batch["input_ids"].shape == (2, 4) and batch["image_index"].tolist() == [0, 0]


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    path = tmp_path / "caps.jsonl"
    path.write_text(json.dumps({"image": "broken.jpg", "captions": ["x"]}) + "\n")
    dataset = PairDataset(read_jsonl(path, tmp_path, split_ratios=(1, 0, 0)), torch.nn.Identity())
    with pytest.raises(DataError, match="broken.jpg: cannot read image"):
        dataset[0]


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def test_scenes_are_deterministic_and_hard(tmp_path: Path) -> None:
    a = generate_scenes(tmp_path / "a", n_train=6, n_val=3, n_test=3, image_size=48, seed=5)
    b = generate_scenes(tmp_path / "b", n_train=6, n_val=3, n_test=3, image_size=48, seed=5)
    c = generate_scenes(tmp_path / "c", n_train=6, n_val=3, n_test=3, image_size=48, seed=6)
    assert _digest(a.parent) == _digest(b.parent) != _digest(c.parent)
    records = read_karpathy(a, a.parent)
    assert [r.split for r in records] == ["train"] * 6 + ["val"] * 3 + ["test"] * 3
    assert all(len(set(r.captions)) == 5 for r in records)
    assert all(r.path.is_file() for r in records)
    # Each group of three shares its words but not its captions: word order and binding matter.
    for group in range(0, 12, 3):
        named = set(COLORS) | set(SHAPES)
        bags = [
            sorted(w for w in records[group + i].captions[0].split() if w in named)
            for i in range(3)
        ]
        captions = [records[group + i].captions[:2] for i in range(3)]
        assert len(set(captions)) == 3
        assert bags[0] == bags[1] == bags[2]  # same objects, other places or other binding
    with Image.open(records[0].path) as image:
        assert image.size == (48, 48)


def test_scene_siblings_swap_places_and_colours() -> None:
    import random

    from hat.data.synth import _random_scene

    base, moved, recoloured = _siblings(_random_scene(random.Random(0)))
    assert [o.cell for o in moved.objects[:2]] == [o.cell for o in base.objects[1::-1]]
    assert [o.color for o in recoloured.objects[:2]] == [o.color for o in base.objects[1::-1]]
    assert scene_captions(base, random.Random(1)) != scene_captions(recoloured, random.Random(1))
