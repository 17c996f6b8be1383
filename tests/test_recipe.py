"""The training recipes pinned: the authors' schedule and loss in ``paper`` (spec section 3)."""

from __future__ import annotations

import math

import pytest
import torch

import hat
from hat.config import get_preset
from hat.train import backbones_trainable, build_optimizer

PAPER = get_preset("paper").train


def test_paper_schedule_unfreezes_after_epoch_10_at_the_cut_learning_rate() -> None:
    """The authors unfreeze in ``validation_epoch_end`` when ``current_epoch == 10``:
    epochs 0-10 train the projections only, epoch 11 on everything, and StepLR cut the
    learning rate to 1e-5 at epoch 10 already."""
    model = hat.create_model("tiny")
    optimizer, scheduler = build_optimizer(list(model.parameters()), PAPER)
    backbones = {id(p) for ps in model.backbone_parameters().values() for p in ps}
    projections = [p for p in model.parameters() if id(p) not in backbones]
    plan = []
    for epoch in range(24):
        trainable = backbones_trainable(PAPER, epoch)
        model.set_backbones_trainable(**trainable)
        assert all(p.requires_grad for p in projections)
        for tower, params in model.backbone_parameters().items():
            assert all(p.requires_grad == trainable[tower] for p in params), (epoch, tower)
        plan.append((trainable["image"], trainable["text"], optimizer.param_groups[0]["lr"]))
        optimizer.step()
        scheduler.step()
    frozen = [(False, False, pytest.approx(1e-4))] * 10 + [(False, False, pytest.approx(1e-5))]
    unfrozen = [(True, True, pytest.approx(1e-5))] * 9 + [(True, True, pytest.approx(1e-6))] * 4
    assert plan == frozen + unfrozen


def test_paper_keeps_the_authors_loss_and_optimiser() -> None:
    assert (PAPER.epochs, PAPER.batch_size, PAPER.lr, PAPER.weight_decay) == (100, 58, 1e-4, 0.0)
    assert (PAPER.lr_step_epochs, PAPER.lr_gamma) == (10, 0.1)
    assert PAPER.margin == 0.2 and PAPER.max_violation and PAPER.max_violation_warmup_epochs == 0
    assert PAPER.global_loss_weight == 0.0 and PAPER.amp and PAPER.amp_dtype == "float16"
    optimizer, _ = build_optimizer([torch.nn.Parameter(torch.zeros(1))], PAPER)
    assert type(optimizer) is torch.optim.Adam
    model = get_preset("paper").model
    assert model.direction == "i2t" and model.alignment == "cross_attention"
    assert model.lambda_softmax == 9.0 and model.embed_dim == 768


def test_paper_trains_with_the_reference_hinge_only() -> None:
    assert PAPER.loss == "triplet" and PAPER.level_loss_weight == 0.0
    assert not PAPER.cache_text  # the text tower unfreezes at epoch 11
    assert not PAPER.group_captions  # (image, caption) pairs, as the reference


def _loop_losses(scores: torch.Tensor, rows: list[int], margin: float) -> tuple:
    """Grouped-batch losses written pair by pair: (hardest hinge, summed hinge, InfoNCE)."""
    hardest = summed = nce_images = nce_captions = 0.0
    for c, i in enumerate(rows):
        pos = scores[i, c]
        neg_captions = [scores[i, j] for j, r in enumerate(rows) if r != i]
        neg_images = [scores[j, c] for j in range(scores.shape[0]) if j != i]
        hinges_c = [max(0.0, margin + n - pos) for n in neg_captions]
        hinges_i = [max(0.0, margin + n - pos) for n in neg_images]
        hardest += max(hinges_c) + max(hinges_i)
        summed += sum(hinges_c) + sum(hinges_i)
        nce_images += torch.logsumexp(torch.stack([pos, *neg_captions]), 0) - pos
        nce_captions += torch.logsumexp(scores[:, c], 0) - pos
    return hardest, summed, 0.5 * (nce_images + nce_captions) / len(rows)


