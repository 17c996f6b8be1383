"""Constants and helpers shared by several test files (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

# The scene collection of the ``collection`` fixture.
SCENES = 12
SCENE_SIZE = 64


def data_args(annotations: Path) -> list[str]:
    """Dotted overrides that point a run at generated scenes, read in-process."""
    return [
        f"data.annotations={annotations}",
        f"data.image_root={annotations.parent}",
        "data.num_workers=0",
    ]
