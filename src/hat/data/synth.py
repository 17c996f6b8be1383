"""The built-in captioned scenes: coloured shapes on a background, 5 captions each.

Scenes come in groups of three that share one split: a base scene, the same
objects with the first two swapped in place, and the same layout with those two
objects' colours swapped. Every caption names both swapped objects with their
colours and either their relation or their places, so a sibling's captions use
the same words in another order or binding: retrieving the right scene needs
word order and attribute binding, not a bag of words.

A :class:`SceneStyle` changes the kind of data (how many objects, a 3 x 3 grid or
free placement, object sizes, background texture, caption templates, sibling
groups or not); :data:`SCENE_STYLES` names the kinds the recipe benchmark trains on,
so that a training recipe is checked on more than the built-in scenes.

Output: ``OUT/images/*.png`` and ``OUT/dataset_synth.json`` in the Karpathy format
(spec section 4; ``filepath`` is ``images``, so the image root is ``OUT``).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUNDS",
    "CAPTIONS_PER_IMAGE",
    "COLORS",
    "SCENE_STYLES",
    "SHAPES",
    "Scene",
    "SceneObject",
    "SceneStyle",
    "generate_scenes",
    "random_scene",
    "scene_captions",
    "siblings",
]

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
SHAPES = {  # shape -> the words that name it, the first one preferred
    "circle": ("circle", "disk"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "diamond": ("diamond", "rhombus"),
}
SIZES = {"small": 0.11, "medium": 0.13, "large": 0.15}  # radius, fraction of the image side
OBJECT_COUNTS = (2, 3)
COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
CELL_CENTERS = (0.18, 0.5, 0.82)  # row / column centres of the 3 x 3 layout, fraction of side
JITTER = 0.01  # random offset of an object around its cell centre, fraction of the side
CELL_NAMES = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}  # fmt: skip
RELATIONS = {
    "left": ("to the left of", "left of"),
    "right": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
SIZE_WORD_RATE = 0.5  # how often a mention names the object's size
SYNONYM_RATE = 0.25  # how often a mention uses another word for the shape
CAPTIONS_PER_IMAGE = 5
SQUARE_HALF_SIDE = 0.85  # a square's half side relative to the radius (similar area)
TRIANGLE_BASE = 0.8  # the triangle's base below the centre, relative to the radius
STAR_POINTS = 5
STAR_INNER = 0.45  # a star's inner radius relative to the outer one
MIN_IMAGE_SIZE = 32
DATASET_FILE = "dataset_synth.json"
IMAGE_FOLDER = "images"
FREE_MARGIN = 0.03  # free placement: gap kept between objects and to the border, fraction
RELATION_GAP = 0.1  # free placement: centre offset below which no left/right (above/below)
FREE_TRIES = 1000  # free placement: attempts to place an object before starting over
TEXTURE_CONTRAST = 28  # how far a texture's shades lie from the background colour (0-255)
TEXTURE_PERIOD = 8  # stripes and checks per image side


@dataclass(frozen=True)
class SceneStyle:
    """The kind of scenes :func:`generate_scenes` draws.

    ``object_counts``: how many objects a scene may hold (at most 9 on the grid).
    ``layout``: ``grid`` puts objects in distinct cells of a 3 x 3 grid (captions may
    name cells); ``free`` places them anywhere without overlap (relations from their
    centres). ``sizes``: size names of :data:`SIZES` objects are drawn with.
    ``background``: ``plain`` colour, or a texture over it (``noise`` per pixel,
    ``stripes``, ``checker``). ``captions``: ``rich`` uses every template, ``relation``
    only "X <relation> Y" sentences. ``siblings``: draw scenes in groups of three (the
    first two objects swapped in place, then in colour) or each scene on its own.
    """

    object_counts: tuple[int, ...] = OBJECT_COUNTS
    layout: Literal["grid", "free"] = "grid"
    sizes: tuple[str, ...] = ("small", "large")
    background: Literal["plain", "noise", "stripes", "checker"] = "plain"
    captions: Literal["rich", "relation"] = "rich"
    siblings: bool = True

    def __post_init__(self) -> None:
        cells = len(CELL_NAMES)
        if not self.object_counts or min(self.object_counts) < 2:
            raise ValueError(f"object_counts need 2 or more objects, got {self.object_counts}")
        if self.layout == "grid" and max(self.object_counts) > cells:
            raise ValueError(f"a grid holds at most {cells} objects, got {self.object_counts}")
        unknown = sorted(set(self.sizes) - set(SIZES))
        if not self.sizes or unknown:
            raise ValueError(f"sizes must be names of {sorted(SIZES)}, got {self.sizes}")


# The built-in scenes and two other kinds, for checking recipes beyond one dataset.
SCENE_STYLES = {
    "scenes": SceneStyle(),
    "textured": SceneStyle(background="stripes", captions="relation", siblings=False),
    "free": SceneStyle(
        object_counts=(3, 4),
        layout="free",
        sizes=("small", "medium", "large"),
        background="noise",
        captions="relation",
        siblings=False,
    ),  # fmt: skip
}


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape: colour, shape, size and its grid cell ``(row, column)``, or, in a
    free layout, its centre ``(x, y)`` as fractions of the side (``cell`` is then None)."""

    color: str
    shape: str
    size: str
    cell: tuple[int, int] | None
    center: tuple[float, float] | None = None


