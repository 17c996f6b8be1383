"""A corruption corpus: every kind of damage to an index folder gives one clear error
naming the file (never a traceback, never silently wrong or non-finite results),
``hat index verify`` finds it and ``--repair`` brings the index back."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from support import SCENES

from hat.cli import main
from hat.index import Index, IndexFormatError
from hat.index.store import DamagedFile


@pytest.fixture(scope="session")
def built_index(collection, tmp_path_factory) -> Path:
    """An index of the collection's images and captions, built once: copy it."""
    root = tmp_path_factory.mktemp("integrity") / "index"
    Index.create(root, collection["model"]).close()
    with Index.open(root, writable=True) as writer:
        writer.add_images(collection["images"], progress=False)
        writer.add_captions(collection["captions"], progress=False)
    return root


@pytest.fixture
def index_copy(built_index, tmp_path) -> Path:
    return Path(shutil.copytree(built_index, tmp_path / "index"))


def _segment(root: Path, kind: str = "image") -> Path:
    return sorted((root / "segments").glob(f"{kind}-*"))[0]


def _overwrite(path: Path, data: bytes, offset: int) -> None:
    """Bytes replaced in place: the file keeps its size."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _payload_offset(path: Path) -> int:
    """Where an .npy file's array data starts (after its header)."""
    array = np.load(path, mmap_mode="r")
    return path.stat().st_size - array.nbytes


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_a_healthy_index_verifies_and_keeps_both_faiss_files_current(index_copy, capsys):
    code, out = _cli(capsys, "index", "verify", str(index_copy))
    assert code == 0 and "ok" in out
    with Index.open(index_copy) as index:
        assert index.info()["problems"] == []
        # Adding captions after the images left the image faiss file current: readers
        # do not rebuild it at every open.
        assert index.store.read_faiss("image") is not None
        assert index.store.read_faiss("caption") is not None


