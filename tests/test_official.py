"""Import of the official release layout, built here from a random model (no real files)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from hat.checkpoint import CheckpointError, load_model
from hat.config import get_preset
from hat.model import HAT
from hat.official import (
    export_official_state_dict,
    import_official_checkpoint,
    read_official_checkpoint,
)

CFG = get_preset("tiny").model


def _official(model: HAT) -> dict[str, torch.Tensor]:
    state = export_official_state_dict(model)
    width = model.image_tower.backbone.feature_info[0]["num_chs"]
    state["vit_model.norm_0.weight"] = torch.ones(width)  # extra stage-1 norm, unused
    state["vit_model.norm_0.bias"] = torch.zeros(width)
    state["vit_model.head.weight"] = torch.randn(5, 8 * width)
    state["vit_model.head.bias"] = torch.randn(5)
    hidden = model.text_tower.encoder.config.hidden_size
    state["text_transformer.pooler.dense.weight"] = torch.randn(hidden, hidden)
    state["text_transformer.pooler.dense.bias"] = torch.randn(hidden)
    return state


def _save(tmp_path: Path, state: dict, **extra) -> Path:
    path = tmp_path / "hat.ckpt"
    torch.save({"state_dict": state, "epoch": 3, **extra}, path)
    return path


def _scores(model: HAT) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    images = torch.randn(3, 3, CFG.image.image_size, CFG.image.image_size, generator=g)
    ids = torch.randint(1000, 3000, (4, 8), generator=g)
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[2, 5:] = 0
    with torch.no_grad():
        return model(images, ids, mask).levels


def test_layout_is_the_old_timm_one() -> None:
    model = HAT(CFG)
    state = export_official_state_dict(model)
    ours = model.state_dict()
    for i in range(3):  # merging at the END of old stage i = START of our stage i + 1
        torch.testing.assert_close(
            state[f"vit_model.layers.{i}.downsample.reduction.weight"],
            ours[f"image_tower.backbone.layers.{i + 1}.downsample.reduction.weight"],
        )
    assert "vit_model.layers.3.downsample.reduction.weight" not in state
    assert any(k.endswith("relative_position_index") for k in state)
    assert "cross_modal_image_transform_1.weight" in state  # stage 2 -> level 1
    assert "cross_modal_text_transform.bias" in state  # top level, no suffix
    assert "vit_model.norm_1.weight" in state and "vit_model.norm_2.weight" in state


def test_import_reproduces_features_and_scores(tmp_path: Path) -> None:
    torch.manual_seed(1)
    original = HAT(CFG).eval()
    path = _save(tmp_path, _official(original))
    torch.manual_seed(2)
    imported = import_official_checkpoint(path, out_dir=tmp_path / "model", model_config=CFG)
    release = {k: v for k, v in original.state_dict().items() if "_global." not in k}
    for key, value in release.items():
        torch.testing.assert_close(imported.state_dict()[key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(_scores(imported), _scores(original), atol=1e-6, rtol=0)
    reloaded = load_model(tmp_path / "model")
    torch.testing.assert_close(_scores(reloaded), _scores(original), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda s: s.pop("cross_modal_text_transform_2.weight"),
            "missing.*text_tower.projections.1.weight",
        ),
        (
            lambda s: s.update(
                {"text_transformer.embeddings.word_embeddings.weight": torch.zeros(3, 3)}
            ),
            "shape.*word_embeddings",
        ),
        (
            lambda s: s.update({"mystery_head.weight": torch.zeros(1)}),
            "cannot place: mystery_head.weight",
        ),
        (
            lambda s: s.update({"vit_model.norm_9.weight": torch.zeros(1)}),
            "vit_model.norm_9.weight",
        ),
    ],
)
def test_strict_errors_name_the_tensor(tmp_path: Path, edit, message: str) -> None:
    state = _official(HAT(CFG))
    edit(state)
    with pytest.raises(CheckpointError, match=message):
        import_official_checkpoint(_save(tmp_path, state), model_config=CFG)


def test_unsafe_pickle_needs_trust(tmp_path: Path) -> None:
    path = _save(tmp_path, _official(HAT(CFG)), hyper_parameters=types.SimpleNamespace(lr=1e-4))
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        read_official_checkpoint(path)
    assert import_official_checkpoint(path, trust=True, model_config=CFG) is not None


def test_missing_file() -> None:
    with pytest.raises(CheckpointError, match="not found"):
        read_official_checkpoint("/nonexistent.ckpt")


def test_cli_import(tmp_path: Path) -> None:
    from hat.cli import main

    path = _save(tmp_path, _official(HAT(CFG)))
    # The CLI imports into the paper preset: a tiny checkpoint does not fit, by name.
    assert main(["import-checkpoint", str(path), "--out", str(tmp_path / "m")]) == 2
    assert not (tmp_path / "m" / "model.safetensors").exists()
