"""Sizes of the scene collection the ``collection`` fixture (conftest.py) generates."""

SCENES = 12
SCENE_SIZE = 64
