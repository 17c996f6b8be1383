"""Shared fixtures: tiny random-weight models and generated data only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from support import SCENE_SIZE, SCENES

import hat
from hat.checkpoint import save_model
from hat.data import generate_scenes


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    # `hat.cli.main` flushes denormals for the whole process; tests start without it.
    torch.set_flush_denormal(False)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="run checks marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Annotations of a small generated scene dataset (24 train, 8 val, 8 test images)."""
    out = tmp_path_factory.mktemp("scenes")
    return generate_scenes(out, n_train=24, n_val=8, n_test=8, image_size=64, seed=1)


# -- shared by the index, search, explanation and web tests ---------------------------


@pytest.fixture(scope="session")
def collection(tmp_path_factory) -> dict[str, Path]:
    """``model`` (tiny, seeded), ``images`` (a folder of scenes) and ``captions``
    (a JSONL file, two captions for each of the first images)."""
    root = tmp_path_factory.mktemp("collection")
    torch.manual_seed(0)
    model = hat.create_model("tiny")
    # Random heads, flagged as trained so that search takes its two-stage path.
    model.global_trained.fill_(True)
    save_model(model, root / "model")
    data = root / "data"
    generate_scenes(data, n_train=SCENES - 6, n_val=3, n_test=3, image_size=SCENE_SIZE)
    dataset = json.loads((data / "dataset_synth.json").read_text())
    with open(root / "captions.jsonl", "w") as f:
        for item in dataset["images"][: SCENES // 2]:
            image = f"data/{item['filepath']}/{item['filename']}"
            for sentence in item["sentences"][:2]:
                f.write(json.dumps({"caption": sentence["raw"], "image": image}) + "\n")
    return {"model": root / "model", "images": data / "images", "captions": root / "captions.jsonl"}


@pytest.fixture
def images_copy(collection, tmp_path) -> Path:
    """A private copy of the scene images that a test may change."""
    return Path(shutil.copytree(collection["images"], tmp_path / "images"))


@pytest.fixture(scope="session")
def collection_index(collection, tmp_path_factory) -> Path:
    """An index of the collection's images, built once; open it read-only."""
    from hat.index import Index

    root = tmp_path_factory.mktemp("collection-index") / "index"
    Index.create(root, collection["model"]).close()
    with Index.open(root, writable=True) as writer:
        writer.add_images(collection["images"], progress=False)
    return root