def test_grouped_batch_losses_match_a_loop_over_pairs() -> None:
    """Several captions per image: each is a positive of its image only, and an image's
    other captions are not its negatives."""
    from hat.losses import info_nce_loss, triplet_loss

    torch.manual_seed(0)
    scores = torch.randn(3, 7, dtype=torch.float64)  # (B, C)
    rows = [0, 0, 1, 2, 2, 2, 1]
    caption_image = torch.tensor(rows)
    hardest, summed, nce = _loop_losses(scores, rows, 0.2)
    assert float(triplet_loss(scores, 0.2, True, caption_image)) == pytest.approx(float(hardest))
    assert float(triplet_loss(scores, 0.2, False, caption_image)) == pytest.approx(float(summed))
    assert float(info_nce_loss(scores, caption_image)) == pytest.approx(float(nce))
    # Pairs are the same losses on the diagonal.
    square = torch.randn(5, 5, dtype=torch.float64)
    diagonal = torch.arange(5)
    for max_violation in (True, False):
        expected = triplet_loss(square, 0.2, max_violation, diagonal)
        torch.testing.assert_close(triplet_loss(square, 0.2, max_violation), expected)
    torch.testing.assert_close(info_nce_loss(square), info_nce_loss(square, diagonal))
    with pytest.raises(ValueError, match="caption_image"):
        triplet_loss(scores)


def test_grouped_batch_diagnostics_by_hand() -> None:
    from hat.train import batch_diagnostics

    # (1, 2, 3): image 0 has captions 0 and 1, image 1 has caption 2
    scores = torch.tensor([[[0.9, 0.8, 0.3], [0.1, 0.7, 0.6]]])
    d = batch_diagnostics(scores, margin=0.2, caption_image=torch.tensor([0, 0, 1]))
    assert d["hat_pos"] == pytest.approx((0.9 + 0.8 + 0.6) / 3)
    # hardest negatives: images as queries (per pair) 0.3, 0.3, 0.7; captions 0.1, 0.7, 0.3
    assert d["hat_hardneg"] == pytest.approx((0.3 + 0.3 + 0.7 + 0.1 + 0.7 + 0.3) / 6)
    # hinges (query, negative): (0.9; 0.3) no, (0.8; 0.3) no, (0.6; 0.1) no, (0.6; 0.7) yes;
    # captions: (0.9; 0.1) no, (0.8; 0.7) yes, (0.6; 0.3) no -> 2 of 7
    assert d["hat_active"] == pytest.approx(2 / 7)


def test_grouped_captions_train_on_images_with_all_their_captions(tmp_path, scenes) -> None:
    import json

    from hat.data import ImageCaptionsDataset, PairCollator, build_transform
    from hat.train import Trainer

    cfg = _tiny_run(scenes, "train.group_captions=true", "train.max_steps_per_epoch=0",
                    "train.log_every=1", "train.loss=infonce")  # fmt: skip
    trainer = Trainer(cfg, tmp_path / "run", device="cpu", progress=False)
    images = len(trainer.train_records)
    assert trainer.steps_per_epoch() == images // cfg.train.batch_size
    items = ImageCaptionsDataset(
        trainer.train_records[:3], build_transform(cfg.model.image, train=False)
    )
    batch = PairCollator(trainer.tokenizer)([items[0], None, items[2]])
    counts = [len(trainer.train_records[i].captions) for i in (0, 2)]
    assert batch["images"].shape[0] == 2 and int(batch["skipped"]) == 1
    assert batch["caption_image"].tolist() == [0] * counts[0] + [1] * counts[1]
    assert batch["input_ids"].shape[0] == sum(counts)
    trainer.fit()
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == images // cfg.train.batch_size
    assert all(0 <= r["hat_active"] <= 1 and r["grad_level1_image"] > 0 for r in steps)


def _tiny_run(scenes, *extra: str):
    from support import data_args

    from hat.config import apply_overrides

    return apply_overrides(
        get_preset("tiny"),
        [*data_args(scenes), "train.epochs=1", "train.max_steps_per_epoch=3", *extra],
    )


