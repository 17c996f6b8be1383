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


def test_one_tree_holds_every_command_section() -> None:
    from hat.config import build_config

    cfg = build_config(
        preset="tiny",
        overrides=["index.batch_size=4", "serve.max_k=5", "fit.epochs=2", "device=cpu"],
        values={"serve.port": 9000, "index.batch_size": 8, "serve.host": None},
    )
    assert (cfg.index.batch_size, cfg.serve.max_k, cfg.fit.epochs, cfg.device) == (8, 5, 2, "cpu")
    assert cfg.serve.port == 9000 and cfg.serve.host == "127.0.0.1"  # None: the config's
    assert cfg.model == get_preset("tiny").model
    assert build_config().model == get_preset("cpu").model  # the default preset


def test_a_config_file_sets_any_section(tmp_path) -> None:
    from hat.config import build_config

    path = tmp_path / "c.yaml"
    path.write_text("preset: tiny\nindex:\n  shortlist: 7\nserve:\n  port: 9001\n")
    cfg = build_config(path, overrides=["index.shortlist=9"])
    assert (cfg.index.shortlist, cfg.serve.port, cfg.model.name) == (9, 9001, "tiny")
    with pytest.raises(ConfigError, match="not both"):
        build_config(path, preset="tiny")
    path.write_text("index:\n  shortlist: 0\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: index\.shortlist must be >= 1, got 0"):
        build_config(path)


def test_items_of_a_tuple_of_configs_are_typed() -> None:
    """OmegaConf leaves merged items of ``tuple[LevelConfig, ...]`` untyped; they are
    typed before the merge, so unknown keys and missing fields are refused by name."""
    from hat.config import LevelConfig

    cfg = apply_overrides(get_preset("tiny"), ["model.levels=[{image_stage: 4, text_layer: 3}]"])
    assert cfg.model.levels == (LevelConfig(image_stage=4, text_layer=3),)
    with pytest.raises(ConfigError, match=r"unknown field 'model\.levels\[0\]\.text_layerz'"):
        apply_overrides(get_preset("tiny"), ["model.levels=[{image_stage: 4, text_layerz: 3}]"])
    with pytest.raises(ConfigError, match=r"model\.levels\[0\]\.text_layer"):
        apply_overrides(get_preset("tiny"), ["model.levels=[{image_stage: 4}]"])


def test_free_mappings_read_back_as_written(tmp_path) -> None:
    """YAML gives lists; a Swin's ``depths`` read from a file equal the preset's tuple.
    A mapping merges into the one it overrides, key by key (as in a file)."""
    tiny = get_preset("tiny")
    path = tmp_path / "c.yaml"
    save_config(tiny, path)
    assert load_config(path).model.image.kwargs == tiny.model.image.kwargs
    assert isinstance(tiny.model.image.kwargs["depths"], tuple)
    cfg = apply_overrides(tiny, ["model.image.kwargs={depths: [1, 1, 2, 1]}"])
    assert cfg.model.image.kwargs == {**tiny.model.image.kwargs, "depths": (1, 1, 2, 1)}


def test_one_device_rule(monkeypatch) -> None:
    import torch

    from hat.config import DEVICE_AUTO, resolve_device
    from hat.train import pick_device

    assert ExperimentConfig().device == DEVICE_AUTO
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device() == "cuda" and pick_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(DEVICE_AUTO) == "cpu" and pick_device(None) == torch.device("cpu")
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ConfigError, match="'bogus' is not a device"):
        resolve_device("bogus")
