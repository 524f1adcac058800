"""The tensor-parallel group a model shard belongs to, passed explicitly to the layers, and how
the ranks of one group meet (torch.distributed rendezvous: NCCL on CUDA, gloo on CPU)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup when size > 1

    def shard(self, n: int, what: str) -> int:
        if n % self.size:
            raise ValueError(f"{what}={n} is not divisible by tensor_parallel_size={self.size}")
        return n // self.size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's slice of the last dimension (vocab-parallel logits)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE = TensorParallel()


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of one group meet. Either a torch `init_method` (the user's, or "env://"
    under torchrun) or a TCPStore that the driver opened on a free port (no fixed port, so two
    engines on one host never collide)."""

    world_size: int
    backend: str  # "gloo" | "cpu:gloo,cuda:nccl"
    timeout_s: float  # bounds the rendezvous and every collective
    init_method: str | None = None
    store_host: str = "127.0.0.1"
    store_port: int = 0

    @property
    def timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout_s)


def backend_for(device: torch.device) -> str:
    # gloo beside NCCL so that CPU objects (the torchrun control address) can be broadcast too
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def open_store(world_size: int, timeout_s: float, host: str = "127.0.0.1") -> dist.TCPStore:
    """The driver's rendezvous store on a port the OS picks (read it back from `.port`)."""
    return dist.TCPStore(host, 0, world_size, is_master=True,
                         timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


def init_tensor_parallel(rdzv: Rendezvous, rank: int, store: dist.Store | None = None) -> TensorParallel:
    """Join the default process group as `rank` and return the shard's view of it."""
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized in this process: "
                           "one tensor-parallel engine per process")
    if rdzv.init_method is not None:
        dist.init_process_group(rdzv.backend, init_method=rdzv.init_method, rank=rank,
                                world_size=rdzv.world_size, timeout=rdzv.timeout)
    else:
        if store is None:
            store = dist.TCPStore(rdzv.store_host, rdzv.store_port, rdzv.world_size, is_master=False,
                                  timeout=rdzv.timeout)
        dist.init_process_group(rdzv.backend, store=store, rank=rank, world_size=rdzv.world_size,
                                timeout=rdzv.timeout)
    return TensorParallel(rank, rdzv.world_size, dist.group.WORLD)


def close_tensor_parallel(abort: bool = False) -> None:
    """Leave the process group. `abort` (NCCL only) also unblocks collectives stuck on a dead peer."""
    if not dist.is_initialized():
        return
    if abort and dist.get_backend() != "gloo":
        try:
            dist.distributed_c10d._abort_process_group()  # experimental torch API (NCCL)
        except Exception:  # noqa: BLE001 - fall back to an ordinary destroy
            pass
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class TorchrunEnv:
    """The launch environment torchrun (or any launcher following it) sets for each process."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_environ(cls) -> TorchrunEnv | None:
        env = os.environ
        if "RANK" not in env or "WORLD_SIZE" not in env or "MASTER_ADDR" not in env:
            return None
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"])))
