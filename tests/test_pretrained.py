"""Backbones load from local files only, and a missing file says what to download."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from hat.config import get_preset
from hat.encoders.image import ImageTower, PretrainedWeightsMissing
from hat.encoders.text import PretrainedTextMissing, TextTower
from hat.model import HAT

TINY = get_preset("tiny").model


def _timm_weights(tmp_path: Path, suffix: str) -> tuple[Path, dict]:
    cfg = TINY.image
    source = timm.create_model(cfg.backbone, num_classes=0, img_size=cfg.image_size, **cfg.kwargs)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"swin{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path, state


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_image_backbone_from_a_local_file(tmp_path: Path, suffix: str) -> None:
    path, state = _timm_weights(tmp_path, suffix)
    cfg = dataclasses.replace(TINY.image, pretrained=True, pretrained_path=str(path))
    tower = ImageTower(cfg, (2, 3, 4), 8, 0.02, pretrained=True)
    for key, value in state.items():
        torch.testing.assert_close(tower.backbone.state_dict()[key], value, msg=key)


def test_missing_image_weights_say_what_to_download(tmp_path: Path) -> None:
    cfg = dataclasses.replace(TINY.image, pretrained=True, pretrained_path=None)
    with pytest.raises(PretrainedWeightsMissing, match="pretrained_source|ms_in22k|download"):
        ImageTower(cfg, (2, 3, 4), 8, 0.02, pretrained=True)
    cfg = dataclasses.replace(cfg, pretrained_path=str(tmp_path / "nope.safetensors"))
    with pytest.raises(PretrainedWeightsMissing, match="nope.safetensors not found"):
        ImageTower(cfg, (2, 3, 4), 8, 0.02, pretrained=True)


def test_text_encoder_from_a_local_directory(tmp_path: Path) -> None:
    source = HAT(TINY).text_tower.encoder
    source.save_pretrained(tmp_path / "bert")
    cfg = dataclasses.replace(TINY.text, pretrained=True, path=str(tmp_path / "bert"), config={})
    tower = TextTower(cfg, (1, 2, 3), 8, 0.02, pretrained=True)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(tower.encoder.state_dict()[key], value, msg=key)


def test_missing_text_encoder_says_what_to_download(tmp_path: Path) -> None:
    paper = get_preset("paper").model.text
    with pytest.raises(PretrainedTextMissing, match="bert-base-uncased"):
        TextTower(paper, (4, 10, 12), 8, 0.02, pretrained=True)
    missing = dataclasses.replace(paper, path=str(tmp_path))
    with pytest.raises(PretrainedTextMissing, match="no config.json"):
        TextTower(missing, (4, 10, 12), 8, 0.02, pretrained=True)
