"""Import of the official release layout (spec section 6), built here from random models.

The model has the paper's structure shrunk: levels on Swin stages 2 / 3 / 4 and on
BERT layers 1 / 2 / 3 (so nothing may assume layers 4 / 10 / 12), and two blocks per
stage so that shifted blocks and their ``attn_mask`` exist.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support import HEADS
from transformers import AutoTokenizer

from hat.checkpoint import CheckpointError, load_model
from hat.config import LevelConfig, get_preset
from hat.model import HAT
from hat.official import (
    convert_official_state_dict,
    export_official_state_dict,
    import_official_checkpoint,
    read_official_checkpoint,
)

_TINY = get_preset("tiny").model
CFG = dataclasses.replace(
    _TINY, image=dataclasses.replace(_TINY.image, kwargs={**_TINY.image.kwargs, "depths": (2,) * 4})
)


def _model(seed: int) -> HAT:
    torch.manual_seed(seed)
    return HAT(CFG).eval()


def _release(model: HAT) -> dict[str, torch.Tensor]:
    """The export plus the parts of a real release that HAT drops."""
    state = export_official_state_dict(model)
    widths = [info["num_chs"] for info in model.image_tower.backbone.feature_info]
    state["vit_model.norm_0.weight"] = torch.randn(widths[0])  # stage-1 norm, unused
    state["vit_model.norm_0.bias"] = torch.randn(widths[0])
    state["vit_model.head.weight"] = torch.randn(5, widths[-1])
    state["vit_model.head.bias"] = torch.randn(5)
    hidden = model.text_tower.encoder.config.hidden_size
    state["text_transformer.pooler.dense.weight"] = torch.randn(hidden, hidden)
    state["text_transformer.pooler.dense.bias"] = torch.randn(hidden)
    return state


def _save(tmp_path: Path, state: dict, **extra) -> Path:
    path = tmp_path / "hat.ckpt"
    torch.save({"state_dict": state, "epoch": 3, **extra}, path)
    return path


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    size = CFG.image.image_size
    images = torch.randn(3, 3, size, size, generator=g)
    ids = torch.randint(1000, 3000, (4, 9), generator=g)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[2, 5:] = 0
    return images, ids, mask


@torch.no_grad()
def _outputs(model: HAT) -> list[torch.Tensor]:
    """Per-level image and text features and per-level scores on fixed inputs."""
    images, ids, mask = _inputs()
    image = model.encode_image(images)
    text = model.encode_text(ids, mask)
    return [*image.levels, *text.levels, model.similarity(image, text).levels]


@functools.cache
def _expected(seed: int) -> list[torch.Tensor]:
    return _outputs(_model(seed))


def _assert_outputs_of(model: HAT, seed: int) -> None:
    """``model`` gives the features and scores of the random model built with ``seed``."""
    for x, y in zip(_outputs(model), _expected(seed), strict=True):
        assert torch.allclose(x, y, atol=1e-6, rtol=0)


def test_export_has_the_old_timm_layout() -> None:
    model = _model(0)
    state = export_official_state_dict(model)
    ours = model.state_dict()
    for i in range(3):  # merging at the END of old stage i = at the START of our stage i + 1
        for part in ("norm.weight", "norm.bias", "reduction.weight"):
            assert torch.equal(
                state[f"vit_model.layers.{i}.downsample.{part}"],
                ours[f"image_tower.backbone.layers.{i + 1}.downsample.{part}"],
            )
    assert not any(k.startswith("vit_model.layers.3.downsample") for k in state)
    # Levels in order: stage 2 / layer 1 -> "_1", stage 3 / layer 2 -> "_2", top -> no suffix.
    for k, suffix in enumerate(("_1", "_2", "")):
        for tower in ("image", "text"):
            assert torch.equal(
                state[f"cross_modal_{tower}_transform{suffix}.weight"],
                ours[f"{tower}_tower.projections.{k}.weight"],
            )
    assert torch.equal(state["vit_model.norm_1.weight"], ours["image_tower.stage_norms.2.weight"])
    assert torch.equal(state["vit_model.norm_2.weight"], ours["image_tower.stage_norms.3.weight"])
    assert torch.equal(state["vit_model.norm.weight"], ours["image_tower.backbone.norm.weight"])
    # Old timm saved these buffers: every block's index, the masks of shifted blocks only
    # (stages 3 and 4 are no larger than a window, so they do not shift).
    for stage in range(4):
        for block in range(2):
            prefix = f"vit_model.layers.{stage}.blocks.{block}."
            assert f"{prefix}attn.relative_position_index" in state
            assert (f"{prefix}attn_mask" in state) == (block == 1 and stage < 2)
    assert not any(k.startswith(HEADS) for k in state)


def _old_relative_position_index(window: int) -> torch.Tensor:
    """timm 0.4.x / the reference's formula, written out independently."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])  # 2, W*W
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def test_old_layout_semantics() -> None:
    """What the reference computes with the exported weights is what our modules compute."""
    model = _model(0)
    state = export_official_state_dict(model)
    backbone = model.image_tower.backbone
    # Old patch merging (end of stage 1): concat x[0::2, 0::2], x[1::2, 0::2],
    # x[0::2, 1::2], x[1::2, 1::2], then norm and reduction.
    width = backbone.feature_info[0]["num_chs"]
    x = torch.randn(2, 8, 8, width)
    merged = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    old = (
        F.layer_norm(
            merged,
            (4 * width,),
            state["vit_model.layers.0.downsample.norm.weight"],
            state["vit_model.layers.0.downsample.norm.bias"],
        )
        @ state["vit_model.layers.0.downsample.reduction.weight"].T
    )
    with torch.no_grad():
        assert torch.allclose(backbone.layers[1].downsample(x), old, atol=1e-6, rtol=0)
    # The relative position index (window 4 in stage 1, the shrunken 2 in stage 4) and
    # the bias table it indexes have the old shapes and values.
    for stage, window in ((0, 4), (3, 2)):
        prefix = f"vit_model.layers.{stage}.blocks.0.attn."
        assert torch.equal(
            state[prefix + "relative_position_index"], _old_relative_position_index(window)
        )
        heads = CFG.image.kwargs["num_heads"][stage]
        assert state[prefix + "relative_position_bias_table"].shape == (
            (2 * window - 1) ** 2,
            heads,
        )


