"""One process or many: process-group setup from torchrun's environment, reductions, and a replica check.

`torchrun --nproc-per-node N -m stagewise.train ...` sets RANK / WORLD_SIZE / LOCAL_RANK
(and MASTER_ADDR/PORT, or a rendezvous for multi-node); without them the
trainer runs as a single process. NCCL on GPU, gloo on CPU. Only rank 0
writes files and prints; metrics are summed or averaged over all ranks.
"""
from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def setup(device: str, timeout_s: int) -> Dist:
    """Join the process group when launched by torchrun; pick the device ('auto' | 'cuda' | 'cpu')."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda but no CUDA device is visible; use run.device=cpu")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def torch_threads(requested: int, device: torch.device) -> int:
    """torch's CPU threads per process: `requested` when > 0; on CPU, auto (0) is half the cores this process may
    use, shared by the processes on this node (LOCAL_WORLD_SIZE), at least 1: the loader's threads take the rest;
    on CUDA, 0 keeps torch's default (the host only launches kernels).

    Measured on 2 shared cores: one torch thread ran B0 steps steadily at about 0.2 s (32 px, batch 32); torch's
    default of 2 threads was up to 2x faster on an idle machine but 5-100x slower whenever another process took a
    core (the OpenMP team waits for its descheduled thread; docs/training.md)."""
    if requested > 0 or device.type != "cpu":
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // 2 // max(1, _env_int("LOCAL_WORLD_SIZE", 1)))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Every rank waits here for the others (a no-op in one process)."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def broadcast_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's buffers (BN running statistics), which DDP lets drift after each forward."""
    if not dist.is_initialized():
        return
    for b in module.buffers():
        dist.broadcast(b, src=0)


def fingerprint(module: nn.Module) -> str:
    """sha256 of every tensor in the state dict, in order: equal on all ranks iff the replicas agree."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def gather_strings(s: str) -> list[str]:
    if not dist.is_initialized():
        return [s]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, s)
    return [str(x) for x in out]
