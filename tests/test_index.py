"""Index build / add / remove / reopen / search, crash safety and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from support import SCENES, add_then_kill, start_add

import hat
from hat.checkpoint import save_model
from hat.cli import main
from hat.config import IndexConfig
from hat.data import CaptionTokenizer, DataError, build_transform, load_image
from hat.index import Index, IndexFormatError, read_caption_file
from hat.scorer import Scorer

# fp16 storage of the tokens: scores agree with float32 scoring to about this much.
FP16_SCORE_TOL = 2e-3


def build(tmp_path: Path, collection, images: Path, **cfg) -> Index:
    Index.create(tmp_path / "index", collection["model"], IndexConfig(**cfg)).close()
    index = Index.open(tmp_path / "index", cfg=IndexConfig(**cfg), writable=True)
    index.add_images(images, progress=False)
    return index


def test_build_and_search_text_matches_direct_scoring(tmp_path, collection):
    with build(tmp_path, collection, collection["images"]) as index:
        assert len(index) == SCENES
        info = index.info()
        assert [lv["grid"] for lv in info["levels"]] == [8, 4, 2]
        query = "a red circle to the left of a blue square"
        hits = index.search_text(query, k=5)
        exhaustive = index.search_text(query, k=5, exhaustive=True)
        # The shortlist (200) covers the 12 images, so two-stage equals exhaustive.
        assert [h.id for h in hits] == [h.id for h in exhaustive]
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        for h in hits:
            assert h.score == pytest.approx(sum(h.level_scores), abs=1e-5)
        # Same scores as encoding the files and scoring them directly with the model.
        model = hat.load_model(collection["model"])
        transform = build_transform(model.config.image, train=False)
        tokenizer = CaptionTokenizer.from_config(model.config.text)
        with torch.no_grad():
            pixels = torch.stack([transform(load_image(h.path)) for h in hits])
            batch = tokenizer([query])
            direct = Scorer(model.config).all_pairs(
                model.encode_image(pixels),
                model.encode_text(batch["input_ids"], batch["attention_mask"]),
            )
        for i, h in enumerate(hits):
            assert h.level_scores == pytest.approx(
                direct.levels[:, i, 0].tolist(), abs=FP16_SCORE_TOL
            )


def test_add_is_incremental(tmp_path, collection, images_copy):
    with build(tmp_path, collection, images_copy) as index:
        again = index.add_images(images_copy, progress=False)
        assert (again.added, again.updated, again.unchanged) == (0, 0, SCENES)
        files = sorted(images_copy.glob("*.png"))
        # New mtime, same content: re-stamped, not re-encoded.
        os.utime(files[0], ns=(time.time_ns(), time.time_ns() + 10**9))
        # New content at a known path, and a new file in a subfolder.
        Image.new("RGB", (64, 64), "white").save(files[1])
        (images_copy / "more").mkdir()
        shutil.copy(files[2], images_copy / "more" / "copy.png")
        report = index.add_images(images_copy, progress=False)
        assert (report.added, report.updated, report.unchanged) == (1, 1, SCENES - 1)
        assert len(index) == SCENES + 1
        assert index.add_images(images_copy, progress=False).unchanged == SCENES + 1


def test_remove_and_reopen(tmp_path, collection, images_copy):
    (images_copy / "sub").mkdir()
    files = sorted(images_copy.glob("*.png"))
    for f in files[:3]:
        shutil.move(f, images_copy / "sub" / f.name)
    with build(tmp_path, collection, images_copy) as index:
        assert index.remove([files[5]]) == 1
        assert index.remove([images_copy / "sub"]) == 3
        paths = {h.path for h in index.search_text("a shape", k=SCENES, exhaustive=True)}
    assert len(paths) == SCENES - 4
    assert str(files[5].resolve()) not in paths
    with Index.open(tmp_path / "index") as reopened:
        assert len(reopened) == SCENES - 4
        again = {h.path for h in reopened.search_text("a shape", k=SCENES)}
        assert again == paths


def test_captions_make_image_to_text_search_possible(tmp_path, collection):
    with build(tmp_path, collection, collection["images"]) as index:
        query = sorted(collection["images"].glob("*.png"))[0]
        alone = index.search_image(query, k=3)
        assert [h.kind for h in alone] == ["image"] * 3
        assert alone[0].path == str(query.resolve())  # itself, per-level cosine 1
        assert alone[0].score == pytest.approx(len(alone[0].level_scores), abs=1e-3)
        added = index.add_captions(collection["captions"], progress=False)
        assert added == SCENES  # 2 captions x 6 images
        assert index.add_captions(collection["captions"], progress=False) == 0
        hits = index.search_image(query, k=4)
        assert [h.kind for h in hits] == ["caption"] * 4
        assert all(h.text and h.path for h in hits)
        assert [h.id for h in hits] == [h.id for h in index.search_image(query, 4, True)]
        # Removing an image forgets the captions written for it.
        index.remove([query])
        assert index.store.count("caption") == SCENES - 2


def test_refuses_another_model_and_other_folders(tmp_path, collection):
    build(tmp_path, collection, collection["images"]).close()
    torch.manual_seed(1)
    save_model(hat.create_model("tiny"), tmp_path / "other")
    with pytest.raises(IndexFormatError, match="fingerprint"):
        Index.open(tmp_path / "index", model=tmp_path / "other")
    with pytest.raises(IndexFormatError, match="manifest.json is missing"):
        Index.open(tmp_path)
    manifest = tmp_path / "index" / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "format_version": 999}))
    with pytest.raises(IndexFormatError, match="format version 999"):
        Index.open(tmp_path / "index")
    with pytest.raises(IndexFormatError, match="not empty"):
        Index.create(tmp_path / "index", collection["model"])


def test_info_and_remove_never_load_the_model(tmp_path, collection, images_copy):
    """The model is loaded at its first use; a replaced model file is refused there."""
    shutil.copytree(collection["model"], tmp_path / "model")
    Index.create(tmp_path / "index", tmp_path / "model").close()
    with Index.open(tmp_path / "index", writable=True) as index:
        index.add_images(images_copy, progress=False)
    torch.manual_seed(1)
    shutil.rmtree(tmp_path / "model")
    save_model(hat.create_model("tiny"), tmp_path / "model")  # another model, same path
    victim = sorted(images_copy.rglob("*.png"))[0]
    assert main(["index", "info", str(tmp_path / "index")]) == 0
    assert main(["index", "remove", str(tmp_path / "index"), str(victim)]) == 0
    with Index.open(tmp_path / "index") as index:
        assert index.info()["images"] == SCENES - 1
        with pytest.raises(IndexFormatError, match="fingerprint"):
            index.search_text("a red circle")


def test_unreadable_files_are_reported_and_skipped(tmp_path, collection, images_copy):
    (images_copy / "empty.jpg").write_bytes(b"")
    (images_copy / "notes.png").write_text("not an image")
    Index.create(tmp_path / "index", collection["model"]).close()
    with Index.open(tmp_path / "index", writable=True) as index:
        report = index.add_images(images_copy, progress=False)
        assert report.added == SCENES
        assert sorted(Path(p).name for p, _ in report.skipped) == ["empty.jpg", "notes.png"]
        assert all("empty.jpg" in why or "notes.png" in why for _, why in report.skipped)


def test_reader_sees_a_writers_additions_and_leftovers_are_harmless(
    tmp_path, collection, images_copy
):
    files = sorted(images_copy.glob("*.png"))
    half = images_copy / "half"
    half.mkdir()
    for f in files[: SCENES // 2]:
        shutil.move(f, half / f.name)
    writer = build(tmp_path, collection, half)
    reader = Index.open(tmp_path / "index")
    assert len(reader.search_text("a shape", k=SCENES)) == SCENES // 2
    # Leftovers of a crashed writer: an unregistered segment and a temporary folder.
    segments = tmp_path / "index" / "segments"
    shutil.copytree(next(segments.iterdir()), segments / "image-000099")
    (segments / ".tmp-crashed").mkdir()
    writer.add_images(images_copy, progress=False)
    assert not (segments / "image-000099").exists() and not (segments / ".tmp-crashed").exists()
    assert len(reader.search_text("a shape", k=SCENES)) == SCENES
    # A stale faiss file (written before the last commit) is rebuilt in memory.
    (tmp_path / "index" / "image.faiss").unlink()
    fresh = Index.open(tmp_path / "index")
    assert len(fresh.search_text("a shape", k=SCENES)) == SCENES
    for index in (writer, reader, fresh):
        index.close()


def test_large_collections_use_an_approximate_index(tmp_path, collection):
    cfg = {"exact_max_items": 4, "nprobe": 64}
    with build(tmp_path, collection, collection["images"], **cfg) as index:
        kind = type(index.gallery("image").faiss).__name__
        assert "IVF" in kind
        hits = index.search_text("a red star", k=3)
        assert [h.id for h in hits] == [h.id for h in index.search_text("a red star", 3, True)]


def test_kill_during_add_keeps_previous_content_and_a_rerun_completes(
    tmp_path, collection, images_copy
):
    Index.create(tmp_path / "index", collection["model"]).close()
    add_then_kill(tmp_path / "index", images_copy, IndexConfig(batch_size=1, commit_every=1))


def test_readers_search_while_a_writer_adds(tmp_path, collection, images_copy):
    Index.create(tmp_path / "index", collection["model"]).close()
    reader = Index.open(tmp_path / "index")
    writer = start_add(tmp_path / "index", images_copy, IndexConfig(batch_size=1, commit_every=1))
    seen = []
    while writer.poll() is None:
        seen.append(len(reader.search_text("a shape", k=SCENES)))
    assert writer.wait() == 0
    seen.append(len(reader.search_text("a shape", k=SCENES)))
    assert seen == sorted(seen) and seen[-1] == SCENES
    assert len(set(seen)) > 2  # the reader saw the index grow, commit by commit
    reader.close()


def test_cli_build_add_search_remove(tmp_path, collection, images_copy, capsys):
    out = tmp_path / "index"
    args = ["index", "build", str(collection["model"]), str(images_copy), "--out", str(out)]
    assert main([*args, "--captions", str(collection["captions"]), "index.batch_size=4"]) == 0
    assert f"{SCENES} images, {SCENES} captions" in capsys.readouterr().out
    assert main(["index", "add", str(out), str(images_copy)]) == 0
    assert f"{SCENES} unchanged" in capsys.readouterr().out
    assert main(["search", str(out), "a red circle", "-k", "3", "--json", "--timing"]) == 0
    captured = capsys.readouterr()
    hits = json.loads(captured.out)
    assert len(hits) == 3 and all(h["kind"] == "image" for h in hits)
    assert "cold start to first answer" in captured.err and "warm query median" in captured.err
    query = sorted(images_copy.glob("*.png"))[0]
    assert main(["search", str(out), "--image", str(query), "-k", "2"]) == 0
    assert capsys.readouterr().out.count('"') >= 4  # two quoted captions
    assert main(["index", "remove", str(out), str(query)]) == 0
    assert f"{SCENES - 1} left" in capsys.readouterr().out
    assert main(["search", str(out)]) == 2
    assert "either a text query or --image" in capsys.readouterr().err
    assert main(["index", "info", str(tmp_path)]) == 2


def test_common_formats_found_recursively(tmp_path, collection):
    source = sorted(collection["images"].glob("*.png"))
    folder = tmp_path / "photos"
    (folder / "deeper" / "still").mkdir(parents=True)
    names = ["a.jpg", "b.JPEG", "c.webp", "d.bmp", "e.tiff", "deeper/f.tif", "deeper/still/g.png"]
    for src, name in zip(source, names):
        Image.open(src).convert("RGB").save(folder / name)
    frames = [Image.open(s).convert("RGB") for s in source[-2:]]
    frames[0].save(folder / "h.gif", save_all=True, append_images=frames[1:])
    (folder / "notes.txt").write_text("not an image")
    Index.create(tmp_path / "index", collection["model"]).close()
    with Index.open(tmp_path / "index", writable=True) as index:
        report = index.add_images(folder, progress=False)
        assert (report.added, report.skipped) == (len(names) + 1, [])
        paths = {Path(h.path).name for h in index.search_text("a shape", k=20, exhaustive=True)}
    assert paths == {Path(n).name for n in names} | {"h.gif"}


def test_python_api_entry_point(tmp_path, collection):
    build(tmp_path, collection, collection["images"]).close()
    hits = hat.Index.open(tmp_path / "index").search_text("a red circle", k=2)
    assert len(hits) == 2 and all(Path(h.path).is_file() for h in hits)


def test_caption_files(tmp_path):
    (tmp_path / "a.txt").write_text("a red circle\n\n  a  blue   square \n")
    texts = [e.text for e in read_caption_file(tmp_path / "a.txt")]
    assert texts == ["a red circle", "a blue square"]
    (tmp_path / "b.csv").write_text("caption,image\na star,x.png\nno image,\n")
    entries = read_caption_file(tmp_path / "b.csv")
    assert entries[0].image_path == str((tmp_path / "x.png").resolve())
    assert entries[1].image_path is None
    (tmp_path / "c.jsonl").write_text('{"caption": "ok"}\n{"caption": \n')
    with pytest.raises(DataError, match="c.jsonl: line 2"):
        read_caption_file(tmp_path / "c.jsonl")
    (tmp_path / "d.csv").write_text("text,image\nx,y\n")
    with pytest.raises(DataError, match="'caption' column"):
        read_caption_file(tmp_path / "d.csv")
    (tmp_path / "e.jsonl").write_text('{"caption": "   "}\n')
    with pytest.raises(DataError, match="e.jsonl: line 1: empty caption"):
        read_caption_file(tmp_path / "e.jsonl")