@dataclass(frozen=True)
class Scene:
    """A background colour and 2-3 objects in distinct cells; the first two are swapped
    between siblings."""

    background: str
    objects: tuple[SceneObject, ...]


def _a(phrase: str) -> str:
    """The phrase with its indefinite article."""
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _relation(a: SceneObject, b: SceneObject, rng: random.Random) -> str:
    """How ``a`` lies relative to ``b`` (horizontally or vertically, when both apply)."""
    options = []
    if a.cell is not None and b.cell is not None:
        (ay, ax), (by, bx) = a.cell, b.cell
        gap = 0
    else:
        (ax, ay), (bx, by) = a.center, b.center
        gap = RELATION_GAP
    if abs(ax - bx) > gap:
        options.append(RELATIONS["left" if ax < bx else "right"])
    if abs(ay - by) > gap:
        options.append(RELATIONS["above" if ay < by else "below"])
    return rng.choice(rng.choice(options))


class _Words:
    """Random surface forms for one caption: size named or not, shape synonyms."""

    def __init__(self, scene: Scene, rng: random.Random) -> None:
        self.scene = scene
        self.rng = rng

    def roll(self, rate: float) -> bool:
        return self.rng.random() < rate

    def noun(self, obj: SceneObject) -> str:
        main, *others = SHAPES[obj.shape]
        return self.rng.choice(others) if others and self.roll(SYNONYM_RATE) else main

    def phrase(self, obj: SceneObject) -> str:
        """``[size] colour shape``, e.g. ``small red circle``."""
        size = f"{obj.size} " if self.roll(SIZE_WORD_RATE) else ""
        return f"{size}{obj.color} {self.noun(obj)}"

    def a(self, obj: SceneObject) -> str:
        return _a(self.phrase(obj))

    def rel(self, a: SceneObject, b: SceneObject) -> str:
        return _relation(a, b, self.rng)


def _t_plain(w: _Words, a: SceneObject, b: SceneObject) -> str:
    return f"{w.a(a)} {w.rel(a, b)} {w.a(b)}"


def _t_there_is(w: _Words, a: SceneObject, b: SceneObject) -> str:
    return f"there is {w.a(a)} {w.rel(a, b)} {w.a(b)} on {_a(w.scene.background)} background"


def _t_reversed(w: _Words, a: SceneObject, b: SceneObject) -> str:
    return f"{w.a(b)} {w.rel(b, a)} {w.a(a)}"


def _t_definite(w: _Words, a: SceneObject, b: SceneObject) -> str:
    return f"the {w.phrase(a)} is {w.rel(a, b)} the {w.phrase(b)}"


def _t_reversed_is(w: _Words, a: SceneObject, b: SceneObject) -> str:
    return f"{w.a(b)} is {w.rel(b, a)} {w.a(a)}"


def _t_places(w: _Words, a: SceneObject, b: SceneObject) -> str:
    objects = list(w.scene.objects)
    w.rng.shuffle(objects)
    return " and ".join(f"{w.a(o)} at the {CELL_NAMES[o.cell]}" for o in objects)