def test_diagnostics_are_logged(tmp_path, scenes) -> None:
    import json

    from hat.train import Trainer

    cfg = _tiny_run(scenes, "train.log_every=1", "train.loss=infonce")
    Trainer(cfg, tmp_path / "run", device="cpu", progress=False).fit()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 3
    keys = {"temperature", "grad_image", "grad_text", "hat_gap", "hat_active"}
    for k in range(1, 4):
        keys |= {f"level{k}_pos", f"level{k}_hardneg", f"level{k}_gap", f"level{k}_active"}
        keys |= {f"grad_level{k}_image", f"grad_level{k}_text"}
    for row in steps:
        assert keys <= set(row), keys - set(row)
        assert row["grad_level1_image"] > 0 and 0 <= row["hat_active"] <= 1
        gap = row["hat_pos"] - row["hat_hardneg"]
        assert row["hat_gap"] == pytest.approx(gap)
    # The learnt temperature moved and is saved with the run.
    assert steps[-1]["temperature"] != pytest.approx(cfg.train.temperature, abs=1e-9)
    assert any("val_chance_rsum" in r for r in rows)


def test_batch_diagnostics_by_hand() -> None:
    from hat.train import batch_diagnostics

    scores = torch.tensor([[[0.9, 0.5], [0.1, 0.2]]])  # (1, 2, 2): one level
    d = batch_diagnostics(scores, margin=0.2)
    assert d["hat_pos"] == pytest.approx(0.55)
    # hardest negatives: image rows 0.5, 0.1; caption columns 0.1, 0.5
    assert d["hat_hardneg"] == pytest.approx(0.3) and d["hat_gap"] == pytest.approx(0.25)
    # hinges: row 0: 0.2 + 0.5 - 0.9 < 0; row 1: 0.2 + 0.1 - 0.2 > 0;
    # col 0: 0.2 + 0.1 - 0.9 < 0; col 1: 0.2 + 0.5 - 0.2 > 0 -> 2 of 4
    assert d["hat_active"] == pytest.approx(0.5)


def test_collapse_warning_fires_on_a_model_that_cannot_learn(tmp_path, caplog) -> None:
    """A frozen image tower whose projections cannot learn either (lr 0) stays at
    chance: the warning names the diagnostics; a good score does not warn."""
    import json
    import logging

    from hat.data import generate_scenes
    from hat.train import Trainer

    # 40 validation images: chance rSum ~ 140, so 1.5x chance is a bar a model can pass.
    scenes = generate_scenes(tmp_path / "data", n_train=16, n_val=40, n_test=3, image_size=64)
    cfg = _tiny_run(
        scenes, "train.epochs=2", "train.lr=0.0", "train.freeze_image_epochs=5",
        "train.max_violation_warmup_epochs=1",
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="hat.train"):
        trainer = Trainer(cfg, tmp_path / "run", device="cpu", progress=False)
        trainer.fit()
    warned = [r.getMessage() for r in caplog.records if "of chance" in r.getMessage()]
    assert len(warned) == 1  # epoch 2 only: epoch 1 is the warm-up
    assert "gap" in warned[0] and "train.loss=infonce" in warned[0]
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert sum("collapse_warning" in json.loads(r) for r in rows) == 1
    assert not trainer._warn_on_collapse(rsum=200.0, chance_rsum=32.0)


def test_cached_text_features_give_the_loss_of_recomputing_them(scenes) -> None:
    from hat.config import apply_overrides
    from hat.data import (
        CaptionTokenizer,
        PairCollator,
        PairDataset,
        build_transform,
        load_records,
        select_split,
    )
    from hat.encoder import Encoder, TextCache
    from hat.train import TrainingObjective

    cfg = _tiny_run(scenes, "train.loss=infonce", "train.level_loss_weight=0.5")
    model = hat.HAT(cfg.model).eval()  # no dropout on either side of the comparison
    tokenizer = CaptionTokenizer.from_config(cfg.model.text)
    train = select_split(load_records(cfg.data), "train")
    pairs = PairDataset(train, build_transform(cfg.model.image, train=False))
    batch = PairCollator(tokenizer)([pairs[i] for i in range(0, 40, 5)])
    cache = TextCache(
        Encoder(model, tokenizer=tokenizer), [c for r in train for c in r.captions], 7
    )
    assert len(cache) == len({c for r in train for c in r.captions})
    args = (batch["images"], batch["input_ids"], batch["attention_mask"], True)
    losses, grads = [], []
    for text_cache in (None, cache):
        objective = TrainingObjective(model, cfg.train, "cpu", False, torch.float32, text_cache)
        model.zero_grad()
        loss = objective(*args)[0]
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.text_tower.projections.parameters()])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for cached, recomputed in zip(grads[1], grads[0]):
        # Float32 hidden states computed in other batches differ by rounding, which the
        # sums of the backward pass spread over every entry: bound the error by the
        # gradient's own scale, not entry by entry.
        scale = float(recomputed.abs().max())
        torch.testing.assert_close(cached, recomputed, rtol=1e-4, atol=1e-4 * scale)
    with pytest.raises(KeyError, match="text cache"):
        cache.lookup(*tokenizer(["a caption that is not in the training split"]).values())
    unfreezes = apply_overrides(cfg, ["train.cache_text=true", "train.freeze_text_epochs=0"])
    from hat.config import ConfigError
    from hat.train import Trainer

    with pytest.raises(ConfigError, match="cache_text"):
        Trainer(unfreezes, "/nonexistent/never-written", device="cpu", progress=False)


