"""Running under ``torchrun``: the process group, rank helpers and the collectives that
training and evaluation need.

``torchrun`` starts one process per device and describes the job in the environment
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
:func:`init_from_env` joins that job: NCCL on CUDA devices, gloo otherwise. Started by
plain ``python`` (no ``WORLD_SIZE``, or ``WORLD_SIZE=1``) nothing is initialised and
every helper here answers as a single process would: world size 1, rank 0,
collectives that return their input.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_gather_with_grad",
    "all_reduce_max",
    "all_reduce_mean",
    "barrier",
    "gather_objects",
    "gather_tensors",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "rank",
    "shard_bounds",
    "teardown",
    "world_size",
]

ENV_WORLD_SIZE = "WORLD_SIZE"
ENV_LOCAL_RANK = "LOCAL_RANK"
MAIN_RANK = 0


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group that ``torchrun`` describes and return this process's device.

    ``device`` is the device kind asked for (e.g. from ``--device`` or the best
    available). On CUDA each process takes ``cuda:LOCAL_RANK`` and the backend is
    NCCL; on any other device the backend is gloo. Calling it again, or without
    ``torchrun``'s environment, changes nothing and returns ``device`` (a CUDA device
    then still becomes ``cuda:LOCAL_RANK``).
    """
    if int(os.environ.get(ENV_WORLD_SIZE, "1")) <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get(ENV_LOCAL_RANK, "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
    return device


def teardown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes of the job (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else MAIN_RANK


def is_main_process() -> bool:
    """Whether this process writes files, logs and progress bars (global rank 0)."""
    return rank() == MAIN_RANK


def barrier() -> None:
    """Wait for every process of the job (nothing to wait for in a single process)."""
    if is_distributed():
        dist.barrier()


def _comm_device() -> torch.device:
    """Where tensors must lie to take part in a collective of the current backend."""
    if dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_bounds(num_items: int, chunk: int, shard: int, num_shards: int) -> tuple[int, int]:
    """Items ``[start, stop)`` of shard ``shard`` when ``num_items`` items, cut into
    consecutive chunks of ``chunk`` (the last may be shorter), are dealt out as
    ``num_shards`` runs of whole chunks, the first runs one chunk longer where they
    do not divide evenly. A shard may be empty; the shards in order cover every item.

    Cutting at chunk boundaries keeps every batch (or block) exactly the one a single
    process would form, so sharded work reproduces single-process results.
    """
    chunks = -(-num_items // chunk)
    base, extra = divmod(chunks, num_shards)
    first = shard * base + min(shard, extra)
    last = first + base + (1 if shard < extra else 0)
    return min(first * chunk, num_items), min(last * chunk, num_items)


def gather_objects(obj: Any) -> list[Any]:
    """Every process's picklable ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_tensors(tensor: Tensor | None) -> list[Tensor | None]:
    """Every process's tensor, in rank order, on every process, bit for bit.

    Shapes and dtypes may differ between processes, and a process may contribute
    ``None`` (an empty shard). Each tensor travels as raw bytes, so any dtype works
    on any backend; results come back on ``tensor``'s device (the CPU for ``None``).
    """
    if not is_distributed():
        return [tensor]
    home = tensor.device if tensor is not None else torch.device("cpu")
    meta = None if tensor is None else (tuple(tensor.shape), str(tensor.dtype).split(".")[-1])
    metas = gather_objects(meta)
    comm = _comm_device()
    payload = torch.empty(0, dtype=torch.uint8, device=comm)
    if tensor is not None:
        payload = tensor.detach().contiguous().reshape(-1).view(torch.uint8).to(comm)  # (bytes,)
    longest = max(_nbytes(m) for m in metas)
    padded = torch.zeros(longest, dtype=torch.uint8, device=comm)  # (max bytes,)
    padded[: payload.numel()] = payload
    received = [torch.empty_like(padded) for _ in metas]
    dist.all_gather(received, padded)
    out: list[Tensor | None] = []
    for m, raw in zip(metas, received):
        if m is None:
            out.append(None)
            continue
        shape, dtype = m
        data = raw[: _nbytes(m)].view(getattr(torch, dtype)).reshape(shape)
        out.append(data.to(home))
    return out


def _nbytes(meta: tuple[tuple[int, ...], str] | None) -> int:
    if meta is None:
        return 0
    shape, dtype = meta
    return int(torch.Size(shape).numel()) * getattr(torch, dtype).itemsize


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """``(B, ...)`` on each of ``W`` processes -> ``(W * B, ...)``, rank-ordered blocks.

    Every process must pass the same shape. The block of this process IS ``tensor``
    (gradients flow into it); the other processes' blocks are constants. A loss built
    on the result therefore gives each process the gradient of that loss with respect
    to its own inputs only; summed over processes, this is the gradient with respect
    to all of them.
    """
    if not is_distributed():
        return tensor
    local = tensor.detach().contiguous()
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    parts[rank()] = tensor
    return torch.cat(parts)


def all_reduce_max(value: int) -> int:
    """The largest ``value`` over all processes."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.long, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """The mean of ``tensor`` over all processes (a new, detached tensor); NaN or inf
    on any process make the result NaN or inf everywhere."""
    if not is_distributed():
        return tensor.detach().clone()
    t = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / world_size()).to(tensor.device)
