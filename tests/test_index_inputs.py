"""Hostile inputs to ``hat index`` and ``hat serve``: caption files of every form,
removing captions, symbolic links and special files among the images, and removed
images that must stop being served at once."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from support import SCENES

from hat.cli import main
from hat.data import DataError, ImageError, read_karpathy, select_split
from hat.demo import write_captions
from hat.index import Index, read_caption_file
from hat.index import reader as reader_module
from hat.index.reader import ImageFile, find_images, open_image_file
from hat.serve import create_app

NO_HANG_S = 300  # far above what indexing a dozen tiny images takes


def karpathy(images: list[dict]) -> str:
    return json.dumps({"images": images, "dataset": "flickr30k"}, indent=1)


def new_index(tmp_path: Path, collection) -> Index:
    Index.create(tmp_path / "index", collection["model"]).close()
    return Index.open(tmp_path / "index", writable=True)


def finishes(work, timeout: float = NO_HANG_S):
    """``work()``'s result; fails (instead of hanging the run) if it does not return
    in ``timeout`` seconds (a daemon thread blocked forever does not keep pytest)."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = work()
        except BaseException as err:  # re-raised below
            out["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"did not return within {timeout} s (blocked on a FIFO?)"
    if "error" in out:
        raise out["error"]
    return out["value"]


# -- caption files -------------------------------------------------------------------


def test_a_karpathy_file_is_read_by_content_whatever_its_name(tmp_path):
    text = karpathy(
        [
            {"filename": "a.jpg", "split": "test",
             "sentences": [{"raw": "A dog  runs."}, {"raw": "a brown dog"}]},
            {"filename": "b.jpg", "filepath": "val2014", "split": "train",
             "sentences": [{"raw": "a cat"}, {"raw": "one"}, {"raw": "two"}]},
        ]
    )  # fmt: skip
    for name in ("dataset_flickr30k.json", "captions.txt", "no_extension"):
        (tmp_path / name).write_text(text)
        entries = read_caption_file(tmp_path / name)
        assert [(e.text, e.image_path) for e in entries] == [
            ("A dog runs.", str(tmp_path / "a.jpg")),
            ("a brown dog", str(tmp_path / "a.jpg")),
            ("a cat", str(tmp_path / "val2014" / "b.jpg")),
            ("one", str(tmp_path / "val2014" / "b.jpg")),
            ("two", str(tmp_path / "val2014" / "b.jpg")),
        ]
    other = tmp_path / "images"
    entries = read_caption_file(tmp_path / "captions.txt", image_root=other)
    assert entries[0].image_path == str(other / "a.jpg")
    bad = karpathy([{"filename": "a.jpg", "sentences": [{"raw": "ok"}, {"tokens": ["x"]}]}])
    (tmp_path / "bad.json").write_text(bad)
    with pytest.raises(
        DataError, match=r'bad.json: images\[0\].sentences\[1\]: missing field "raw"'
    ):
        read_caption_file(tmp_path / "bad.json")


def test_the_generated_karpathy_file_names_images_that_exist(collection):
    annotations = collection["images"].parent / "dataset_synth.json"
    entries = read_caption_file(annotations)
    records = read_karpathy(annotations, annotations.parent)
    assert len(entries) == sum(len(r.captions) for r in records)
    assert all(Path(e.image_path).is_file() for e in entries)


def test_jsonl_takes_the_caption_and_the_dataset_forms(tmp_path):
    (tmp_path / "c.jsonl").write_text(
        '{"caption": "a red circle", "image": "x.png"}\n\n'
        '{"image": "y.png", "captions": ["one", "two"], "split": "train"}\n'
        '{"caption": "no image"}\n'
    )
    entries = read_caption_file(tmp_path / "c.jsonl")
    assert [(e.text, e.image_path) for e in entries] == [
        ("a red circle", str(tmp_path / "x.png")),
        ("one", str(tmp_path / "y.png")),
        ("two", str(tmp_path / "y.png")),
        ("no image", None),
    ]
    (tmp_path / "d.jsonl").write_text('{"caption": "ok"}\n{"text": "what"}\n')
    with pytest.raises(DataError, match=r'd.jsonl: line 2: expected an object with a "caption"'):
        read_caption_file(tmp_path / "d.jsonl")
    (tmp_path / "e.jsonl").write_text("a plain caption\n")
    with pytest.raises(DataError, match="e.jsonl: not JSON"):
        read_caption_file(tmp_path / "e.jsonl")


@pytest.mark.parametrize(
    "text, error",
    [
        ("[1, 2, 3]\n", "a JSON list is not a caption file"),
        ('{"name": "x"}\n', 'line 1: expected an object with a "caption"'),
        ('{"images": "all"}\n', '"images" must be a list'),
        ("{not json\nsecond line\n", "invalid JSON at line 1 column 2"),
        ('{"images": [\n {"filename": "a.jpg",\n', "invalid JSON at line 3 column 1"),
        ('{"caption": "ok"}\n[oops\n', "line 2: invalid JSON"),
    ],
)
def test_a_text_file_that_looks_like_json_but_is_no_known_form_is_refused(tmp_path, text, error):
    (tmp_path / "captions.txt").write_text(text)
    with pytest.raises(DataError, match="captions.txt") as caught:
        read_caption_file(tmp_path / "captions.txt")
    assert error in str(caught.value)
    if "invalid JSON" in error or "is not a caption file" in error:
        assert "Karpathy" in str(caught.value)  # says what it expected


def test_a_text_file_of_one_caption_object_and_of_plain_lines(tmp_path):
    (tmp_path / "one.txt").write_text('  {"caption": "a dog", "image": "d.png"}\n')
    assert read_caption_file(tmp_path / "one.txt")[0].text == "a dog"
    (tmp_path / "plain.txt").write_text("a dog {on} a mat\n\n  a [bracket]\n")
    assert [e.text for e in read_caption_file(tmp_path / "plain.txt")] == [
        "a dog {on} a mat",
        "a [bracket]",
    ]


@pytest.mark.parametrize(
    "text, error",
    [
        ('caption,image\n"a dog,x.png\nb,y.png\n', r"row 2 \(line 2\): malformed CSV"),
        ('caption,image\na,x.png\n"a "dog",y.png\n', r"row 3 \(line 3\): malformed CSV"),
        (
            "caption,image\na,x.png\nb,y.png,extra\n",
            r"row 3 \(line 3\): 3 fields, the header has 2",
        ),
        ("caption,image\na,x.png\nb\n", r"row 3 \(line 3\): 1 fields, the header has 2"),
    ],
)
def test_csv_rows_that_do_not_fit_the_header_are_refused(tmp_path, text, error):
    (tmp_path / "c.csv").write_text(text)
    with pytest.raises(DataError, match="c.csv: " + error):
        read_caption_file(tmp_path / "c.csv")


def test_a_well_formed_csv_keeps_quoted_commas_and_newlines(tmp_path):
    (tmp_path / "c.csv").write_text('caption,image\n"a dog, running",x.png\n"two\nlines",\n')
    entries = read_caption_file(tmp_path / "c.csv")
    assert [(e.text, e.image_path) for e in entries] == [
        ("a dog, running", str(tmp_path / "x.png")),
        ("two lines", None),
    ]


# -- removing captions ---------------------------------------------------------------------


def test_captions_can_be_removed_by_file_or_all(tmp_path, collection, capsys):
    with new_index(tmp_path, collection) as index:
        index.add_images(collection["images"], progress=False)
        assert index.add_captions(collection["captions"], progress=False) == SCENES
    # The same captions, from another folder: image paths relative to the file's folder.
    base = collection["captions"].parent
    lines = [json.loads(line) for line in collection["captions"].read_text().splitlines()[:3]]
    some = tmp_path / "elsewhere" / "some.jsonl"
    some.parent.mkdir()
    some.write_text(
        "".join(
            json.dumps({**item, "image": os.path.relpath(base / item["image"], some.parent)}) + "\n"
            for item in lines
        )
    )
    idx = str(tmp_path / "index")
    assert main(["index", "remove", idx, "--captions", str(some)]) == 0
    assert (
        f"removed 0 image(s), 3 caption(s); {SCENES} left, {SCENES - 3}" in capsys.readouterr().out
    )
    with Index.open(idx) as index:
        hits = index.search_image(sorted(collection["images"].glob("*.png"))[0], k=SCENES)
        assert len(hits) == SCENES - 3 and all(h.kind == "caption" for h in hits)
    assert main(["index", "remove", idx, "--captions", str(collection["captions"])]) == 0
    out = capsys.readouterr().out
    assert "3 caption(s) of" in out and f"{SCENES - 3} caption(s); {SCENES} left, 0" in out
    with Index.open(idx, writable=True) as index:
        index.add_captions(collection["captions"], progress=False)
        assert index.remove_captions(all_captions=True) == SCENES
        assert index.store.count("caption") == 0
        assert [h.kind for h in index.search_image(collection["images"] / "000000.png", 2)] == [
            "image",
            "image",
        ]
        with pytest.raises(ValueError, match="one of them"):
            index.remove_captions()
    assert main(["index", "remove", idx]) == 2
    assert "--all-captions" in capsys.readouterr().err
    (tmp_path / "junk.txt").write_text("[1]\n")
    assert main(["index", "remove", idx, "--captions", str(tmp_path / "junk.txt")]) == 2
    assert "junk.txt" in capsys.readouterr().err


# -- the demo's caption file ---------------------------------------------------------------


def test_demo_captions_name_images_that_exist_and_go_with_them(tmp_path, collection, monkeypatch):
    """The demo's layout: ``runs/demo/{data,test_captions.jsonl}``, relative to the
    working directory."""
    monkeypatch.chdir(tmp_path)
    out = Path("runs/demo")
    shutil.copytree(collection["images"].parent, out / "data")
    test = select_split(read_karpathy(out / "data/dataset_synth.json", out / "data"), "test")
    assert not test[0].path.is_absolute()
    captions = write_captions(out / "test_captions.jsonl", test)
    entries = read_caption_file(captions)
    assert len(entries) == sum(len(r.captions) for r in test)
    assert all(Path(e.image_path).is_file() for e in entries)
    with new_index(tmp_path, collection) as index:
        index.add_images(*[r.path for r in test], progress=False)
        assert index.add_captions(captions, progress=False) == len(entries)
        assert index.remove([r.path for r in test]) == len(test)
        assert (len(index), index.store.count("caption")) == (0, 0)


# -- symbolic links and special files ----------------------------------------------------


def test_links_fifos_and_devices_are_reported_and_skipped_never_fatal(
    tmp_path, collection, images_copy
):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(sorted(images_copy.glob("*.png"))[0], outside / "moved.png")
    (images_copy / "linked.png").symlink_to(outside / "moved.png")
    (images_copy / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (images_copy / "loop.png").symlink_to(images_copy / "loop.png")
    (images_copy / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(images_copy / "pipe.png")
    (images_copy / "sub").symlink_to(outside, target_is_directory=True)  # not followed

    # Finding never opens an entry: no hang on the FIFO, and no exception.
    found = {Path(f.path).name: f for f in finishes(lambda: find_images(images_copy))}
    assert found["linked.png"].path == str(images_copy / "linked.png")  # the link's path
    assert found["linked.png"].problem is None
    assert "dangling symbolic link" in found["dangling.png"].problem
    assert "loop" in found["loop.png"].problem
    assert "FIFO" in found["pipe.png"].problem
    assert "device" in found["zero.png"].problem
    assert "moved.png" not in found
    # Opening refuses what is not a regular file without blocking.
    started = time.monotonic()
    with pytest.raises(ImageError, match="pipe.png: cannot read image: not a regular file"):
        finishes(lambda: open_image_file(images_copy / "pipe.png"), timeout=30)
    assert time.monotonic() - started < 30

    with new_index(tmp_path, collection) as index:
        report = finishes(lambda: index.add_images(images_copy, progress=False))
        assert report.added == SCENES  # the 11 files beside the bad entries, and the link
        skipped = {Path(p).name: why for p, why in report.skipped}
        assert sorted(skipped) == ["dangling.png", "loop.png", "pipe.png", "zero.png"]
        assert all(Path(p).parent == images_copy for p, _ in report.skipped)
        paths = {h.path for h in index.search_text("a shape", k=2 * SCENES, exhaustive=True)}
        assert str(images_copy / "linked.png") in paths
        assert not any(p.startswith(str(outside)) for p in paths)
        # Removing the folder removes what was found through its links.
        assert index.remove([images_copy]) == SCENES
        assert len(index) == 0


def test_a_file_above_the_byte_limit_is_skipped(tmp_path, collection, images_copy, monkeypatch):
    big = sorted(images_copy.glob("*.png"))[0]
    monkeypatch.setattr(reader_module, "MAX_IMAGE_BYTES", big.stat().st_size - 1)
    item = ImageFile.stat(big)
    assert "limit" in item.problem and item.bytes == -1
    with new_index(tmp_path, collection) as index:
        small = tmp_path / "one"
        small.mkdir()
        shutil.copy(big, small / big.name)
        report = index.add_images(small, progress=False)
        assert report.added == 0 and "limit" in report.skipped[0][1]


def test_removing_a_link_leaves_its_target(tmp_path, collection, images_copy):
    target = sorted(images_copy.glob("*.png"))[0]
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "alias.png").symlink_to(target)
    with new_index(tmp_path, collection) as index:
        assert index.add_images(images_copy, tmp_path / "links", progress=False).added == SCENES + 1
        assert index.remove([tmp_path / "links" / "alias.png"]) == 1
        assert len(index) == SCENES


# -- the web app -------------------------------------------------------------------------


def test_removed_images_are_not_served_any_more(tmp_path, collection, images_copy):
    with new_index(tmp_path, collection) as writer:
        writer.add_images(images_copy, progress=False)
    with Index.open(tmp_path / "index") as served:
        client = TestClient(create_app(served))
        ids = [h.id for h in served.search_text("a shape", k=SCENES, exhaustive=True)]
        assert all(client.get(f"/images/{i}").status_code == 200 for i in ids)
        victim, kept, replaced = ids[:3]
        path = served.image_path(victim)
        with Index.open(tmp_path / "index", writable=True) as writer:  # as `hat index remove`
            assert writer.remove([path]) == 1
        assert client.get(f"/images/{victim}").status_code == 404
        assert client.get(f"/explain/{victim}", params={"q": "a shape"}).status_code == 404
        assert client.get(f"/images/{kept}").status_code == 200
        # A file replaced by a FIFO is refused, not waited on.
        fifo = served.image_path(replaced)
        os.unlink(fifo)
        os.mkfifo(fifo)
        response = finishes(lambda: client.get(f"/images/{replaced}"), timeout=60)
        assert response.status_code == 410