def test_import_reproduces_the_model(tmp_path: Path) -> None:
    original = _model(1)
    path = _save(tmp_path, _release(original))
    torch.manual_seed(2)
    imported = import_official_checkpoint(path, out_dir=tmp_path / "model", model_config=CFG)
    fresh = _model(2)  # what the global heads are without the release
    assert not imported.training
    assert not imported.has_trained_global  # the release has no global heads
    for key, value in imported.state_dict().items():
        expected = fresh if key.startswith(HEADS) else original
        assert torch.equal(value, expected.state_dict()[key]), key
    _assert_outputs_of(imported, 1)
    reloaded = load_model(tmp_path / "model")
    _assert_outputs_of(reloaded, 1)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model", local_files_only=True)
    assert len(tokenizer) == 30522  # bert-base-uncased's vocabulary
    assert tokenizer("Hello World")["input_ids"] == [101, 7592, 2088, 102]


def test_bare_state_dict_round_trip(tmp_path: Path) -> None:
    original = _model(1)
    torch.save(export_official_state_dict(original), tmp_path / "bare.pt")
    state = read_official_checkpoint(tmp_path / "bare.pt")
    target = _model(3)
    target.load_state_dict(convert_official_state_dict(state, target))
    _assert_outputs_of(target, 1)
    assert export_official_state_dict(target).keys() == state.keys()


def _set(key: str, value: torch.Tensor):
    return lambda s: s.update({key: value})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda s: s.pop("cross_modal_text_transform_2.weight"),
            r"missing \(1\): cross_modal_text_transform_2\.weight \(-> text_tower\.projections\.1",
        ),
        (
            lambda s: s.pop("vit_model.layers.1.downsample.norm.bias"),
            r"missing \(1\): vit_model\.layers\.1\.downsample\.norm\.bias "
            r"\(-> image_tower\.backbone\.layers\.2\.downsample",
        ),
        (
            _set("vit_model.layers.0.downsample.reduction.weight", torch.zeros(3, 3)),
            r"shape \(1\): vit_model\.layers\.0\.downsample\.reduction\.weight: "
            r"checkpoint \(3, 3\)",
        ),
        (_set("mystery_head.weight", torch.zeros(1)), r"unexpected \(1\): mystery_head\.weight"),
        (_set("vit_model.norm_9.weight", torch.zeros(1)), r"unexpected \(1\): vit_model\.norm_9"),
        (  # stage 4 is no larger than a window: a release that shifts there attends differently
            _set("vit_model.layers.3.blocks.1.attn_mask", torch.zeros(1, 4, 4)),
            r"unexpected \(1\): vit_model\.layers\.3\.blocks\.1\.attn_mask",
        ),
        (  # e.g. another window size
            _set("vit_model.layers.0.blocks.0.attn.relative_position_index", torch.zeros(16, 16)),
            r"recomputed one \(1\): vit_model\.layers\.0\.blocks\.0\.attn\.relative_position_index",
        ),
        (
            _set("text_transformer.embeddings.position_ids", torch.arange(1, 65)[None]),
            r"recomputed one \(1\): text_transformer\.embeddings\.position_ids",
        ),
    ],
)
def test_strict_errors_name_the_tensor(tmp_path: Path, edit, message: str) -> None:
    state = _release(_model(0))
    edit(state)
    path = _save(tmp_path, state)
    with pytest.raises(CheckpointError, match=message) as info:
        import_official_checkpoint(path, out_dir=tmp_path / "model", model_config=CFG)
    assert str(path) in str(info.value)
    assert not (tmp_path / "model").exists()


