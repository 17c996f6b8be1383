"""Distributed training and evaluation on the CPU: gloo, two processes.

- ``torchrun`` trains the tiny preset on two processes; its checkpoint loads, and
  ``torchrun ... hat evaluate`` on two processes reports what one process reports;
- with ``train.global_batch_loss``, 2 processes x batch b give the loss and the
  gradients of 1 process x batch 2b (float64), while the per-process loss does not;
- sharded evaluation gives the scores and the report of a single process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.multiprocessing as mp
from support import data_args
from torch.nn.parallel import DistributedDataParallel

from hat import distributed, scorer
from hat.checkpoint import load_training_checkpoint, resolve_model
from hat.config import RetrievalConfig, apply_overrides, get_preset
from hat.data import CaptionTokenizer, load_records, select_split
from hat.encoder import Encoder
from hat.evaluate import encode_and_score, evaluate
from hat.index.gallery import gather
from hat.model import HAT
from hat.train import EpochOrder, Trainer, TrainingObjective

WORLD = 2
SRC = Path(__file__).resolve().parents[1] / "src"
SUBPROCESS_TIMEOUT_S = 300
STEPS = 3
# Results computed by other thread counts or batch shapes agree to rounding, not bitwise
# (MKL/oneDNN reorder sums by thread count and shape): float32 a few ulps, and a value
# stored in float16 may round to the neighbouring float16 (relative step 2**-10).
FLOAT32_RTOL, FLOAT32_ATOL = 1e-5, 1e-6
FLOAT16_RTOL, FLOAT16_ATOL = 2 * 2**-10, 1e-4


def _eval_args(model: Path, annotations: Path, out_json: Path) -> list[str]:
    return [
        "evaluate", str(model), "--which", "latest", "--annotations", str(annotations),
        "--image-root", str(annotations.parent), "--split", "test", "--num-workers", "0",
        "--device", "cpu", "--batch-size", "3", "--storage-dtype", "float32",
        "--shortlist-k", "5", "--json", str(out_json),
    ]  # fmt: skip


def _torchrun(*hat_args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m hat -- ARGS`` (``--`` keeps torchrun
    from reading ``hat``'s options as its own)."""
    paths = [str(SRC), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(WORLD), "-m", "hat", "--", *hat_args,
    ]  # fmt: skip
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_torchrun_trains_and_evaluates_like_one_process(tmp_path: Path, scenes: Path) -> None:
    run = tmp_path / "run"
    batch = 4
    _torchrun(
        "train", "--preset", "tiny", "--device", "cpu", "--run", str(run),
        *data_args(scenes), f"train.batch_size={batch}", f"train.max_steps_per_epoch={STEPS}",
    )  # fmt: skip
    checkpoint = load_training_checkpoint(run / "checkpoints" / "latest.pt")
    assert checkpoint["state"]["global_step"] == STEPS
    assert checkpoint["state"]["world_size"] == WORLD
    assert len(checkpoint["rng_per_rank"]) == WORLD
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # Rank 0 alone logs: one record per step and one per validation.
    assert [r["global_step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    assert sum("val_rsum" in r for r in records) == 1

    sharded = tmp_path / "sharded.json"
    done = _torchrun(*_eval_args(run, scenes, sharded))
    assert done.stdout.count("all images") == 1  # rank 0 alone prints
    # The same evaluation in this process (the library call the command makes; calling
    # the command here would flush denormals for every later test).
    model = resolve_model(run, "latest")
    cfg = apply_overrides(get_preset("tiny"), data_args(scenes))
    single = evaluate(
        Encoder(model), select_split(load_records(cfg.data), "test"), batch_size=3,
        retrieval=RetrievalConfig(shortlist_k=5, storage_dtype="float32"), progress=False,
    )  # fmt: skip
    assert json.loads(sharded.read_text()) == json.loads(json.dumps(single.to_dict()))


def test_epoch_order_shards_global_batches() -> None:
    size, batch, offset = 23, 3, 6
    whole = list(EpochOrder(size, seed=4, epoch=2, offset=offset, batch_size=WORLD * batch))
    shards = [
        list(EpochOrder(size, 4, 2, offset, batch_size=batch, rank=r, world_size=WORLD))
        for r in range(WORLD)
    ]
    steps = (size - offset) // (WORLD * batch)
    assert all(len(s) == steps * batch for s in shards)
    for step in range(steps):
        joined = [i for s in shards for i in s[step * batch : (step + 1) * batch]]
        assert joined == whole[step * WORLD * batch : (step + 1) * WORLD * batch]
    permutation = list(EpochOrder(size, 4, 2))
    assert sorted(permutation) == list(range(size)) and permutation[offset:][: len(whole)] == whole


# ------------------------------------------------------------ spawned workers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
    )  # fmt: skip
    torch.set_num_threads(1)
    distributed.init_from_env(torch.device("cpu"))


CAPTIONS = [
    "a red circle",
    "a big blue square left of a small green star",
    "two stars",
    "a green triangle above a red circle and a blue square",
    "a yellow square",
    "a small red star right of a big green circle",
    "a blue circle left of a blue circle",
    "one triangle",
]


def _loss_and_grads(global_batch: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """This process's share of a fixed batch of ``len(CAPTIONS)`` pairs through the
    training objective (in DDP when in a process group), in float64."""
    cfg = get_preset("tiny")
    train = dataclasses.replace(cfg.train, global_batch_loss=global_batch)
    torch.manual_seed(0)
    model = HAT(cfg.model).double().eval()  # eval: no dropout, so both sides compare
    images = torch.randn(
        len(CAPTIONS), 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )  # (2b, 3, H, W)
    b = len(CAPTIONS) // distributed.world_size()
    mine = slice(distributed.rank() * b, (distributed.rank() + 1) * b)
    tokens = CaptionTokenizer.from_config(cfg.model.text)(CAPTIONS[mine])
    objective = TrainingObjective(model, train, "cpu", amp=False, amp_dtype=torch.bfloat16)
    forward = DistributedDataParallel(objective) if distributed.is_distributed() else objective
    out, loss, _ = forward(images[mine], tokens["input_ids"], tokens["attention_mask"], True)
    out.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(distributed.all_reduce_mean(loss)), grads


def _evaluation(annotations: Path) -> dict:
    """Features, scores and report of the tiny model on the test scenes, with batches and
    image blocks of 3 so that the 8 images and 40 captions split unevenly."""
    cfg = apply_overrides(get_preset("tiny"), data_args(annotations))
    torch.manual_seed(0)
    model = HAT(cfg.model).eval()
    records = select_split(load_records(cfg.data), "test")
    encoder = Encoder(model)
    # Image blocks of 3 images' float32 tokens, shared out unevenly.
    tokens = sum(g * g for g in model.image_tower.grid_sizes) * cfg.model.embed_dim
    block = 3 * tokens * torch.finfo(torch.float32).bits // 8
    retrieval = RetrievalConfig(shortlist_k=5, storage_dtype="float32")
    cpi, batch = cfg.data.captions_per_image, 3
    captions = [c for r in records for c in r.captions[:cpi]]
    with mock.patch.object(scorer, "TOKEN_BLOCK_BYTES", block):
        img, txt, scores = encode_and_score(encoder, records, captions, batch, 0, retrieval, False)
        assert encoder.scorer(retrieval).images_per_block(img) == 3
        report = evaluate(
            encoder, records, cpi, batch, folds=2, retrieval=retrieval, progress=False
        )
    return {
        "tensors": [*img.levels, img.global_embedding, *txt.levels, txt.lengths, scores.levels],
        "report": report.to_dict(),
    }


def _straight_and_resumed(annotations: Path, root: Path) -> None:
    """Two epochs of the Trainer straight, and one epoch then a resumed second one."""
    cfg = apply_overrides(
        get_preset("tiny"),
        [*data_args(annotations), "train.batch_size=4", f"train.max_steps_per_epoch={STEPS}",
         "train.epochs=2"],
    )  # fmt: skip
    Trainer(cfg, root / "straight", device="cpu", progress=False).fit()
    first = apply_overrides(cfg, ["train.epochs=1"])
    Trainer(first, root / "resumed", device="cpu", progress=False).fit()
    Trainer(cfg, root / "resumed", device="cpu", resume=True, progress=False).fit()


def _worker(rank: int, port: int, annotations: str, out: str) -> None:
    """The checks below in one pair of processes (each start costs seconds of imports):
    first in the group, then, on rank 0 after leaving it, alone with the same settings."""
    _join(rank, port)
    spread = {
        "global": _loss_and_grads(True),
        "local": _loss_and_grads(False),
        "eval": _evaluation(Path(annotations)),
    }
    _straight_and_resumed(Path(annotations), Path(out).parent)
    distributed.teardown()
    if rank == 0:
        alone = {"global": _loss_and_grads(True), "eval": _evaluation(Path(annotations))}
        torch.save({"spread": spread, "alone": alone, "root": str(Path(out).parent)}, out)


@pytest.fixture(scope="module")
def spawned(scenes: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("spawned") / "results.pt"
    mp.spawn(_worker, args=(_free_port(), str(scenes), str(out)), nprocs=WORLD, join=True)
    return torch.load(out)


def test_global_batch_loss_matches_one_process_on_the_whole_batch(spawned: dict) -> None:
    loss, grads = spawned["alone"]["global"]
    spread_loss, spread_grads = spawned["spread"]["global"]
    assert spread_loss == pytest.approx(loss, rel=1e-12)
    assert spread_grads.keys() == grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(spread_grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)
    # The per-process loss (hardest negatives among its own b pairs) is another loss.
    local_loss, local_grads = spawned["spread"]["local"]
    assert local_loss != pytest.approx(loss, rel=1e-6)
    assert any(not torch.allclose(local_grads[n], g) for n, g in grads.items())


def test_resume_in_a_process_group_is_exact(spawned: dict) -> None:
    root = Path(spawned["root"])
    a = load_training_checkpoint(root / "straight" / "checkpoints" / "latest.pt")
    b = load_training_checkpoint(root / "resumed" / "checkpoints" / "latest.pt")
    assert a["state"] == b["state"] and a["state"]["global_step"] == 2 * STEPS
    for key, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][key], rtol=0, atol=0, msg=key)
    for ra, rb in zip(a["rng_per_rank"], b["rng_per_rank"], strict=True):
        assert torch.equal(ra["torch"], rb["torch"])


def test_sharded_evaluation_equals_one_process(spawned: dict) -> None:
    """Same features and scores as one process, to float32 rounding: the ranks encode
    other batch compositions than one process does, and BLAS kernels promise no
    bit-equality across matrix shapes."""
    sharded, alone = spawned["spread"]["eval"], spawned["alone"]["eval"]
    for a, b in zip(sharded["tensors"], alone["tensors"], strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)
    assert sharded["report"].keys() == alone["report"].keys()
    for key, table in alone["report"]["all"].items():
        assert sharded["report"]["all"][key] == pytest.approx(table), key
    assert {"hat", "hat_two_stage", "level1"} <= set(sharded["report"]["all"])
    assert "2fold" in sharded["report"]


def _stored_images(index) -> tuple[list[str], object]:
    """Paths and features of every image of an index, in id order."""
    ids, segments, rows = index.store.locations("image")
    return [index.image_path(int(i)) for i in ids], gather(index.store, "image", segments, rows)


def test_sharded_index_build_equals_one_process(tmp_path: Path, scenes: Path) -> None:
    """Two ranks reading and encoding shares of the images build the same index as one
    process: the same images in the same order, features equal to float16 rounding
    (torchrun ranks run 1 thread, the single process 2: not bit-equal by design), and
    the same search scores."""
    from hat.checkpoint import save_model
    from hat.cli import main
    from hat.index import Index

    save_model(HAT(get_preset("tiny").model), tmp_path / "model")
    images = scenes.parent / "images"
    options = ["index.batch_size=2", "index.commit_every=5"]
    _torchrun("index", "build", str(tmp_path / "model"), str(images),
              "--out", str(tmp_path / "sharded"), *options)  # fmt: skip
    assert main(["index", "build", str(tmp_path / "model"), str(images),
                 "--out", str(tmp_path / "single"), *options]) == 0  # fmt: skip
    with Index.open(tmp_path / "sharded") as sharded, Index.open(tmp_path / "single") as single:
        (paths_a, feats_a), (paths_b, feats_b) = _stored_images(sharded), _stored_images(single)
        assert paths_a == paths_b and len(paths_a) > 0
        for a, b in zip(feats_a.levels, feats_b.levels, strict=True):
            assert a.shape == b.shape
            torch.testing.assert_close(a.float(), b.float(), rtol=FLOAT16_RTOL, atol=FLOAT16_ATOL)
        torch.testing.assert_close(
            feats_a.global_embedding.float(), feats_b.global_embedding.float(),
            rtol=FLOAT16_RTOL, atol=FLOAT16_ATOL,
        )  # fmt: skip
        query = "a red circle left of a blue square"
        # Sorted scores are continuous in the features (an order may swap between two
        # near-tied images, the score list may not).
        got = [h.score for h in sharded.search_text(query, 5)]
        want = [h.score for h in single.search_text(query, 5)]
        assert got == pytest.approx(want, abs=1e-2)
