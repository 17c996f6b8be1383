"""Data formats, clear errors on bad records, tokenizer, transforms, collation, scenes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import pickle
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from hat.config import DataConfig, TextTowerConfig, get_preset
from hat.data import (
    CaptionTokenizer,
    DataError,
    ImageDataset,
    ImageRecord,
    PairCollator,
    PairDataset,
    build_transform,
    generate_scenes,
    image_collate,
    load_image,
    load_records,
    read_csv,
    read_jsonl,
    read_karpathy,
    select_split,
)
from hat.data.synth import COLORS, random_scene, scene_captions, siblings

EXIF_ORIENTATION = 0x0112
ROTATED_90 = 6  # EXIF orientation: display rotated 90 degrees clockwise


# ---------------------------------------------------------------- Karpathy


def _karpathy(tmp_path: Path, images: list, name: str = "dataset.json") -> Path:
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
    assert [r.image_id for r in records] == ["0", "42", "2"]
    assert records[0].captions[0] == "caption 0 of 0"  # stripped
    assert records[2].captions == tuple(f"caption {j} of 2" for j in range(5))  # the first 5
    kept_apart = read_karpathy(path, tmp_path, use_restval=False)
    assert [r.split for r in kept_apart] == ["train", "restval", "test"]
    assert len(read_karpathy(path, tmp_path, captions_per_image=2)[0].captions) == 2


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("not an object", r"images\[1\]: expected an object"),
        ({"filename": "a.jpg", "split": "train"}, r'images\[1\] \(a.jpg\): "sentences" must be'),
        ({**_image(1, "train"), "filename": 7}, r'images\[1\]: "filename" must be a non-empty'),
        ({k: v for k, v in _image(1, "x").items() if k != "split"}, 'missing field "split"'),
        (_image(1, "training"), r'images\[1\]: unknown split "training"'),
        ({**_image(1, "train"), "filepath": None}, r'images\[1\]: "filepath" must be'),
        (_image(1, "train", captions=3), r"images\[1\] \(1.jpg\): 3 captions, need 5"),
        ({**_image(1, "train"), "sentences": [{"raw": "  "}] * 5}, r"sentences\[0\]: empty"),
        ({**_image(1, "train"), "sentences": [{"raw": 3}] * 5}, "caption must be a string"),
        ({**_image(1, "train"), "sentences": [{"tokens": []}] * 5}, 'missing field "raw"'),
    ],
)
def test_karpathy_bad_records_name_file_and_entry(tmp_path: Path, image, message: str) -> None:
    path = _karpathy(tmp_path, [_image(0, "train"), image])
    with pytest.raises(DataError, match=message) as info:
        read_karpathy(path, tmp_path)
    assert str(info.value).startswith(str(path))


def test_malformed_missing_and_non_utf8_files(tmp_path: Path) -> None:
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"images": [')
    with pytest.raises(DataError, match="bad.json: invalid JSON at line 1"):
        read_karpathy(bad_json, tmp_path)
    no_images = _karpathy(tmp_path, [])
    no_images.write_text('{"dataset": "x"}')
    with pytest.raises(DataError, match='expected an object with an "images" list'):
        read_karpathy(no_images, tmp_path)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(
        b'{"image": "a.jpg", "captions": ["ok"]}\n{"image": "b.jpg", "captions": ["caf\xe9"]}\n'
    )
    with pytest.raises(DataError, match="latin.jsonl: line 2: not valid UTF-8"):
        read_jsonl(latin, tmp_path)
    with pytest.raises(DataError, match="missing.json: file not found"):
        read_karpathy(tmp_path / "missing.json", tmp_path)


# ---------------------------------------------------------------- JSONL / CSV


def _jsonl(path: Path, items: list) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return path


def test_jsonl_with_and_without_split(tmp_path: Path) -> None:
    items = [{"image": f"d/{i}.jpg", "captions": [f"c{i}a", f" c{i}b "]} for i in range(20)]
    path = _jsonl(tmp_path / "caps.jsonl", items)
    records = read_jsonl(path, tmp_path, split_ratios=(0.5, 0.25, 0.25), split_seed=3)
    assert records[0].path == tmp_path / "d" / "0.jpg" and records[0].captions == ("c0a", "c0b")
    assert records[0].image_id == "d/0.jpg"
    assert [r.image_id for r in records] == [x["image"] for x in items]  # file order kept
    splits = {r.image_id: r.split for r in records}
    assert sorted(splits.values()).count("train") == 10

    path.write_text(
        json.dumps({"image": "a.jpg", "captions": ["x"], "split": "test"})
        + "\n\n"  # blank lines are skipped
        + json.dumps({"image": "b.jpg", "captions": ["y"], "split": "train"})
        + "\n"
    )
    assert [r.split for r in read_jsonl(path, tmp_path)] == ["test", "train"]


def test_seeded_split_is_deterministic_disjoint_and_covers_every_split(tmp_path: Path) -> None:
    items = [{"image": f"{i}.jpg", "captions": ["c"]} for i in range(15)]
    path = _jsonl(tmp_path / "caps.jsonl", items)

    def assignment(seed: int, order: list) -> dict[str, str]:
        _jsonl(path, order)
        return {r.image_id: r.split for r in read_jsonl(path, tmp_path, split_seed=seed)}

    first = assignment(0, items)
    assert first == assignment(0, items[::-1])  # independent of the file order
    assert first != assignment(1, items)
    groups = [{i for i, s in first.items() if s == split} for split in ("train", "val", "test")]
    assert [len(g) for g in groups] == [13, 1, 1]  # 0.9 / 0.05 / 0.05, no split left empty
    assert set.union(*groups) == set(first) and sum(len(g) for g in groups) == len(first)
    five = assignment(0, items[:5])
    assert sorted(five.values()) == ["test", "train", "train", "train", "val"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2: invalid JSON"),
        ("[1, 2]", "line 2: expected an object, got list"),
        ('{"captions": ["x"]}', 'line 2: "image" must be a non-empty relative path'),
        ('{"image": 5, "captions": ["x"]}', 'line 2: "image" must be'),
        ('{"image": "a.jpg", "captions": []}', 'line 2: "captions" must be a non-empty list'),
        ('{"image": "a.jpg", "captions": "x"}', 'line 2: "captions" must be a non-empty list'),
        ('{"image": "a.jpg", "captions": ["ok", "   "]}', r"line 2: captions\[1\]: empty caption"),
        ('{"image": "a.jpg", "captions": ["ok", 4]}', r"line 2: captions\[1\]: caption must be"),
        ('{"image": "a.jpg", "captions": ["x"], "split": 1}', 'line 2: "split" must be'),
        ('{"image": "../etc/passwd", "captions": ["x"]}', "line 2: image path .* must be relative"),
        (
            '{"image": "ok.jpg", "captions": ["x"], "split": "val"}',
            "line 2: image ok.jpg has split",
        ),
    ],
)
def test_jsonl_bad_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "caps.jsonl"
    path.write_text('{"image": "ok.jpg", "captions": ["fine"], "split": "train"}\n' + line + "\n")
    with pytest.raises(DataError, match=message) as info:
        read_jsonl(path, tmp_path)
    assert str(info.value).startswith(str(path))


def test_custom_caption_counts_and_split_presence(tmp_path: Path) -> None:
    items = [
        {"image": "a.jpg", "captions": ["1", "2", "3"]},
        {"image": "b.jpg", "captions": ["1"]},
        {"image": "a.jpg", "captions": ["4", "5", "6", "7"]},  # merged, then cut to the max
    ]
    path = _jsonl(tmp_path / "caps.jsonl", items)
    records = read_jsonl(path, tmp_path, split_ratios=(1, 0, 0))
    assert [r.captions for r in records] == [("1", "2", "3", "4", "5"), ("1",)]
    path = _jsonl(path, [{**items[0], "split": "train"}, items[1]])
    with pytest.raises(DataError, match=r"caps.jsonl: 1 of 2 images have a split"):
        read_jsonl(path, tmp_path)
    path.write_text("\n")
    with pytest.raises(DataError, match="caps.jsonl: no captions"):
        read_jsonl(path, tmp_path)


def test_csv_groups_rows_by_image(tmp_path: Path) -> None:
    path = tmp_path / "caps.csv"
    path.write_bytes(
        b"\xef\xbb\xbfimage,caption,split\n"  # a byte-order mark, as spreadsheets write it
        b'a.jpg,"one, with comma",train\nb.jpg,two,test\n'
        b'a.jpg,"three\nlines",train\n'
    )
    records = read_csv(path, tmp_path)
    assert [(r.path.name, r.captions, r.split) for r in records] == [
        ("a.jpg", ("one, with comma", "three\nlines"), "train"),
        ("b.jpg", ("two",), "test"),
    ]
    path.write_text("image,caption\n" + "".join(f"{i}.jpg,c{i}\n" for i in range(10)))
    records = read_csv(path, tmp_path, split_ratios=(0.6, 0.2, 0.2), split_seed=1)
    assert sorted(r.split for r in records) == ["test"] * 2 + ["train"] * 6 + ["val"] * 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("picture,caption\na.jpg,x\n", r"caps.csv: header must be image,caption\[,split\]"),
        ("image,caption\nok.jpg,fine\na.jpg,\n", "caps.csv: line 3: empty caption"),
        ("image,caption\nok.jpg,fine\na.jpg\n", "caps.csv: line 3: expected 2 columns"),
        ("image,caption\nok.jpg,fine\na.jpg,x,y\n", "caps.csv: line 3: expected 2 columns"),
        ("image,caption,split\nok.jpg,x,train\na.jpg,y,\n", "caps.csv: 1 of 2 images"),
    ],
)
def test_csv_bad_rows_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "caps.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_csv(path, tmp_path)


def test_load_records_dispatch_skip_bad_and_select_split(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    karpathy = _karpathy(tmp_path, [_image(0, "train"), _image(1, "test", captions=2)])
    cfg = DataConfig(annotations=str(karpathy), image_root=str(tmp_path))
    with pytest.raises(DataError, match=r"images\[1\]"):
        load_records(cfg)
    with caplog.at_level(logging.WARNING):
        records = load_records(dataclasses.replace(cfg, skip_bad=True))
    assert [r.image_id for r in records] == ["0"] and "images[1]" in caplog.text
    assert len(select_split(records, "train")) == 1
    with pytest.raises(DataError, match=r"split 'test' is empty; splits present: \['train'\]"):
        select_split(records, "test")

    jsonl = _jsonl(tmp_path / "c.jsonl", [{"image": "a.jpg", "captions": ["x"], "split": "val"}])
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("image,caption,split\na.jpg,x,val\n")
    expected = [ImageRecord("a.jpg", tmp_path / "a.jpg", ("x",), "val")]
    for fmt, path in (("jsonl", jsonl), ("csv", csv_path)):
        got = load_records(DataConfig(format=fmt, annotations=str(path), image_root=str(tmp_path)))
        assert got == expected
    with pytest.raises(DataError, match="must both be set"):
        load_records(DataConfig())


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> CaptionTokenizer:
    return CaptionTokenizer.from_config(get_preset("tiny").model.text)


def test_tokenizer_truncates_and_pads(tokenizer: CaptionTokenizer) -> None:
    batch = tokenizer(["A red circle", " ".join(["word"] * 100)])
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 32)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.int64
    assert batch["attention_mask"][0].tolist() == [1] * 5 + [0] * 27  # [CLS] a red circle [SEP]
    assert batch["attention_mask"][1].sum() == 32
    hf = tokenizer.tokenizer
    assert batch["input_ids"][0, :5].tolist() == hf.convert_tokens_to_ids(
        ["[CLS]", "a", "red", "circle", "[SEP]"]
    )
    assert (batch["input_ids"][0, 5:] == hf.pad_token_id).all()
    assert batch["input_ids"][1, 31] == hf.sep_token_id
    short = tokenizer(["one", "two words"])
    assert short["input_ids"].shape == (2, 4)  # padded to the longest of the batch


def test_tokenizer_paths(tmp_path: Path) -> None:
    assert (
        CaptionTokenizer.from_config(TextTowerConfig(path="minilm", max_length=8)).max_length == 8
    )
    preferred = TextTowerConfig(path=str(tmp_path / "absent"), tokenizer_path="minilm")
    assert CaptionTokenizer.from_config(preferred)(["x"])["input_ids"].shape == (1, 3)
    with pytest.raises(DataError, match="tokenizer directory /nonexistent/tok not found"):
        CaptionTokenizer("/nonexistent/tok")
    with pytest.raises(DataError, match=f"tokenizer directory {tmp_path}: cannot load"):
        CaptionTokenizer(str(tmp_path))
    with pytest.raises(DataError, match="must be set"):
        CaptionTokenizer.from_config(TextTowerConfig())


# ---------------------------------------------------------------- images, datasets


def test_transforms_give_the_configured_sizes(tmp_path: Path) -> None:
    cfg = get_preset("paper").model.image
    image = Image.new("RGB", (300, 200), (200, 10, 10))
    for train in (True, False):
        assert build_transform(cfg, train)(image).shape == (3, cfg.image_size, cfg.image_size)
    scenes = get_preset("tiny").model.image
    no_flip = build_transform(scenes, train=True)
    assert "Flip" not in repr(no_flip) and "Flip" in repr(build_transform(cfg, train=True))
    centre = build_transform(scenes, train=False)(image)  # (3, 64, 64)
    expected = (torch.tensor([200, 10, 10]) / 255 - torch.tensor(scenes.mean)) / torch.tensor(
        scenes.std
    )
    assert torch.allclose(centre[:, 32, 32], expected, atol=1e-5)


def test_load_image_applies_exif_and_names_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATED_90
    Image.new("L", (40, 20)).save(path, exif=exif)
    image = load_image(path)
    assert image.size == (20, 40) and image.mode == "RGB"
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.jpg: cannot read image"):
        load_image(tmp_path / "broken.jpg")
    with pytest.raises(DataError, match="gone.jpg: image file not found"):
        load_image(tmp_path / "gone.jpg")


def test_datasets_and_collators(tmp_path: Path, tokenizer: CaptionTokenizer) -> None:
    cfg = get_preset("tiny").model.image
    for name, size in (("a.png", (120, 90)), ("b.png", (64, 64))):
        Image.new("RGB", size, (200, 10, 10)).save(tmp_path / name)
    items = [
        {"image": "a.png", "captions": ["one", "two words"]},
        {"image": "b.png", "captions": ["three"]},
    ]
    records = read_jsonl(_jsonl(tmp_path / "c.jsonl", items), tmp_path, split_ratios=(1, 0, 0))
    pairs = PairDataset(records, build_transform(cfg, train=False))
    assert len(pairs) == 3
    assert [pairs[i][1:] for i in range(3)] == [("one", 0), ("two words", 0), ("three", 1)]
    collate = PairCollator(tokenizer)
    pairs, collate = pickle.loads(pickle.dumps((pairs, collate)))  # DataLoader workers
    batch = collate([pairs[i] for i in range(3)])
    assert batch["images"].shape == (3, 3, cfg.image_size, cfg.image_size)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 4)
    assert batch["image_index"].tolist() == [0, 0, 1] and batch["image_index"].dtype == torch.int64

    images = ImageDataset(records, build_transform(cfg, train=False))
    loader = torch.utils.data.DataLoader(images, batch_size=2, collate_fn=image_collate)
    (batch,) = list(loader)
    assert batch["images"].shape == (2, 3, cfg.image_size, cfg.image_size)
    assert batch["image_index"].tolist() == [0, 1]


# ---------------------------------------------------------------- scenes


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def test_scenes_are_deterministic_karpathy_files(tmp_path: Path) -> None:
    sizes = {"n_train": 6, "n_val": 3, "n_test": 4, "image_size": 96}
    a = generate_scenes(tmp_path / "a", **sizes, seed=5)
    b = generate_scenes(tmp_path / "b", **sizes, seed=5)
    c = generate_scenes(tmp_path / "c", **sizes, seed=6)
    assert _digest(a.parent) == _digest(b.parent) != _digest(c.parent)
    data = json.loads(a.read_text())
    assert data["dataset"] == "synth" and a.name == "dataset_synth.json"
    sentid = 0
    for imgid, image in enumerate(data["images"]):
        assert image["imgid"] == imgid and image["sentids"] == [
            s["sentid"] for s in image["sentences"]
        ]
        for s in image["sentences"]:
            assert s["sentid"] == sentid and s["imgid"] == imgid and s["tokens"] == s["raw"].split()
            sentid += 1
    records = read_karpathy(a, a.parent)
    assert [r.split for r in records] == ["train"] * 6 + ["val"] * 3 + ["test"] * 4
    assert all(len(set(r.captions)) == 5 for r in records)  # 5 different captions
    assert len({r.captions for r in records}) == len(records)
    for record in records:
        with Image.open(record.path) as image:
            assert image.size == (96, 96)


def test_scene_groups_are_hard_negatives_in_one_split(tmp_path: Path) -> None:
    """Generated groups of three: the same coloured shapes (same pixel colours), yet
    different images and captions, all in one split."""
    path = generate_scenes(tmp_path, n_train=9, n_val=3, n_test=3, image_size=96, seed=2)
    records = read_karpathy(path, tmp_path)
    for start in range(0, len(records), 3):
        group = records[start : start + 3]
        assert len({r.split for r in group}) == 1
        pixels = [Image.open(r.path).convert("RGB") for r in group]
        colours = [{c for _, c in image.getcolors()} for image in pixels]
        assert colours[0] == colours[1] == colours[2]
        assert len({image.tobytes() for image in pixels}) == 3
        assert not set(group[0].captions) & (set(group[1].captions) | set(group[2].captions))


def test_siblings_swap_places_or_colours_and_every_caption_tells_them_apart() -> None:
    rng = random.Random(0)
    colour_words = set(COLORS)
    for _ in range(200):
        base, moved, recoloured = siblings(random_scene(rng))
        assert [o.cell for o in moved.objects[:2]] == [o.cell for o in base.objects[1::-1]]
        assert [o.color for o in recoloured.objects[:2]] == [o.color for o in base.objects[1::-1]]
        assert moved.objects[2:] == recoloured.objects[2:] == base.objects[2:]
        assert len({frozenset(s.objects) for s in (base, moved, recoloured)}) == 3
        seed = rng.random()
        captions = [scene_captions(s, random.Random(seed)) for s in (base, moved, recoloured)]
        for mine, moved_caption, recoloured_caption in zip(*captions):
            assert mine != moved_caption and mine != recoloured_caption
            words = set(mine.split())
            assert {base.objects[0].color, base.objects[1].color} <= words & colour_words


@pytest.mark.parametrize("name", ["scenes", "textured", "free"])
def test_every_scene_style_generates_a_dataset(tmp_path: Path, name: str) -> None:
    from hat.data import SCENE_STYLES

    style = SCENE_STYLES[name]
    sizes = {"n_train": 6, "n_val": 3, "n_test": 3, "image_size": 64, "style": style}
    a = generate_scenes(tmp_path / "a", **sizes, seed=4)
    b = generate_scenes(tmp_path / "b", **sizes, seed=4)
    assert _digest(a.parent) == _digest(b.parent)  # deterministic in every style
    records = read_karpathy(a, a.parent)
    assert len(records) == 12 and all(len(set(r.captions)) == 5 for r in records)
    with Image.open(records[0].path) as image:
        assert image.size == (64, 64)


@pytest.mark.parametrize("kind", ["plain", "noise", "stripes", "checker"])
def test_backgrounds_are_plain_or_textured(kind: str) -> None:
    from hat.data.synth import _background

    image = _background((128, 128, 128), kind, 64, random.Random(0))
    shades = len(image.getcolors(maxcolors=1 << 16))
    assert (shades == 1) if kind == "plain" else (shades >= 2)


def test_free_layout_relations_follow_the_geometry() -> None:
    from hat.data.synth import RELATION_GAP, SCENE_STYLES, SIZES

    style = SCENE_STYLES["free"]
    rng = random.Random(3)
    for _ in range(100):
        scene = random_scene(rng, style)
        assert len(scene.objects) in style.object_counts
        objects = scene.objects
        for i, o in enumerate(objects):  # inside the image, no overlaps
            r = SIZES[o.size]
            assert o.cell is None and r <= o.center[0] <= 1 - r and r <= o.center[1] <= 1 - r
            for p in objects[i + 1 :]:
                assert math.dist(o.center, p.center) >= r + SIZES[p.size]
        a, b = objects[:2]
        for caption in scene_captions(scene, random.Random(rng.random()), style):
            words = caption.split()
            if "left" in words and words.index(a.color) < words.index(b.color):
                assert a.center[0] < b.center[0] - RELATION_GAP, caption


def test_bad_scene_styles_are_refused() -> None:
    from hat.data import SceneStyle

    with pytest.raises(ValueError, match="at most 9"):
        SceneStyle(object_counts=(10,))
    with pytest.raises(ValueError, match="2 or more"):
        SceneStyle(object_counts=(1,))
    with pytest.raises(ValueError, match="sizes"):
        SceneStyle(sizes=("huge",))