def test_every_problem_is_listed_at_once() -> None:
    model = _model(0)
    state = _release(model)
    state.pop("cross_modal_image_transform.bias")
    state.pop("text_transformer.encoder.layer.0.output.dense.weight")
    state["extra.bias"] = torch.zeros(1)
    state["vit_model.patch_embed.proj.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        convert_official_state_dict(state, model)
    text = str(info.value)
    for name in (
        "missing (2)",
        "cross_modal_image_transform.bias",
        "text_transformer.encoder.layer.0.output.dense.weight",
        "unexpected (1): extra.bias",
        "shape (1): vit_model.patch_embed.proj.weight",
    ):
        assert name in text


def test_stored_buffers_and_position_ids_that_match_are_accepted() -> None:
    model = _model(0)
    state = _release(model)
    state["text_transformer.embeddings.position_ids"] = torch.arange(64)[None]
    converted = convert_official_state_dict(state, model)
    assert converted.keys() == model.state_dict().keys()


def test_levels_must_run_low_to_high() -> None:
    levels = tuple(reversed(CFG.levels))
    with pytest.raises(CheckpointError, match="low to high"):
        export_official_state_dict(HAT(dataclasses.replace(CFG, levels=levels)))
    two = (LevelConfig(image_stage=3, text_layer=2), LevelConfig(image_stage=4, text_layer=3))
    with pytest.raises(CheckpointError, match="3 levels"):
        export_official_state_dict(HAT(dataclasses.replace(CFG, levels=two)))


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickled_objects_need_trust(tmp_path: Path, zip_format: bool) -> None:
    path = tmp_path / "hat.ckpt"
    checkpoint = {
        "state_dict": _release(_model(1)),
        "hyper_parameters": {"config": types.SimpleNamespace(lr=1e-4)},
    }
    torch.save(checkpoint, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError) as info:
        read_official_checkpoint(path)
    for part in (str(path), "types.SimpleNamespace", "--trust-checkpoint", "trust=True"):
        assert part in str(info.value)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        import_official_checkpoint(path, model_config=CFG)
    imported = import_official_checkpoint(path, trust=True, model_config=CFG)
    _assert_outputs_of(imported, 1)


def test_trusted_read_survives_classes_not_installed(tmp_path: Path, monkeypatch) -> None:
    # A class of a module that is importable when the file is written, not when it is read.
    module = types.ModuleType("lightning_like")
    for name, base in (("Callback", object), ("AttributeDict", dict), ("Stages", list)):
        setattr(module, name, type(name, (base,), {"__module__": "lightning_like"}))
    monkeypatch.setitem(sys.modules, "lightning_like", module)
    path = tmp_path / "hat.ckpt"
    state = _release(_model(1))
    torch.save(  # Lightning 1.3 keys callback states by the callback's class
        {
            "state_dict": state,
            "callbacks": {module.Callback: {"best": torch.tensor(0.5)}},
            "hyper_parameters": module.AttributeDict(
                config={"lr": 1e-4}, stages=module.Stages("ab")
            ),
        },
        path,
    )
    monkeypatch.delitem(sys.modules, "lightning_like")
    with pytest.raises(CheckpointError, match="lightning_like.Callback"):
        read_official_checkpoint(path)
    loaded = read_official_checkpoint(path, trust=True)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "not found"), (b"not a checkpoint", "cannot read"), ({"epoch": 3}, "no state_dict")],
)
def test_unreadable_files(tmp_path: Path, content, message: str) -> None:
    path = tmp_path / "hat.ckpt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=message):
        read_official_checkpoint(path)


def test_non_tensor_entries_are_refused(tmp_path: Path) -> None:
    path = _save(tmp_path, {"vit_model.norm.weight": torch.ones(2), "step": 3})
    with pytest.raises(CheckpointError, match="not tensors: \\['step'\\]"):
        read_official_checkpoint(path)


def test_cli_import(tmp_path: Path) -> None:
    from hat.cli import main

    path = _save(tmp_path, _release(_model(0)))
    # The CLI imports into the paper preset: a shrunken checkpoint does not fit, by name.
    assert main(["import-checkpoint", str(path), "--out", str(tmp_path / "m")]) == 2
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_paper_preset_import(tmp_path: Path) -> None:
    """The default target: Swin-B + BERT-base shapes, old-timm buffers of a 224 px input."""
    torch.manual_seed(1)
    original = HAT(get_preset("paper").model).eval()
    state = _release(original)
    assert state["vit_model.layers.0.blocks.1.attn_mask"].shape == (64, 49, 49)
    assert not any(k.startswith("vit_model.layers.3.") and "attn_mask" in k for k in state)
    path = _save(tmp_path, state)
    imported = import_official_checkpoint(path, out_dir=tmp_path / "model")
    for key, value in imported.state_dict().items():
        if not key.startswith(HEADS):
            assert torch.equal(value, original.state_dict()[key]), key
    assert load_model(tmp_path / "model").config.levels == original.config.levels
