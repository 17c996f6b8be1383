"""Why an image matched a caption: each word's attention over the regions, per level.

For every level, :func:`hat.align.attention_maps` gives the attention weights
between the caption's words and the image's regions (a ``grid x grid`` cell
grid of that Swin stage). :func:`draw_explanation` lays them out as in SCAN-style
papers: one row per level (with its score), one column per word, the image with
the word's weights as a heat map.

Shape legend: ``W`` shown words, ``L`` valid tokens, ``R = grid * grid`` regions.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor

from hat._optional import needs_extra
from hat.config import ImageTowerConfig
from hat.data.transforms import eval_geometry
from hat.encoder import Encoder
from hat.features import ImageFeatures, TextFeatures
from hat.scorer import Scorer

if TYPE_CHECKING:
    from hat.index import Index

__all__ = [
    "Explanation",
    "LevelAttention",
    "draw_explanation",
    "explain",
    "explain_features",
    "explain_indexed",
    "model_view",
    "render_png",
]

MAX_WORDS_DRAWN = 12
PANEL_INCHES = 1.6
HEATMAP_ALPHA = 0.55
HEATMAP_CMAP = "jet"
DECIMALS = 4
FIGURE_DPI = 100


@dataclass
class LevelAttention:
    """One level of an explanation.

    Attributes:
        image_stage, text_layer: the level's pairing.
        grid: side of the level's region grid.
        score: the level's alignment score of the pair.
        weights: ``(W, grid, grid)`` attention of each shown word over the regions.
    """

    image_stage: int
    text_layer: int
    grid: int
    score: float
    weights: Tensor


@dataclass
class Explanation:
    """Per-level word-region attention of one image and one caption.

    Attributes:
        caption: the caption as given.
        words: the ``W`` shown tokens (special tokens left out; they still take part
            in the attention).
        score: HAT's score (sum of the level scores).
        direction: the model's alignment direction (how to read the weights).
        levels: one :class:`LevelAttention` per level.
        view: the image as the model saw it (resized and centre-cropped).
    """

    caption: str
    words: list[str]
    score: float
    direction: str
    levels: list[LevelAttention]
    view: Image.Image

    def to_dict(self) -> dict:
        """JSON-ready: words, scores and each level's maps as nested lists."""
        return {
            "caption": self.caption,
            "words": self.words,
            "score": round(self.score, DECIMALS),
            "direction": self.direction,
            "levels": [
                {
                    "image_stage": lv.image_stage,
                    "text_layer": lv.text_layer,
                    "grid": lv.grid,
                    "score": round(lv.score, DECIMALS),
                    "weights": torch.round(lv.weights, decimals=DECIMALS).tolist(),
                }
                for lv in self.levels
            ],
        }


def model_view(image: Image.Image, image_cfg: ImageTowerConfig) -> Image.Image:
    """The pixels the model's region grid covers: the evaluation geometry, unnormalised."""
    return eval_geometry(image_cfg)(image.convert("RGB"))


def explain_features(
    scorer: Scorer,
    grids: tuple[int, ...],
    image: ImageFeatures,
    caption: TextFeatures,
    tokens: list[str],
    shown: list[int],
    caption_text: str,
    view: Image.Image,
) -> Explanation:
    """An explanation from already encoded features of ONE image and ONE caption.

    ``tokens`` are the caption's ``L`` valid tokens; ``shown`` the positions drawn.
    """
    length = int(caption.lengths[0])
    exact = dataclasses.replace(scorer, device=torch.device("cpu"), compute_dtype="float32")
    scores = exact.all_pairs(image, caption)
    levels = []
    for k, level in enumerate(scorer.cfg.levels):
        regions = image.levels[k][0].float()  # (R, d)
        words = caption.levels[k][0, :length].float()  # (L, d)
        alpha = exact.attention_maps(regions, words)  # (L, R)
        grid = grids[k]
        levels.append(
            LevelAttention(
                level.image_stage,
                level.text_layer,
                grid,
                float(scores.levels[k, 0, 0]),
                alpha[shown].reshape(len(shown), grid, grid),  # (W, grid, grid)
            )
        )
    words = [tokens[i] for i in shown]
    return Explanation(
        caption_text, words, float(scores.total[0, 0]), scorer.cfg.direction, levels, view
    )


def _explain_encoded(
    encoder: Encoder, grids: tuple[int, ...], image: ImageFeatures, caption: str, view: Image.Image
) -> Explanation:
    _, tokens, shown = encoder.caption_tokens(caption)
    text = encoder.encode_captions([caption], batch_size=1)
    return explain_features(encoder.scorer(), grids, image, text, tokens, shown, caption, view)


def explain(encoder: Encoder, image: Image.Image, caption: str) -> Explanation:
    """Encode one image and one caption and explain their score."""
    return _explain_encoded(
        encoder,
        encoder.model.image_tower.grid_sizes,
        encoder.encode_image(image),
        caption,
        model_view(image, encoder.config.image),
    )


def explain_indexed(index: Index, image_id: int, caption: str) -> Explanation:
    """Per-level word-region attention of an indexed image and ``caption``, from the
    stored features (the image file is read only for display; a grey square when it
    can no longer be read). :class:`KeyError` for an unknown id."""
    from hat.data import DataError, load_image

    image = index.image_features(image_id)
    encoder = index.encoder
    try:
        view = model_view(load_image(index.image_path(image_id)), encoder.config.image)
    except DataError:
        size = encoder.config.image.image_size
        view = Image.new("RGB", (size, size), "gray")
    return _explain_encoded(encoder, index.store.manifest.grids, image, caption, view)


def draw_explanation(explanation: Explanation, max_words: int = MAX_WORDS_DRAWN):
    """A matplotlib :class:`~matplotlib.figure.Figure` (no pyplot state, so safe in a
    server's threads): a row per level (image + one heat map per word).

    Each map is scaled to its own maximum so that where a word looked is visible
    even when its weights are small; the level score heads each row.
    """
    with needs_extra("explain"):
        from matplotlib.figure import Figure

    words = explanation.words[:max_words]
    rows, cols = len(explanation.levels), len(words) + 1
    fig = Figure(figsize=(PANEL_INCHES * cols, PANEL_INCHES * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    view = explanation.view
    extent = (0, view.width, view.height, 0)
    for row, level in zip(axes, explanation.levels):
        row[0].imshow(view)
        row[0].set_title(
            f"stage {level.image_stage} / layer {level.text_layer}\nscore {level.score:.3f}",
            fontsize=8,
        )
        for ax, word, weights in zip(row[1:], words, level.weights):
            heat = weights / weights.max().clamp_min(torch.finfo(weights.dtype).tiny)
            ax.imshow(view)
            ax.imshow(
                heat.numpy(), cmap=HEATMAP_CMAP, alpha=HEATMAP_ALPHA, extent=extent,
                interpolation="bilinear", vmin=0.0, vmax=1.0,
            )  # fmt: skip
            ax.set_title(word, fontsize=9)
        for ax in row:
            ax.set_axis_off()
    fig.suptitle(
        f'"{explanation.caption}"  HAT score {explanation.score:.3f} '
        f"({explanation.direction} attention)",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def render_png(explanation: Explanation, path: str | Path | None = None) -> bytes:
    """The figure of :func:`draw_explanation` as PNG bytes, also written to ``path``."""
    fig = draw_explanation(explanation)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI)
    data = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data