def test_an_encoder_reads_the_text_cache_where_it_holds_every_caption(scenes) -> None:
    """Validation and the demo's fit of the global heads read the training run's text
    cache: the features equal recomputing them (valid positions, float tolerance), the
    backbone runs only for batches with a caption the cache lacks, validation captions
    change no row of the training captions, and a cache of other weights is refused."""
    import copy

    from hat.data import load_records, select_split
    from hat.encoder import Encoder, TextCache

    cfg = _tiny_run(scenes)
    model = hat.HAT(cfg.model).eval()
    records = load_records(cfg.data)
    train = [c for r in select_split(records, "train") for c in r.captions]
    val = [c for r in select_split(records, "val") for c in r.captions]
    alone = TextCache(Encoder(model), train, 7)
    cache = TextCache(Encoder(model), train, 7, extra=[*val, *train[:3]])
    assert len(cache) == len(set(train) | set(val))
    for before, after in zip(alone.levels, cache.levels):  # (T + 1, H) each
        assert torch.equal(after[: len(before) - 1], before[:-1])

    reader = Encoder(copy.deepcopy(model))  # equal weights, another module
    reader.use_text_cache(cache)
    backbone_calls = []
    layer_tokens = reader.model.text_tower.layer_tokens
    reader.model.text_tower.layer_tokens = lambda *a: backbone_calls.append(1) or layer_tokens(*a)
    cached = reader.encode_captions(val, batch_size=4)
    assert not backbone_calls
    recomputed = Encoder(model).encode_captions(val, batch_size=4)
    assert torch.equal(cached.lengths, recomputed.lengths)
    valid = torch.arange(cached.levels[0].shape[1]) < cached.lengths[:, None]  # (M, L)
    for a, b in zip(cached.levels, recomputed.levels):
        torch.testing.assert_close(a[valid], b[valid], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cached.global_embedding, recomputed.global_embedding,
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    torch.testing.assert_close(reader.pooled_captions(train), Encoder(model).pooled_captions(train),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    assert not backbone_calls
    reader.encode_captions([val[0], "a caption in no split"])  # one batch, one caption unknown
    assert backbone_calls == [1]

    changed = copy.deepcopy(model)
    with torch.no_grad():
        next(changed.text_tower.encoder.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="other weights"):
        Encoder(changed).use_text_cache(cache)


def test_validation_reads_the_training_text_cache(tmp_path, scenes) -> None:
    from hat.train import Trainer

    cfg = _tiny_run(scenes, "train.cache_text=true", "train.freeze_text_epochs=-1")
    trainer = Trainer(cfg, tmp_path / "run", device="cpu", progress=False)

    def no_backbone(*args):
        raise AssertionError("the text backbone ran for cached captions")

    trainer.model.text_tower.layer_tokens = no_backbone
    assert trainer.validate().metrics["hat"]["rsum"] >= 0


def test_thread_choice_counts_cores_and_other_processes(monkeypatch) -> None:
    import os

    from hat import train

    assert train.pick_threads(3) == 3  # an explicit number wins
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(train, "_busy_cores", lambda: 0)
    assert train.pick_threads() == cores
    monkeypatch.setattr(train, "_busy_cores", lambda: cores + 5)
    assert train.pick_threads() == 1  # never fewer than one
    monkeypatch.undo()
    assert 1 <= train.pick_threads() <= cores


def test_resume_keeps_the_thread_count_of_the_run(tmp_path, scenes, monkeypatch) -> None:
    """Float sums depend on the thread count: a resumed run trains with the one it was
    saved with, whatever the machine looks like now, so that resume stays exact."""
    from hat.config import apply_overrides
    from hat.train import Trainer

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        cfg = _tiny_run(scenes, "train.num_threads=1")
        Trainer(cfg, tmp_path / "run", device="cpu", progress=False).fit()
        more = apply_overrides(cfg, ["train.epochs=2", "train.num_threads=2"])
        resumed = Trainer(more, tmp_path / "run", device="cpu", resume=True, progress=False)
        assert resumed.state.threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_cosine_schedule_warms_up_then_decays_to_zero_per_step() -> None:
    import dataclasses

    cfg = dataclasses.replace(PAPER, lr_schedule="cosine", warmup_steps=4, epochs=2, lr=1e-3)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer, scheduler = build_optimizer([param], cfg, steps_per_epoch=10)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # decays from the warm-up on
    assert lrs[-1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # after the last


def test_decoded_images_are_kept_up_to_their_budget_and_change_nothing(scenes) -> None:
    from hat.data import DecodedImages, PairDataset, build_transform, load_records, select_split

    cfg = _tiny_run(scenes)
    train = select_split(load_records(cfg.data), "train")
    cache = DecodedImages(max_bytes=3 * 64 * 64 * 3)  # room for 3 of the 64 px scenes
    images = [cache.load(record.path) for record in train[:5]]
    assert len(cache) == 3 and cache.nbytes == 3 * images[0].width * images[0].height * 3
    assert cache.load(train[0].path) is images[0]  # kept: not decoded again
    transform = build_transform(cfg.model.image, train=False)
    plain = PairDataset(train[:4], transform)
    cached = PairDataset(train[:4], transform, cache=DecodedImages(2**30))
    for i in range(len(plain)):
        for _ in range(2):  # the second read comes from memory
            assert torch.equal(cached[i][0], plain[i][0])


def test_neighbour_groups_serve_each_pair_once_beside_its_nearest_of_other_images() -> None:
    from hat.train import EpochOrder, NeighbourGroups

    # Pairs 0-7 of images 0-3 (two captions each) on a line: pair p sits at p // 2 + p / 10.
    images = torch.arange(8) // 2  # (S,)
    position = images.float() + torch.arange(8) / 10  # (S,)
    embeddings = torch.stack([torch.cos(position), torch.sin(position)], dim=1)  # (S, 2)
    groups = NeighbourGroups(embeddings, images, group=2)
    arranged = groups.arrange(torch.tensor([0, 5, 2, 7, 1, 3, 4, 6])).tolist()
    assert sorted(arranged) == list(range(8))  # every pair once
    # Anchor 0 (image 0) takes its nearest pair of ANOTHER image (2, image 1), never its
    # own image's pair 1, though that one is nearer.
    assert arranged[:2] == [0, 2]
    pairs = [arranged[i : i + 2] for i in range(0, 8, 2)]
    assert all(images[a] != images[b] for a, b in pairs if len({a, b}) == 2)
    # Group 1 and no groups give the plain permutation; the grouped order is a function
    # of (seed, epoch) and shards like it (the offset cuts the grouped order).
    assert NeighbourGroups(embeddings, images, 1).arrange(torch.arange(8)).tolist() == list(
        range(8)
    )
    whole = list(EpochOrder(8, 3, 1, neighbours=groups))
    assert sorted(whole) == list(range(8)) and whole == list(EpochOrder(8, 3, 1, neighbours=groups))
    assert list(EpochOrder(8, 3, 1, offset=4, neighbours=groups)) == whole[4:]


def test_neighbour_batches_need_the_text_cache(tmp_path, scenes) -> None:
    from hat.config import FieldRangeError
    from hat.train import Trainer

    with pytest.raises(FieldRangeError, match="neighbour_group.*cache_text"):
        _tiny_run(scenes, "train.neighbour_group=4")
    cfg = _tiny_run(scenes, "train.neighbour_group=3", "train.cache_text=true",
                    "train.freeze_text_epochs=-1", "train.loss=infonce")  # fmt: skip
    trainer = Trainer(cfg, tmp_path / "run", device="cpu", progress=False)
    assert trainer.neighbours is not None and trainer.neighbours.group == 3
    batch = next(iter(trainer._loader(0, 0)))
    # The batch's first group: an anchor and two pairs of other images.
    assert len(set(batch["image_index"][:3].tolist())) == 3
    trainer.fit()
