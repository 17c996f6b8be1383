"""Fitting the global-embedding heads with the towers frozen, and what uses the flag."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from support import assert_only_heads_changed

import hat
from hat.checkpoint import load_model, save_model
from hat.cli import main
from hat.config import DataConfig, GlobalFitConfig, IndexConfig
from hat.data import load_records, select_split
from hat.encoder import Encoder
from hat.global_heads import fit_global_heads, pooled_features
from hat.index import Index
from hat.losses import info_nce_loss
from hat.metrics import retrieval_metrics


def _train_split(annotations):
    data = DataConfig(annotations=str(annotations), image_root=str(annotations.parent))
    return select_split(load_records(data), "train")


def _global_rsum(model, feats) -> float:
    """rsum of the global embeddings alone, five captions per image."""
    with torch.no_grad():
        img = model.image_global_embedding(feats.images)  # (N, g)
        txt = model.text_global_embedding(feats.captions)  # (M, g)
    return retrieval_metrics(img @ txt.T, 5)["rsum"]


def test_fit_trains_only_the_heads_and_improves_global_retrieval(scenes) -> None:
    torch.manual_seed(0)
    model = hat.create_model("tiny")
    records = _train_split(scenes)
    encoder = Encoder(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    feats = pooled_features(encoder, records, progress=False)
    assert feats.images.shape == (len(records), model.config.embed_dim)
    assert feats.captions.shape[0] == sum(len(r.captions) for r in records)
    first = feats.captions[feats.first_caption]  # (N, d) each image's first caption
    with torch.no_grad():
        start_loss = info_nce_loss(
            model.image_global_embedding(feats.images)
            @ model.text_global_embedding(first).T
            / GlobalFitConfig.temperature
        ).item()
    start_rsum = _global_rsum(model, feats)
    cfg = GlobalFitConfig(epochs=60, batch_size=8, num_workers=0)
    report = fit_global_heads(encoder, records, cfg, False)
    assert model.has_trained_global
    assert_only_heads_changed(model.state_dict(), before)
    assert report.images == len(records) and report.epochs == 60
    assert report.loss < start_loss
    assert _global_rsum(model, feats) > start_rsum + 50  # of 600: the heads learned the split


def test_fit_refuses_images_without_captions(scenes) -> None:
    model = hat.create_model("tiny")
    records = _train_split(scenes)
    records[0] = dataclasses.replace(records[0], captions=())
    with pytest.raises(ValueError, match="without captions"):
        fit_global_heads(Encoder(model), records, progress=False)


def test_cli_fit_global_writes_a_new_model(tmp_path, scenes, capsys) -> None:
    torch.manual_seed(0)
    save_model(hat.create_model("tiny"), tmp_path / "model")
    args = [
        "fit-global", str(tmp_path / "model"), "--out", str(tmp_path / "fitted"),
        "--annotations", str(scenes), "--image-root", str(scenes.parent), "fit.epochs=2",
        "fit.num_workers=0",
    ]  # fmt: skip
    assert main(args) == 0
    assert load_model(tmp_path / "fitted").has_trained_global
    assert not load_model(tmp_path / "model").has_trained_global
    assert main(args) != 0  # never over an existing model
    assert "is not empty" in capsys.readouterr().err


def test_untrained_heads_make_search_exhaustive(tmp_path, collection, caplog) -> None:
    torch.manual_seed(0)
    model = hat.create_model("tiny")  # global_trained is False
    save_model(model, tmp_path / "model")
    cfg = IndexConfig(shortlist=1)
    Index.create(tmp_path / "index", tmp_path / "model", cfg).close()
    query = "a red circle to the left of a blue square"
    with Index.open(tmp_path / "index", cfg=cfg, writable=True) as index:
        index.add_images(collection["images"], progress=False)
        with caplog.at_level(logging.WARNING, logger="hat"):
            hits = index.search_text(query, k=3)
        assert "untrained global heads" in caplog.text
        exhaustive = index.search_text(query, k=3, exhaustive=True)
        assert [(h.id, h.score) for h in hits] == [(h.id, h.score) for h in exhaustive]
