"""The model: forward shapes, the hidden-state layer mapping, freezing and learning."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from transformers import AutoModel

import hat
from hat.config import LevelConfig, get_preset
from hat.losses import triplet_loss
from hat.model import HAT


def _batch(n: int = 4, length: int = 9, image_size: int = 64):
    images = torch.randn(n, 3, image_size, image_size)
    ids = torch.randint(1000, 5000, (n, length))
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return images, ids, mask


def test_list_models_has_presets() -> None:
    assert {"paper", "cpu", "tiny"} <= set(hat.list_models())


def test_tiny_forward_shapes() -> None:
    model = hat.create_model("tiny")
    images, ids, mask = _batch()
    img = model.encode_image(images)
    txt = model.encode_text(ids, mask)
    d = model.config.embed_dim
    assert [tuple(t.shape) for t in img.levels] == [(4, 64, d), (4, 16, d), (4, 4, d)]
    assert [tuple(t.shape) for t in txt.levels] == [(4, 9, d)] * 3
    assert txt.lengths.tolist() == [9, 5, 3, 9]
    scores = model.similarity(img, txt)
    assert scores.levels.shape == (3, 4, 4) and scores.total.shape == (4, 4)
    torch.testing.assert_close(scores.total, scores.levels.sum(0))
    assert scores.total.abs().max() <= 3.0


def test_widths_come_from_the_backbone() -> None:
    model = hat.create_model("tiny")
    embed = model.config.image.kwargs["embed_dim"]
    assert model.image_tower.widths == (2 * embed, 4 * embed, 8 * embed)
    assert set(model.image_tower.stage_norms) == {"2", "3"}  # stage 4 uses the final norm


def test_paper_preset_structure() -> None:
    cfg = get_preset("paper").model
    assert [(lv.image_stage, lv.text_layer) for lv in cfg.levels] == [(2, 4), (3, 10), (4, 12)]
    assert cfg.embed_dim == 768 and cfg.lambda_softmax == 9.0 and cfg.direction == "i2t"
    assert get_preset("paper").train.margin == 0.2


def test_text_layer_k_is_the_output_of_encoder_layer_k() -> None:
    """hidden_states[0] is the embedding output: level layer k must equal a k-layer encoder."""
    model = hat.create_model("tiny").eval()
    _, ids, mask = _batch()
    encoder = model.text_tower.encoder
    per_level = model.text_tower.layer_tokens(ids, mask)
    for level, hidden in zip(model.config.levels, per_level):
        k = level.text_layer
        config = copy.deepcopy(encoder.config)
        config.num_hidden_layers = k
        truncated = AutoModel.from_config(config, add_pooling_layer=False).eval()
        truncated.load_state_dict(encoder.state_dict(), strict=False)
        expected = truncated(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(hidden, expected)
        assert not torch.allclose(hidden, encoder.embeddings(input_ids=ids))


def test_image_stage_tokens_are_stage_outputs_in_row_major_order() -> None:
    model = hat.create_model("tiny").eval()
    images, _, _ = _batch()
    backbone = model.image_tower.backbone
    x = backbone.patch_embed(images)
    expected = {}
    for i, stage in enumerate(backbone.layers):
        x = stage(x)  # (B, H, W, C)
        expected[i + 1] = x.flatten(1, 2)
    got = model.image_tower.stage_tokens(images)
    for stage, tokens in zip(model.image_tower.stages, got):
        torch.testing.assert_close(tokens, model.image_tower.stage_norm(stage)(expected[stage]))


def test_levels_are_config() -> None:
    cfg = dataclasses.replace(
        get_preset("tiny").model, levels=(LevelConfig(image_stage=4, text_layer=3),)
    )
    model = HAT(cfg)
    images, ids, mask = _batch(n=3)
    assert model(images, ids, mask).levels.shape == (1, 3, 3)
    with pytest.raises(ValueError, match="text layer 7"):
        HAT(dataclasses.replace(cfg, levels=(LevelConfig(image_stage=2, text_layer=7),)))


def test_freeze_leaves_only_projections_trainable() -> None:
    model = hat.create_model("tiny")
    model.set_backbones_trainable(image=False, text=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    heads = {f"{side}_global.{p}" for side in ("image", "text") for p in ("weight", "bias")}
    assert heads <= trainable
    assert all(".projections." in n for n in trainable - heads)
    assert len(trainable - heads) == 2 * 2 * model.num_levels  # weight + bias, two towers
    model.set_backbones_trainable(image=True, text=False)
    assert any(p.requires_grad for p in model.image_tower.backbone.parameters())
    assert not any(p.requires_grad for p in model.text_tower.encoder.parameters())


def test_one_step_lowers_the_loss() -> None:
    model = hat.create_model("tiny")
    images, ids, mask = _batch(n=6)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(2):
        loss = triplet_loss(model(images, ids, mask).total, margin=0.2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]


def test_region_positions_tell_regions_apart() -> None:
    """``model.image.region_positions``: one learnt (T, C) table per level, added to the
    stage tokens before projection; it trains with the projections (not frozen with
    the backbone) and is off in the paper preset."""
    assert not get_preset("paper").model.image.region_positions
    cfg = get_preset("tiny").model
    image = dataclasses.replace(cfg.image, region_positions=True)
    model = HAT(dataclasses.replace(cfg, image=image)).eval()
    tower = model.image_tower
    assert [tuple(p.shape) for p in tower.region_positions] == [
        (1, g * g, w) for g, w in zip(tower.grid_sizes, tower.widths)
    ]
    model.set_backbones_trainable(image=False, text=False)
    assert all(p.requires_grad for p in tower.region_positions)
    images = torch.zeros(1, 3, 64, 64)  # a blank image: every region alike but for its place
    with_positions = model.encode_image(images).levels[0]  # (1, T, d)
    assert with_positions[0].std(dim=0).min() > 0
    for p in tower.region_positions:
        p.data.zero_()
    blank = model.encode_image(images).levels[0]  # (1, T, d)
    assert not torch.allclose(with_positions, blank)
