"""Token codecs: round trips within their bounds, indexes that search exactly what their
decoded tokens score, crash safety and integrity of codebooks, format-1 indexes."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from support import add_then_kill

import hat
from hat.checkpoint import model_fingerprint
from hat.config import FieldRangeError, IndexConfig
from hat.features import ImageFeatures
from hat.index import Index, IndexFormatError
from hat.index.codec import PQ_MIN_TRAIN, SQ_BITS, SQ_MIN_TRAIN, TokenCodec, level_codecs
from hat.index.store import DamagedFile, IndexStore, Manifest, SegmentArrays
from hat.scorer import Scorer

# The tiny model's levels: 8x8, 4x4 and 2x2 grids of 32-wide tokens.
GRIDS = (8, 4, 2)
TOKENS = tuple(g * g for g in GRIDS)
DIM = 32
GLOBAL = 32
# A first segment too small to train any codec (3 x 64 < 256), then one that trains all of
# ("pq", "int8", "int4") per level: 160 x 64 >= 9,984, 160 x 16 >= 256, 160 x 4 >= 256.
SMALL, LARGE = 3, 160
# pq of 4 dims per byte on Gaussian tokens: mean squared error / variance below this.
PQ_RELATIVE_MSE = 0.25
SCORE_TOL = 1e-4
QUERY = "a red circle to the left of a blue square"


def _tokens(rng: np.random.Generator, n: int, t: int) -> np.ndarray:
    return rng.standard_normal((n, t, DIM)).astype(np.float32)  # (n, T, d)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_scalar_codecs_round_trip_within_a_step_of_each_dimension_range(name):
    rng = np.random.default_rng(0)
    tokens = _tokens(rng, SQ_MIN_TRAIN, 1)  # (n, 1, d)
    codec = TokenCodec(name, DIM, 4)
    codec.train(tokens)
    codes = codec.encode(tokens)
    assert codes.dtype == np.uint8 and codes.shape == (SQ_MIN_TRAIN, 1, DIM * SQ_BITS[name] // 8)
    step = (tokens.max(axis=(0, 1)) - tokens.min(axis=(0, 1))) / (2 ** SQ_BITS[name] - 1)  # (d,)
    error = np.abs(codec.decode(codes) - tokens)  # (n, 1, d)
    assert (error <= step + 1e-6).all()
    assert error.max() > step.min() / 10  # lossy: a bound that means something


def test_pq_round_trips_with_a_small_mean_error_at_one_eighth_of_float16():
    rng = np.random.default_rng(1)
    tokens = _tokens(rng, PQ_MIN_TRAIN, 1)
    codec = TokenCodec("pq", DIM, 4)
    with pytest.raises(ValueError, match="needs 9984 tokens"):
        codec.train(tokens[:-1])
    codec.train(tokens)
    codes = codec.encode(tokens)
    assert codes.shape == (PQ_MIN_TRAIN, 1, DIM // 4) and codec.code_size * 8 == 2 * DIM
    mse = float(((codec.decode(codes) - tokens) ** 2).mean())
    assert 0 < mse < PQ_RELATIVE_MSE * float(tokens.var())
    again = TokenCodec.deserialize("pq", DIM, 4, codec.serialize())
    assert np.array_equal(again.encode(tokens), codes)


def test_bad_codec_settings_are_refused_naming_the_field(collection, tmp_path):
    with pytest.raises(FieldRangeError, match="token_codecs.*'zip'"):
        IndexConfig(token_codecs=("zip",))
    with pytest.raises(ValueError, match="index.token_codecs: 2 codecs"):
        level_codecs(("pq", "int8"), 3)
    with pytest.raises(ValueError, match="index.codec_dims_per_byte: 5 does not divide .* 32"):
        cfg = IndexConfig(token_codecs=("pq",), codec_dims_per_byte=5)
        Index.create(tmp_path / "a", collection["model"], cfg)


def _synthetic_index(root: Path, model_dir: Path, codecs: tuple[str, ...]) -> list[np.ndarray]:
    """An index of ``SMALL`` then ``LARGE`` images of random tokens for the tiny model;
    returns the float32 tokens of each level, in id order."""
    model = hat.load_model(model_dir)
    manifest = Manifest(
        model_path=str(model_dir), fingerprint=model_fingerprint(model), tokens=TOKENS,
        grids=GRIDS, embed_dim=DIM, global_dim=GLOBAL, codecs=level_codecs(codecs, len(GRIDS)),
    )  # fmt: skip
    store = IndexStore.create(root, manifest)
    rng = np.random.default_rng(2)
    levels: list[list[np.ndarray]] = [[] for _ in TOKENS]
    with store.writer():
        for first, n in ((0, SMALL), (SMALL, LARGE)):
            tokens = [_tokens(rng, n, t).astype(np.float16) for t in TOKENS]  # (n, T_k, d)
            rows = [{"path": f"/img/{first + i}.png", "sha256": "0", "bytes": 1, "mtime_ns": 0,
                     "width": 1, "height": 1} for i in range(n)]  # fmt: skip
            glob = rng.standard_normal((n, GLOBAL)).astype(np.float32)  # (n, g)
            store.commit_images(rows, SegmentArrays(tokens, glob))
            for k, t in enumerate(tokens):
                levels[k].append(t.astype(np.float32))
    store.close()
    return [np.concatenate(t) for t in levels]


def _decoded_directly(root: Path, codecs: tuple[str, ...]) -> list[np.ndarray]:
    """Each level's tokens read from the segment files and decoded with the stored
    codebooks, without the gallery."""
    import faiss

    out: list[list[np.ndarray]] = [[] for _ in TOKENS]
    for folder in sorted((root / "segments").glob("image-*")):
        for k in range(len(TOKENS)):
            plain = folder / f"level{k + 1}.npy"
            if plain.exists():
                out[k].append(np.load(plain).astype(np.float32))
                continue
            codebook = faiss.read_index(str(root / f"codebook-level{k + 1}.faiss"))
            codes = np.load(folder / f"level{k + 1}.codes.npy")  # (n, T, c)
            flat = codebook.sa_decode(codes.reshape(-1, codes.shape[-1]))
            out[k].append(flat.reshape(*codes.shape[:2], DIM))
    return [np.concatenate(t) for t in out]


@pytest.mark.parametrize(
    "codecs", [("float16",), ("int8",), ("int4",), ("pq",), ("pq", "int8", "int4")]
)
def test_an_index_searches_exactly_what_its_decoded_tokens_score(collection, tmp_path, codecs):
    root = tmp_path / "index"
    original = _synthetic_index(root, collection["model"], codecs)
    seg1, seg2 = sorted((root / "segments").glob("image-*"))
    # The small first segment trained nothing: float16, readable; the large one is coded.
    assert sorted(p.name for p in seg1.glob("level*")) == ["level1.npy", "level2.npy", "level3.npy"]
    trained = [
        c != "float16" and LARGE * t >= (PQ_MIN_TRAIN if c == "pq" else SQ_MIN_TRAIN)
        for c, t in zip(level_codecs(codecs, len(TOKENS)), TOKENS)
    ]
    for k, coded in enumerate(trained):
        assert (seg2 / f"level{k + 1}.codes.npy").exists() == coded
        assert (root / f"codebook-level{k + 1}.faiss").exists() == coded
    decoded = _decoded_directly(root, codecs)
    for k, coded in enumerate(trained):
        if not coded:
            assert np.abs(decoded[k][SMALL:] - original[k][SMALL:]).max() < 2e-3 * 4
        elif codecs[0] != "pq" or len(codecs) > 1:
            assert not np.array_equal(decoded[k][SMALL:], original[k][SMALL:])
    with Index.open(root, model=collection["model"]) as index:
        assert index.info()["token_codecs"] == list(level_codecs(codecs, len(TOKENS)))
        hits = index.search_text(QUERY, k=10, exhaustive=True)
        model = index.model
        query = index.encoder.encode_captions([QUERY])
    gallery = ImageFeatures(
        [torch.from_numpy(t) for t in decoded], torch.zeros(len(decoded[0]), GLOBAL)
    )
    with torch.no_grad():
        direct = Scorer(model.config).all_pairs(gallery, query).levels.sum(0)[:, 0]  # (G,)
    best = direct.topk(10)
    assert [h.id - 1 for h in hits] == best.indices.tolist()  # ids count from 1
    assert [h.score for h in hits] == pytest.approx(best.values.tolist(), abs=SCORE_TOL)


def test_a_codebook_that_fails_its_checksum_is_refused_and_repaired(collection, tmp_path, capsys):
    from hat.cli import main

    root = tmp_path / "index"
    _synthetic_index(root, collection["model"], ("int8",))
    codebook = root / "codebook-level1.faiss"
    data = bytearray(codebook.read_bytes())
    data[-1] ^= 0xFF
    codebook.write_bytes(bytes(data))
    with pytest.raises(DamagedFile, match="codebook-level1.faiss.*checksum"):
        Index.open(root)
    assert main(["index", "verify", str(root)]) == 1
    assert "codebook-level1.faiss" in capsys.readouterr().out
    # The repair drops the codebook and the segment coded with it (its codes mean
    # nothing without it); the float16 segment before it stays searchable.
    assert main(["index", "verify", str(root), "--repair"]) == 0
    capsys.readouterr()
    assert not codebook.exists()
    with Index.open(root, model=collection["model"]) as index:
        assert len(index) == SMALL
        assert len(index.search_text(QUERY, k=SMALL, exhaustive=True)) == SMALL
        assert index.verify().ok


def test_a_commit_that_dies_after_training_leaves_the_previous_content(collection, tmp_path):
    root = tmp_path / "index"
    _synthetic_index(root, collection["model"], ("int8",))
    for path in root.glob("codebook-*"):
        path.unlink()
    with sqlite3.connect(root / "index.sqlite") as db:  # back to before the large segment
        db.execute("DELETE FROM images WHERE segment = 2")
        db.execute("DELETE FROM segments WHERE id = 2")
        db.execute("DELETE FROM files WHERE name LIKE 'codebook-%'")
        db.execute("DELETE FROM meta WHERE key LIKE 'codebook_%'")
    # What a kill between the codebook's write and the commit leaves: an unrecorded
    # codebook and an unregistered segment folder.
    (root / "codebook-level1.faiss").write_bytes(b"half a codebook")
    with Index.open(root, model=collection["model"]) as index:
        assert len(index.search_text(QUERY, k=SMALL, exhaustive=True)) == SMALL
        problems = {p.part for p in index.verify().problems}
        assert problems == {"orphan"}
    with Index.open(root, writable=True) as index, index.store.writer():
        assert not (root / "codebook-level1.faiss").exists()  # removed as an orphan


def test_kill_9_during_a_compressed_build_keeps_the_previous_content(
    tmp_path, collection, images_copy
):
    cfg = IndexConfig(batch_size=4, commit_every=4, token_codecs=("int8",))
    Index.create(tmp_path / "index", collection["model"], cfg).close()
    survivors = add_then_kill(tmp_path / "index", images_copy, cfg, committed=4)
    assert survivors >= 4
    # 4 images x 64 tokens trained level 1's codec on the first segment.
    assert (tmp_path / "index" / "codebook-level1.faiss").exists()
    assert list((tmp_path / "index" / "segments").glob("image-*/level1.codes.npy"))
    with Index.open(tmp_path / "index") as index:
        assert index.verify().ok


def _rewrite_manifest(root: Path, edit) -> None:
    """Rewrite the manifest and its recorded copy with ``edit(dict)``."""
    data = json.loads((root / "manifest.json").read_text())
    edit(data)
    text = json.dumps(data, indent=2) + "\n"
    (root / "manifest.json").write_text(text)
    with sqlite3.connect(root / "index.sqlite") as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'manifest'", (text,))


def test_a_format_1_index_opens_as_float16_and_a_newer_one_is_refused(collection_index, tmp_path):
    root = Path(shutil.copytree(collection_index, tmp_path / "index"))

    def to_v1(data: dict) -> None:
        data["format_version"] = 1
        data.pop("codec_dims_per_byte")
        for level in data["levels"]:
            level.pop("codec")

    _rewrite_manifest(root, to_v1)
    with Index.open(root) as index:
        info = index.info()
        assert info["format_version"] == 1 and info["token_codecs"] == ["float16"] * 3
        assert info["problems"] == []
        assert len(index.search_text(QUERY, k=3)) == 3
    _rewrite_manifest(root, lambda data: data.update(format_version=3))
    with pytest.raises(IndexFormatError, match="format version 3, this hat reads versions 1, 2"):
        Index.open(root)
