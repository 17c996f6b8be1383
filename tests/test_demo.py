"""The built-in demo end to end, on the tiny preset and a few generated scenes."""

from __future__ import annotations

import dataclasses

from support import assert_only_heads_changed

from hat.checkpoint import load_model, resolve_model
from hat.config import apply_overrides, get_preset
from hat.demo import run_demo


def test_demo_fits_the_heads_of_the_trained_towers_and_searches(tmp_path, scenes, capsys) -> None:
    cfg = apply_overrides(
        get_preset("tiny"),
        [f"data.annotations={scenes}", f"data.image_root={scenes.parent}", "fit.num_workers=0"],
    )
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=0))
    metrics = run_demo(tmp_path, cfg)
    assert 0 <= metrics["rsum"] <= 600
    trained = resolve_model(tmp_path / "run", "best").state_dict()
    saved = load_model(tmp_path / "model")
    assert saved.has_trained_global
    assert_only_heads_changed(saved.state_dict(), trained)
    out = capsys.readouterr().out
    assert "[3/5] fitting the global heads" in out and "the example queries rank" in out