def _t_count(w: _Words, a: SceneObject, b: SceneObject) -> str:
    count = COUNT_WORDS[len(w.scene.objects)]
    return (
        f"{count} shapes on {_a(w.scene.background)} background with "
        f"{w.a(a)} {w.rel(a, b)} {w.a(b)}"
    )


def _t_colour_ones(w: _Words, a: SceneObject, b: SceneObject) -> str:
    return f"{w.a(a)} and {w.a(b)} with the {a.color} one {w.rel(a, b)} the {b.color} one"


def _t_third(w: _Words, a: SceneObject, b: SceneObject) -> str:
    c = w.scene.objects[2]
    return f"{w.a(c)} {w.rel(c, a)} {w.a(a)} which is {w.rel(a, b)} {w.a(b)}"


_Template = Callable[[_Words, SceneObject, SceneObject], str]
TEMPLATES: tuple[_Template, ...] = (
    _t_plain, _t_there_is, _t_reversed, _t_definite, _t_reversed_is, _t_places, _t_count,
    _t_colour_ones,
)  # fmt: skip
THREE_OBJECT_TEMPLATES: tuple[_Template, ...] = (_t_third,)
RELATION_TEMPLATES: tuple[_Template, ...] = (
    _t_plain, _t_there_is, _t_reversed, _t_definite, _t_reversed_is,
)  # fmt: skip


def scene_captions(scene: Scene, rng: random.Random, style: SceneStyle = SceneStyle()) -> list[str]:
    """``CAPTIONS_PER_IMAGE`` different captions from distinct templates, each naming the
    two first objects with their colours and their relation (or, on the grid with rich
    captions, their places)."""
    if style.captions == "relation":
        pool = RELATION_TEMPLATES
    else:
        pool = TEMPLATES + (THREE_OBJECT_TEMPLATES if len(scene.objects) > 2 else ())
        if style.layout == "free":
            pool = tuple(t for t in pool if t is not _t_places)  # no cells to name
    a, b = scene.objects[:2]
    words = _Words(scene, rng)
    return [template(words, a, b) for template in rng.sample(pool, CAPTIONS_PER_IMAGE)]


def _free_centers(sizes: list[str], rng: random.Random) -> list[tuple[float, float]]:
    """Centres (fractions of the side) for objects of these sizes, none overlapping."""
    while True:
        centers: list[tuple[float, float]] = []
        for size in sizes:
            r = SIZES[size] + FREE_MARGIN
            for _ in range(FREE_TRIES):
                x, y = rng.uniform(r, 1 - r), rng.uniform(r, 1 - r)
                if all(
                    math.dist((x, y), c) >= r + SIZES[other] + FREE_MARGIN
                    for c, other in zip(centers, sizes)
                ):
                    centers.append((x, y))
                    break
            else:
                break  # no room left: start the scene over
        if len(centers) == len(sizes):
            return centers


def random_scene(rng: random.Random, style: SceneStyle = SceneStyle()) -> Scene:
    """Objects of distinct colours in distinct places; the first two differ in shape or
    size, so swapping their places never equals swapping their colours."""
    count = rng.choice(style.object_counts)
    cells = rng.sample(sorted(CELL_NAMES), count) if style.layout == "grid" else [None] * count
    colors = rng.sample(sorted(COLORS), count)
    looks: list[tuple[str, str]] = []
    while len(looks) < count:
        look = (rng.choice(sorted(SHAPES)), rng.choice(sorted(style.sizes)))
        if len(looks) != 1 or look != looks[0]:
            looks.append(look)
    centers = (
        _free_centers([size for _, size in looks], rng)
        if style.layout == "free"
        else [None] * count
    )
    objects = tuple(
        SceneObject(color, shape, size, cell, center)
        for color, (shape, size), cell, center in zip(colors, looks, cells, centers)
    )
    return Scene(rng.choice(sorted(BACKGROUNDS)), objects)


