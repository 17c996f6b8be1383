"""Configs: presets, YAML round trip, dotted overrides and clear errors."""

from __future__ import annotations

import pytest

from hat.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    get_preset,
    list_presets,
    load_config,
    save_config,
)


@pytest.mark.parametrize("name", list_presets())
def test_yaml_round_trip(tmp_path, name: str) -> None:
    cfg = get_preset(name)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    save_config(cfg, tmp_path / "c.json")
    assert load_config(tmp_path / "c.json") == cfg


def test_overrides() -> None:
    cfg = apply_overrides(
        get_preset("tiny"),
        [
            "train.epochs=3",
            "model.lambda_softmax=4",
            "model.levels=[{image_stage: 4, text_layer: 3}]",
        ],
    )
    assert cfg.train.epochs == 3 and cfg.model.lambda_softmax == 4.0
    assert [(lv.image_stage, lv.text_layer) for lv in cfg.model.levels] == [(4, 3)]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochz=3", "unknown field"),
        ("train.epochs=three", "train.epochs"),
        ("model.direction=sideways", "model.direction"),
        ("train", "section.key=value"),
    ],
)
def test_bad_overrides_name_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_overrides(ExperimentConfig(), [override])


def test_config_file_from_preset(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("preset: tiny\ntrain:\n  epochs: 2\n")
    cfg = load_config(path)
    assert cfg.train.epochs == 2 and cfg.model == get_preset("tiny").model
    path.write_text("preset: tiny\ntrain:\n  bogus: 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_config(path)


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="available"):
        get_preset("huge")


def test_exponent_numbers_without_a_dot_are_numbers() -> None:
    """YAML 1.1 reads ``1e-3`` as a string; a float field takes it as the number."""
    from hat.config import ConfigError, apply_overrides, get_preset

    assert apply_overrides(get_preset("cpu"), ["train.lr=2e-3"]).train.lr == 2e-3
    with pytest.raises(ConfigError, match="train.lr"):
        apply_overrides(get_preset("cpu"), ["train.lr=fast"])
