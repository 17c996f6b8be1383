"""The built-in captioned scenes: coloured shapes on a background, 5 captions each.

Scenes come in groups of three that share one split: a base scene, the same
objects with two of them swapped in place, and the same layout with two objects'
colours swapped. Their captions differ only in word order and attribute binding,
so retrieving the right one needs region-word alignment, not a bag of words.
Output: ``OUT/images/*.png`` and ``OUT/dataset_synth.json`` in the Karpathy format.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw

__all__ = ["COLORS", "SHAPES", "Scene", "SceneObject", "generate_scenes", "scene_captions"]

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "purple": (145, 60, 185),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS = {"gray": (128, 128, 128), "brown": (125, 90, 60), "teal": (40, 120, 120)}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
SIZES = {"small": 0.11, "large": 0.16}  # radius as a fraction of the image side
GRID = 3  # objects sit in distinct cells of a GRID x GRID layout
CELL_NAMES = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}  # fmt: skip
CAPTIONS_PER_IMAGE = 5
GROUP = 3  # base, positions swapped, colours swapped
JITTER = 0.06  # random offset of an object inside its cell, fraction of the side


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    size: str
    cell: tuple[int, int]  # (row, column)


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]


def _phrase(obj: SceneObject, with_size: bool) -> str:
    return f"{obj.size} {obj.color} {obj.shape}" if with_size else f"{obj.color} {obj.shape}"


def _a(phrase: str) -> str:
    """The phrase with its indefinite article."""
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _relation(a: SceneObject, b: SceneObject, rng: random.Random) -> str:
    """How ``a`` lies relative to ``b``."""
    options = []
    if a.cell[1] != b.cell[1]:
        options.append(rng.choice(["to the left of", "left of"]) if a.cell[1] < b.cell[1]
                       else rng.choice(["to the right of", "right of"]))  # fmt: skip
    if a.cell[0] != b.cell[0]:
        options.append(rng.choice(["above", "over"]) if a.cell[0] < b.cell[0]
                       else rng.choice(["below", "under"]))  # fmt: skip
    return rng.choice(options)


def scene_captions(scene: Scene, rng: random.Random) -> list[str]:
    """Five different captions naming the objects, their attributes and relations."""
    objs = scene.objects
    a, b = objs[0], objs[1]
    last = objs[-1]
    article = rng.choice(["a", "the"])
    captions = [
        f"a {_phrase(a, True)} {_relation(a, b, rng)} a {_phrase(b, True)}",
        f"there is a {_phrase(b, False)} {_relation(b, a, rng)} a {_phrase(a, False)}",
        " and ".join(
            f"a {_phrase(o, rng.random() < 0.5)} at the {CELL_NAMES[o.cell]}" for o in objs
        ),
        f"{len(objs)} shapes on a {scene.background} background with {article} "
        f"{_phrase(a, False)} {_relation(a, last, rng)} {article} {_phrase(last, False)}",
        f"the {_phrase(last, True)} is {_relation(last, a, rng)} the {_phrase(a, True)}",
    ]
    if len(set(captions)) != len(captions):  # cannot happen with the templates above
        raise AssertionError(f"duplicate captions for {scene}")
    return captions


def _random_scene(rng: random.Random) -> Scene:
    count = rng.choice([2, 3])
    cells = rng.sample(sorted(CELL_NAMES), count)
    colors = rng.sample(sorted(COLORS), count)
    objects = tuple(
        SceneObject(colors[i], rng.choice(SHAPES), rng.choice(sorted(SIZES)), cells[i])
        for i in range(count)
    )
    return Scene(rng.choice(sorted(BACKGROUNDS)), objects)


def _siblings(scene: Scene) -> list[Scene]:
    """The base scene, the first two objects swapped in place, and their colours swapped."""
    a, b, *rest = scene.objects
    moved = (replace(a, cell=b.cell), replace(b, cell=a.cell), *rest)
    recoloured = (replace(a, color=b.color), replace(b, color=a.color), *rest)
    return [scene, replace(scene, objects=moved), replace(scene, objects=recoloured)]


def _draw(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    cell = size / GRID
    for obj in scene.objects:
        cx = (obj.cell[1] + 0.5) * cell + rng.uniform(-JITTER, JITTER) * size
        cy = (obj.cell[0] + 0.5) * cell + rng.uniform(-JITTER, JITTER) * size
        r = SIZES[obj.size] * size
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj.shape == "square":
            side = r * 0.85
            draw.rectangle([cx - side, cy - side, cx + side, cy + side], fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
        elif obj.shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        else:  # star: ten points alternating outer and inner radius
            points = [
                (
                    cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
                    cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5),
                )
                for k in range(10)
            ]
            draw.polygon(points, fill=fill)
    return image


def generate_scenes(
    out_dir: str | Path,
    n_train: int = 1200,
    n_val: int = 100,
    n_test: int = 100,
    image_size: int = 128,
    seed: int = 0,
) -> Path:
    """Write the scenes and ``dataset_synth.json`` (Karpathy format) under ``out_dir``.

    Deterministic: the same arguments give byte-identical files. Returns the JSON path.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    images = []
    sentid = 0
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        scenes: list[Scene] = []
        while len(scenes) < count:
            scenes.extend(_siblings(_random_scene(rng)))
        for scene in scenes[:count]:
            imgid = len(images)
            filename = f"{imgid:06d}.png"
            _draw(scene, image_size, rng).save(out / "images" / filename, optimize=False)
            sentences = []
            for raw in scene_captions(scene, rng):
                sentences.append(
                    {"raw": raw, "tokens": raw.split(), "imgid": imgid, "sentid": sentid}
                )
                sentid += 1
            images.append(
                {
                    "filepath": "images",
                    "filename": filename,
                    "imgid": imgid,
                    "split": split,
                    "sentids": [s["sentid"] for s in sentences],
                    "sentences": sentences,
                }
            )
    path = out / "dataset_synth.json"
    path.write_text(json.dumps({"dataset": "synth", "images": images}, indent=1) + "\n")
    return path