def siblings(scene: Scene) -> list[Scene]:
    """The scene, its first two objects swapped in place, and their colours swapped."""
    a, b, *rest = scene.objects
    moved = (
        replace(a, cell=b.cell, center=b.center),
        replace(b, cell=a.cell, center=a.center),
        *rest,
    )
    recoloured = (replace(a, color=b.color), replace(b, color=a.color), *rest)
    return [scene, replace(scene, objects=moved), replace(scene, objects=recoloured)]


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of a non-circle shape of radius ``r`` centred at ``(cx, cy)``."""
    if shape == "square":
        s = r * SQUARE_HALF_SIDE
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        base = cy + r * TRIANGLE_BASE
        return [(cx, cy - r), (cx + r, base), (cx - r, base)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    # star: points alternating between the outer and the inner radius
    radii = [r if k % 2 == 0 else r * STAR_INNER for k in range(2 * STAR_POINTS)]
    step = math.pi / STAR_POINTS
    return [(cx + q * math.sin(k * step), cy - q * math.cos(k * step)) for k, q in enumerate(radii)]


def _background(color: tuple[int, int, int], kind: str, size: int, rng: random.Random):
    """The ``size`` x ``size`` background: a plain colour or a texture around it."""
    if kind == "plain":
        return Image.new("RGB", (size, size), color)
    base = np.asarray(color, dtype=np.float32)  # (3,)
    yy, xx = np.mgrid[0:size, 0:size]  # (S, S) each
    period = size / TEXTURE_PERIOD
    if kind == "noise":
        noise = np.random.default_rng(rng.getrandbits(32)).uniform(-1, 1, (size, size, 1))
        pixels = base + TEXTURE_CONTRAST * noise  # (S, S, 3)
    else:
        phase = rng.uniform(0, period)
        if kind == "stripes":
            pattern = ((xx + yy + phase) // period) % 2  # diagonal stripes
        else:
            pattern = ((xx + phase) // period + (yy + phase) // period) % 2  # checker
        pixels = base + TEXTURE_CONTRAST * (2 * pattern[..., None] - 1)  # (S, S, 3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _draw(
    scene: Scene, size: int, rng: random.Random, style: SceneStyle = SceneStyle()
) -> Image.Image:
    image = _background(BACKGROUNDS[scene.background], style.background, size, rng)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        if obj.center is not None:
            cx, cy = obj.center[0] * size, obj.center[1] * size
        else:
            cx = (CELL_CENTERS[obj.cell[1]] + rng.uniform(-JITTER, JITTER)) * size
            cy = (CELL_CENTERS[obj.cell[0]] + rng.uniform(-JITTER, JITTER)) * size
        r = SIZES[obj.size] * size
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_outline(obj.shape, cx, cy, r), fill=fill)
    return image


def _tokens(raw: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", raw.lower())


def generate_scenes(
    out_dir: str | Path,
    n_train: int = 1200,
    n_val: int = 100,
    n_test: int = 100,
    image_size: int = 128,
    seed: int = 0,
    style: SceneStyle = SceneStyle(),
) -> Path:
    """Write the scenes and ``dataset_synth.json`` (Karpathy format) under ``out_dir``.

    Sibling groups of three (``style.siblings``) are drawn within one split (the last
    group of a split may be cut short). Deterministic: the same arguments give
    byte-identical files. Returns the JSON path.
    """
    if min(n_train, n_val, n_test) < 0:
        raise ValueError(f"scene counts must be non-negative, got {(n_train, n_val, n_test)}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    out = Path(out_dir)
    (out / IMAGE_FOLDER).mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    images: list[dict] = []
    sentid = 0
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        scenes: list[Scene] = []
        while len(scenes) < count:
            scene = random_scene(rng, style)
            scenes.extend(siblings(scene) if style.siblings else [scene])
        for scene in scenes[:count]:
            imgid = len(images)
            filename = f"{imgid:06d}.png"
            _draw(scene, image_size, rng, style).save(out / IMAGE_FOLDER / filename)
            sentences = []
            for raw in scene_captions(scene, rng, style):
                sentences.append(
                    {"raw": raw, "tokens": _tokens(raw), "imgid": imgid, "sentid": sentid}
                )
                sentid += 1
            images.append(
                {
                    "filepath": IMAGE_FOLDER,
                    "filename": filename,
                    "imgid": imgid,
                    "split": split,
                    "sentids": [s["sentid"] for s in sentences],
                    "sentences": sentences,
                }
            )
    path = out / DATASET_FILE
    path.write_text(json.dumps({"dataset": "synth", "images": images}, indent=1) + "\n")
    return path