@pytest.mark.parametrize(
    "damage",
    ["emptied", "truncated", "bad header", "garbage inside"],
)
def test_a_damaged_database_is_one_error_naming_it(index_copy, capsys, damage):
    database = index_copy / "index.sqlite"
    size = database.stat().st_size
    if damage == "emptied":
        database.write_bytes(b"")
    elif damage == "truncated":
        with open(database, "r+b") as f:
            f.truncate(size // 2)
    elif damage == "bad header":
        _overwrite(database, b"not a database!!", 0)
    else:
        _overwrite(database, np.random.default_rng(0).bytes(size - 200), 100)
    for argv in (
        ["index", "info", str(index_copy)],
        ["search", str(index_copy), "a red circle"],
        ["index", "add", str(index_copy)],
        ["index", "verify", str(index_copy)],
    ):
        code, out = _cli(capsys, *argv)
        assert code in (1, 2), (argv, out)
        assert "index.sqlite" in out and "Traceback" not in out, (argv, out)


def test_garbage_in_a_level_file_is_never_scored(index_copy, capsys):
    level = _segment(index_copy) / "level1.npy"
    start = _payload_offset(level)
    # float16 0xFFFF is NaN: what random bytes give among other values
    _overwrite(level, b"\xff" * 64 + np.random.default_rng(1).bytes(256), start)
    with Index.open(index_copy) as index, pytest.raises(DamagedFile, match="level1.npy"):
        index.search_text("a red circle", k=3, exhaustive=True)
    code, out = _cli(capsys, "search", str(index_copy), "a red circle", "--json")
    assert code == 2 and "level1.npy" in out and "NaN" not in out
    code, out = _cli(capsys, "index", "verify", str(index_copy))
    assert code == 1 and "level1.npy" in out and "checksum" in out


def test_finite_garbage_is_found_by_verify_and_repaired(tmp_path, collection, capsys):
    """Zeros in one segment's level file: finite, so only the checksums see them. The
    repair drops that segment; the other images then score as in the undamaged index,
    and adding the folder again re-encodes the dropped ones."""
    from hat.config import IndexConfig

    cfg = IndexConfig(commit_every=4)  # 3 segments of 4 images
    root = tmp_path / "index"
    Index.create(root, collection["model"], cfg).close()
    with Index.open(root, cfg=cfg, writable=True) as index:
        index.add_images(collection["images"], progress=False)
        query = "a red circle"
        before = {h.id: h.score for h in index.search_text(query, k=SCENES, exhaustive=True)}
    segment = sorted((root / "segments").glob("image-*"))[1]
    level = segment / "level2.npy"
    _overwrite(level, b"\x00" * 512, _payload_offset(level))
    code, out = _cli(capsys, "index", "verify", str(root))
    assert code == 1 and "level2.npy" in out and segment.name in out
    code, out = _cli(capsys, "index", "verify", str(root), "--repair")
    assert code == 0 and "dropped 4 image row(s)" in out
    code, out = _cli(capsys, "index", "verify", str(root))
    assert code == 0, out
    with Index.open(root, cfg=cfg, writable=True) as index:
        assert len(index) == SCENES - 4
        after = {h.id: h.score for h in index.search_text(query, k=SCENES, exhaustive=True)}
        assert set(after) < set(before)
        assert after == pytest.approx({i: before[i] for i in after}, abs=1e-6)
        report = index.add_images(collection["images"], progress=False)
        assert report.added == 4 and report.unchanged == SCENES - 4
        assert len(index.search_text(query, k=SCENES, exhaustive=True)) == SCENES


def test_garbage_global_embeddings_stop_add_before_it_writes(index_copy, collection, capsys):
    glob = _segment(index_copy) / "global.npy"
    _overwrite(glob, b"\x00" * 64, _payload_offset(glob))
    before = sorted(p.name for p in (index_copy / "segments").iterdir())
    code, out = _cli(capsys, "index", "add", str(index_copy), str(collection["images"]))
    assert code == 2 and "global.npy" in out and "nothing was written" in out
    assert "hat index verify" in out
    assert sorted(p.name for p in (index_copy / "segments").iterdir()) == before


@pytest.mark.parametrize("damage", ["truncated", "missing file", "missing segment"])
def test_a_truncated_or_missing_segment_is_reported_and_add_refuses(
    index_copy, collection, capsys, damage
):
    segment = _segment(index_copy)
    if damage == "truncated":
        with open(segment / "level3.npy", "r+b") as f:
            f.truncate(200)
    elif damage == "missing file":
        (segment / "level3.npy").unlink()
    else:
        shutil.rmtree(segment)
    with Index.open(index_copy) as index:
        problems = index.info()["problems"]
        assert problems and segment.name in problems[0]
        with pytest.raises(IndexFormatError, match=segment.name):
            index.search_text("a red circle", k=3)
    before = (index_copy / "index.sqlite").read_bytes()
    code, out = _cli(capsys, "index", "add", str(index_copy), str(collection["images"]))
    assert code == 2 and segment.name in out and "--repair" in out
    assert (index_copy / "index.sqlite").read_bytes() == before
    code, out = _cli(capsys, "index", "verify", str(index_copy), "--repair")
    assert code == 0
    with Index.open(index_copy, writable=True) as index:
        assert index.add_images(collection["images"], progress=False).added == SCENES


@pytest.mark.parametrize("damage", ["garbage", "swapped"])
def test_a_damaged_faiss_file_is_rebuilt_never_trusted(index_copy, capsys, caplog, damage):
    image_faiss, caption_faiss = index_copy / "image.faiss", index_copy / "caption.faiss"
    with Index.open(index_copy) as index:
        expected = [h.id for h in index.search_text("a red circle", k=5)]
    if damage == "garbage":
        image_faiss.write_bytes(b"IxFlgarbage" * 40)
    else:
        a, b = image_faiss.read_bytes(), caption_faiss.read_bytes()
        image_faiss.write_bytes(b)
        caption_faiss.write_bytes(a)
    with Index.open(index_copy) as index:
        assert [h.id for h in index.search_text("a red circle", k=5)] == expected
    assert "image.faiss" in caplog.text
    code, out = _cli(capsys, "index", "verify", str(index_copy))
    assert code == 1 and "image.faiss" in out
    code, out = _cli(capsys, "index", "verify", str(index_copy), "--repair")
    assert code == 0
    code, out = _cli(capsys, "index", "verify", str(index_copy))
    assert code == 0, out


def test_a_changed_manifest_is_refused_and_restored(index_copy, capsys):
    import json

    manifest = index_copy / "manifest.json"
    data = json.loads(manifest.read_text())
    data["levels"] = data["levels"][:2]  # a level removed: would silently sum two
    manifest.write_text(json.dumps(data))
    with pytest.raises(IndexFormatError, match="manifest.json.*--repair"):
        Index.open(index_copy)
    code, out = _cli(capsys, "index", "verify", str(index_copy), "--repair")
    assert code == 0 and "manifest.json" in out
    with Index.open(index_copy) as index:
        assert len(index.store.manifest.tokens) == 3
        assert len(index.search_text("a red circle", k=3)) == 3


def test_odd_files_in_place_of_the_lock_or_the_segments(index_copy, collection, capsys):
    lock = index_copy / "writer.lock"
    lock.unlink(missing_ok=True)
    lock.mkdir()
    code, out = _cli(capsys, "index", "add", str(index_copy), str(collection["images"]))
    assert code == 2 and "writer.lock" in out
    lock.rmdir()
    shutil.rmtree(index_copy / "segments")
    (index_copy / "segments").write_text("not a folder")
    code, out = _cli(capsys, "index", "info", str(index_copy))
    assert code == 2 and "segments" in out and "Traceback" not in out


def test_leftovers_of_an_interrupted_faiss_write_are_found_and_removed(index_copy, capsys):
    leftover = index_copy / ".image.faiss.abc123.tmp"
    leftover.write_bytes(b"half a faiss file")
    code, out = _cli(capsys, "index", "verify", str(index_copy))
    assert code == 1 and leftover.name in out
    with Index.open(index_copy, writable=True) as index:
        index.add_images(progress=False)  # any writer removes leftovers
    assert not leftover.exists()


def test_the_server_answers_a_damaged_segment_with_a_clear_503(index_copy):
    from fastapi.testclient import TestClient

    from hat.serve import create_app

    level = _segment(index_copy) / "level1.npy"
    _overwrite(level, b"\xff" * 4096, _payload_offset(level))
    with Index.open(index_copy) as index:
        client = TestClient(create_app(index))
        first = index.store.locations("image")[0][0]
        for response in (
            client.post("/search/text", json={"query": "a red circle", "k": 3}),
            client.get(f"/explain/{first}", params={"q": "a red circle", "format": "json"}),
        ):
            assert response.status_code == 503, response.text
            assert "level1.npy" in response.json()["detail"]
