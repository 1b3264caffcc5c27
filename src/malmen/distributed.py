"""Several processes, one edit: the edges of a torch.distributed run.

Under ``torchrun --nproc-per-node N`` every process holds the model and the editor; each traces its
share of the facts, the sufficient statistics (solver.py) are summed over the processes, the solve
runs once (rank 0) and the shifts are broadcast.  In meta-training each process holds its share of
a step's facts; the gradient of the meta-loss with respect to the shifts, the normalisers'
moments and the hyper-network's gradients are summed the same way, so every process takes the
same Adam step.  NCCL on GPUs, gloo on CPUs.  Nothing here touches the mathematics: it only
shards, sums and broadcasts, and everything is a no-op in a single process.

    torchrun --nproc-per-node 2 -m malmen.cli edit --editor smollm2-zsre --facts facts.jsonl --out edited
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """The process that writes files and prints (rank 0; the only one without torchrun)."""
    return rank() == 0


def init_from_env(device: str = "cpu") -> str:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns the device this process
    uses: ``cuda:LOCAL_RANK`` when asked for cuda, else ``device``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return device
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    return device


def shard(items: Iterable[T]) -> Iterator[T]:
    """This process's share: every world_size-th item, from its rank on (streamed)."""
    r, n = rank(), world_size()
    for i, item in enumerate(items):
        if i % n == r:
            yield item


def all_reduce(tensors: Iterable[torch.Tensor]) -> None:
    """Sum each tensor over the processes, in place."""
    if not active():
        return
    for t in tensors:
        dist.all_reduce(t)


def all_reduce_statistics(aggregator) -> None:
    """Sum an aggregator's sufficient statistics (solver.py) over the processes.  Asked for only
    here: asking turns a normal equation that still holds its tokens into sums."""
    if active():
        all_reduce(aggregator.statistics().values())


def all_reduce_grads(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Sum the gradients over the processes (a parameter without one takes zeros, so that every
    process sends the same tensors)."""
    if not active():
        return
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def broadcast(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Every process gets rank ``src``'s values, in place."""
    if not active():
        return
    for t in tensors:
        dist.broadcast(t, src)


def total(value: float, device: torch.device | str = "cpu") -> float:
    """A number summed over the processes."""
    if not active():
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


def finish(code: int) -> int:
    """``code``; in a torch.distributed run, the process ends here with it instead.

    Why: the interpreter's teardown after a finished gloo run now and then aborts ('terminate
    called without an active exception', exit -6; seen with torch 2.13 in about one run in
    fifteen of two CPU processes, and as often after ``destroy_process_group``), and torchrun
    then reports a run whose every file is written as failed.  Streams are flushed first."""
    if not active():
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
