"""Data parallelism under torchrun: the process group, rank helpers, sharding of a global batch, all-reduces.

    torchrun --nproc_per_node=N train.py ...       # NCCL on CUDA (device cuda:LOCAL_RANK), gloo on CPU

Outside torchrun (no WORLD_SIZE in the environment) every helper is the identity of a single process: rank 0 of 1,
the barriers return at once, the all-reduces leave their input as it is.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

PREP_TIMEOUT = timedelta(hours=24)   # how long the other ranks wait at a barrier for rank 0's preparation
_long_group = None                   # a gloo group with PREP_TIMEOUT (the training group keeps torch's timeout)


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting RANK and WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init(device: str) -> str:
    """Join the process group torchrun describes (NCCL for a CUDA device, gloo otherwise); returns the device this
    process uses: cuda:LOCAL_RANK for a CUDA device, else `device`. Without torchrun it returns `device`."""
    global _long_group
    if not launched() or dist.is_initialized():
        return device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    _long_group = dist.new_group(backend="gloo", timeout=PREP_TIMEOUT)
    return device


def shutdown() -> None:
    """Wait for every rank (rank 0 may still be writing outputs), then leave the process group."""
    global _long_group
    if dist.is_initialized():
        dist.barrier(group=_long_group)
        dist.destroy_process_group()
        _long_group = None


@contextmanager
def process_group(device: str):
    """init(device) for the body, shutdown() after it. On an exception the group is left as it is: the process
    exits with its error and torchrun stops the other ranks (a barrier here would wait for ranks that never come)."""
    started = launched() and not dist.is_initialized()
    device = init(device)
    yield device
    if started:
        shutdown()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the process that prepares, logs, checkpoints and writes the outputs."""
    return rank() == 0


def wait_for_main() -> None:
    """Barrier with a long timeout: the other ranks wait here while rank 0 prepares (calibration, GPTQ, init)."""
    if dist.is_initialized():
        dist.barrier(group=_long_group)


def shard(indices: list, r: int | None = None, n: int | None = None) -> list:
    """Rank r's share of a global batch of n·b indices: every n-th from the r-th, so the n shards are disjoint, cover
    the batch and take alike lengths from a length-sorted batch; a short last batch leaves some ranks fewer (or no)
    examples."""
    r, n = rank() if r is None else r, world() if n is None else n
    return indices[r::n]


def all_reduce_sum(values: list[float], device: str) -> list[float]:
    """Element-wise sum of a few numbers over the ranks (float64, on `device` as NCCL needs)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast(params: list[torch.Tensor]) -> None:
    """Copy rank 0's values of `params` to every rank, in place (as DistributedDataParallel does at its start)."""
    if dist.is_initialized():
        for p in params:
            dist.broadcast(p.data, src=0)


def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Sum every parameter's gradient over the ranks, in place (a rank with no example this step adds zeros)."""
    if not dist.is_initialized():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    works = [dist.all_reduce(p.grad, async_op=True) for p in params]
    for w in works:
        w.wait()
