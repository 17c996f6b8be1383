"""Attention maps: they are the weights the score is computed with, drawn per level."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import hat
from hat.align import attention_maps, similarity
from hat.cli import main
from hat.data import load_image
from hat.encoder import Encoder
from hat.explain import explain, render_png


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_attention_maps_reproduce_the_score(direction):
    torch.manual_seed(0)
    regions, words = torch.randn(12, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    alpha = attention_maps(regions, words, direction, lambda_softmax=9.0).double()  # (L, R)
    if direction == "i2t":
        assert torch.allclose(alpha.sum(dim=0), torch.ones(12, dtype=torch.float64), atol=1e-6)
        context = alpha.T @ words  # (R, d)
        score = F.cosine_similarity(regions, context, dim=1).mean()
    else:
        assert torch.allclose(alpha.sum(dim=1), torch.ones(5, dtype=torch.float64), atol=1e-6)
        context = alpha @ regions  # (L, d)
        score = F.cosine_similarity(words, context, dim=1).mean()
    expected = similarity(regions[None], words[None], torch.tensor([5]), direction, 9.0)
    assert float(score) == pytest.approx(float(expected[0, 0]), abs=1e-5)


def test_explain_model_and_cli(collection, tmp_path, capsys):
    model = hat.load_model(collection["model"])
    image_file = sorted(collection["images"].glob("*.png"))[0]
    caption = "a red circle above a blue square"
    explanation = explain(Encoder(model), load_image(image_file), caption)
    assert explanation.words == caption.split()
    assert [lv.weights.shape for lv in explanation.levels] == [(7, 8, 8), (7, 4, 4), (7, 2, 2)]
    assert explanation.score == pytest.approx(sum(lv.score for lv in explanation.levels), abs=1e-5)
    assert explanation.view.size == (model.config.image.image_size,) * 2
    assert render_png(explanation).startswith(b"\x89PNG")

    out, maps = tmp_path / "map.png", tmp_path / "map.json"
    argv = ["explain", str(collection["model"]), str(image_file), caption, "--out", str(out)]
    assert main([*argv, "--json", str(maps)]) == 0
    assert f"HAT score {explanation.score:.3f}" in capsys.readouterr().out
    assert out.read_bytes().startswith(b"\x89PNG")
    data = json.loads(maps.read_text())
    assert data["words"] == explanation.words and len(data["levels"]) == 3
    assert main(["explain", str(collection["model"]), str(tmp_path / "none.png"), "x"]) == 2
