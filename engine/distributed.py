"""The tensor-parallel group a model shard belongs to, passed explicitly to the layers, and how
the ranks of one group meet (torch.distributed rendezvous: NCCL on CUDA, gloo on CPU).

On GPUs, small all-reduces (the decode step's 2 per layer) skip NCCL: torch's symmetric memory
maps every rank's buffer into its peers, so one kernel copies, meets its peers at a barrier and
sums over NVLink (one-shot), or reduces a slice per rank and gathers it (two-shot)."""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

# Sizes up to which symmetric memory beats NCCL, both inside CUDA graphs, 2 ranks (reports/PERF.md):
# one-shot 14.9 us vs NCCL 24.8 us at 1 MiB, two-shot (with its copies) 40.5 vs 55.9 us at 8 MiB.
ONE_SHOT_MAX_BYTES = 512 << 10
TWO_SHOT_MAX_BYTES = 16 << 20
# Partial sums up to this size (per slot, 2 ranks) go through the fused all-reduce + RMSNorm:
# 8,192 rows of a 4,096 hidden size in bf16, a whole prefill step of the default budget (901 vs
# 977 us for NCCL + norm there, 2xH200, reports/PERF.md).
FUSED_MAX_BYTES = 64 << 20
FUSED_MAX_PROGRAMS = 128
# "push" sends partials of up to this many rows (decode batches; one row per program): 1 us
# ahead of the barrier protocol up to 128 rows, behind from 256 and far behind at prefill sizes,
# where "push" uses the barrier protocol too.
PUSH_MAX_ROWS = FUSED_MAX_PROGRAMS


# torch numbers the store exchanges of symmetric-memory rendezvous with one counter per process,
# so ranks meet only if each has rendezvoused as often as the others. Spawned workers are fresh
# processes: a driver process that has rendezvoused before would wait for keys they never write.
# This mirrors that process-wide torch state (see `symmetric_memory_used`).
_rendezvous_attempts = 0


def symmetric_memory_used() -> bool:
    """Whether this process has attempted a symmetric-memory rendezvous (its counter moved on)."""
    return _rendezvous_attempts > 0


@dataclass(frozen=True)
class SymmetricLayout:
    """Element offsets in a rank's symmetric-memory buffer: torch's all-reduce region; the push
    protocol's two slots, each a receive slot per rank; the barrier protocol's two partial-sum
    slots; its int32 barrier slots, one per program and rank."""

    region: int  # elements for torch's one-shot / two-shot kernels
    slot: int  # elements of one barrier partial-sum slot (0: no fused path)
    world: int
    push_slot: int  # elements of one push receive slot (0: no push)
    itemsize: int

    def push_start(self, slot: int) -> int:
        return self.region + slot * self.world * self.push_slot

    def barrier_start(self, slot: int) -> int:
        return self.push_start(2) + slot * self.slot

    def own_starts(self, slot: int, rank: int) -> tuple[int, int]:
        """Where `rank`'s GEMM writes its partial sums of `slot`: (push, barrier)."""
        return self.push_start(slot) + rank * self.push_slot, self.barrier_start(slot)

    def own_start(self, rows: int, cols: int, slot: int, rank: int) -> int | None:
        """Where `rank`'s GEMM writes [rows, cols] partial sums of `slot`: its push receive slot
        for up to PUSH_MAX_ROWS rows that fit there, else the barrier slot; None if neither fits."""
        push, barrier = self.own_starts(slot, rank)
        if rows <= PUSH_MAX_ROWS and rows * cols <= self.push_slot:
            return push
        return barrier if rows * cols <= self.slot else None

    @property
    def signals_start(self) -> int:
        return self.barrier_start(2)

    @property
    def numel(self) -> int:
        barrier = FUSED_MAX_PROGRAMS * self.world * 4 // self.itemsize if self.slot else 0
        return self.signals_start + barrier


class SymmetricAllReduce:
    """Sums over the group through one symmetric-memory buffer (its ranks call it with the same
    shapes in the same order, as every collective): torch's all-reduce kernels, and the fused
    all-reduce + RMSNorm over partial sums that a GEMM wrote into the buffer (`partial_out`,
    `all_reduce_rmsnorm`). The barrier protocol meets the peers on barrier slots of its own (so it
    does not depend on how torch's kernels use theirs) and loads their partials; the push
    protocol (`push_bytes`, small partials) stores this rank's partials into every peer's
    receive slot."""

    def __init__(self, group: Any, device: torch.device, dtype: torch.dtype, max_bytes: int, fused_bytes: int = 0,
                 push_bytes: int = 0):  # push_bytes: one receive slot
        import torch.distributed._symmetric_memory as symm_mem

        global _rendezvous_attempts
        self.group_name, self.world_size, self.dtype = group.group_name, group.size(), dtype
        self.layout = layout = SymmetricLayout(max_bytes // dtype.itemsize, fused_bytes // dtype.itemsize,
                                               self.world_size, push_bytes // dtype.itemsize, dtype.itemsize)
        self.epochs = torch.zeros(FUSED_MAX_PROGRAMS, dtype=torch.int32, device=device)
        self.buffer: torch.Tensor | None = symm_mem.empty(layout.numel, dtype=dtype, device=device)
        # marks set before the rendezvous publishes this buffer, so no peer can write it earlier:
        # zeros on the barrier slots, -0.0 ("not arrived") on the receive slots
        self.buffer[layout.signals_start:].zero_()
        self.buffer[layout.push_start(0):layout.push_start(2)].fill_(-0.0)
        torch.cuda.synchronize(device)
        _rendezvous_attempts += 1
        handle = symm_mem.rendezvous(self.buffer, self.group_name)  # collective
        self.handle: Any = handle
        self.rank = handle.rank
        self.buffer_ptrs = torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=device)
        self.signal_pads = self.buffer_ptrs + layout.signals_start * dtype.itemsize

    def all_reduce(self, x: torch.Tensor) -> bool:
        """Sum `x` over the ranks in place; False (nothing done) when `x` does not qualify."""
        n = x.numel()
        if (self.buffer is None or x.dtype != self.dtype or n > self.layout.region or not x.is_contiguous()
                or n % (8 * self.world_size)):  # the kernels move 16-byte vectors per rank slice
            return False
        buf = self.buffer[:n].view_as(x)
        if n * x.element_size() <= ONE_SHOT_MAX_BYTES:
            torch.ops.symm_mem.one_shot_all_reduce_copy_out(buf, x, "sum", self.group_name, x)
        else:
            buf.copy_(x)
            torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", self.group_name)
            x.copy_(buf)
        return True

    def partial_out(self, rows: int, cols: int, dtype: torch.dtype, slot: int) -> torch.Tensor | None:
        """Where a row-parallel GEMM writes partial sums [rows, cols] for `all_reduce_rmsnorm`
        (None when they do not fit). Successive all-reduces must alternate slots 0 and 1: a rank
        rewrites a slot only after the next all-reduce has met its peers, so they are done with it
        (whichever protocol each used)."""
        start = self.layout.own_start(rows, cols, slot, self.rank)
        if self.buffer is None or dtype != self.dtype or start is None:
            return None
        return self.buffer[start:start + rows * cols].view(rows, cols)

    def all_reduce_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rmsnorm(sum + residual), sum + residual) where `x` is a `partial_out` slot; None otherwise."""
        layout = self.layout
        if (self.buffer is None or not layout.slot or x.dim() != 2 or residual.shape != x.shape
                or residual.dtype != x.dtype):
            return None
        from engine.kernels.allreduce_rmsnorm import allreduce_rmsnorm, push_allreduce_rmsnorm

        base = self.buffer.data_ptr()
        for slot in (0, 1):
            push, barrier = (base + start * self.dtype.itemsize for start in layout.own_starts(slot, self.rank))
            if x.data_ptr() == push and layout.push_slot:
                return push_allreduce_rmsnorm(self.buffer_ptrs, layout.push_start(slot), layout.push_slot, self.rank,
                                              residual.contiguous(), weight, eps, max_programs=self.epochs.numel())
            if x.data_ptr() == barrier:
                return allreduce_rmsnorm(self.buffer_ptrs, self.signal_pads, self.epochs, layout.barrier_start(slot),
                                         self.rank, residual.contiguous(), weight, eps)
        return None

    def close(self) -> None:
        self.handle = self.buffer = None


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup when size > 1
    symmetric: SymmetricAllReduce | None = None  # GPU fast path for small all-reduces

    def shard(self, n: int, what: str) -> int:
        if n % self.size:
            raise ValueError(f"{what}={n} is not divisible by tensor_parallel_size={self.size}")
        return n // self.size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1 and not (self.symmetric is not None and self.symmetric.all_reduce(x)):
            dist.all_reduce(x, group=self.group)
        return x

    def partial_out(self, rows: int, cols: int, dtype: torch.dtype, slot: int) -> torch.Tensor | None:
        """A buffer for a row-parallel GEMM's partial sums that `all_reduce_rmsnorm` can reduce
        in one fused kernel (see SymmetricAllReduce.partial_out); None to use any tensor."""
        return None if self.symmetric is None else self.symmetric.partial_out(rows, cols, dtype, slot)

    def all_reduce_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The fused sum over ranks + residual add + RMSNorm of partial sums in a `partial_out`
        buffer, as (normed, new residual); None where it does not apply (sum, then norm)."""
        if self.symmetric is None:
            return None
        return self.symmetric.all_reduce_rmsnorm(x, residual, weight, eps)

    def with_symmetric_memory(self, device: torch.device, dtype: torch.dtype, max_rows: int, hidden: int,
                              fusion: str = "barrier") -> TensorParallel:
        """This group with the symmetric-memory all-reduce for [max_rows, hidden] messages (capped
        at TWO_SHOT_MAX_BYTES) and, unless `fusion` is "off", the fused all-reduce + RMSNorm
        (EngineConfig.all_reduce_norm_fusion) for partial sums up to FUSED_MAX_BYTES (less beyond
        2 ranks: each rank reads every peer's), with "push" up to PUSH_MAX_ROWS rows.
        Collective: every rank calls it. Falls back to NCCL alone, with a warning, where the
        GPUs cannot map each other's memory."""
        row_bytes = hidden * dtype.itemsize
        max_bytes = max_rows * row_bytes
        fused = min(max_bytes, FUSED_MAX_BYTES // (self.size - 1)) if fusion != "off" else 0
        push = min(fused, min(max_rows, PUSH_MAX_ROWS) * row_bytes) if fusion == "push" else 0
        try:
            symmetric = SymmetricAllReduce(self.group, device, dtype, min(max_bytes, TWO_SHOT_MAX_BYTES), fused,
                                           push)
        except Exception as e:  # noqa: BLE001 - a missing P2P path: NCCL still works
            warnings.warn(f"tensor parallel: symmetric-memory all-reduce unavailable, using NCCL only ({e})",
                          RuntimeWarning, stacklevel=2)
            return self
        return replace(self, symmetric=symmetric)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[world, *x.shape]: every rank's x, in rank order."""
        if self.size == 1:
            return x.unsqueeze(0)
        out = torch.empty((self.size, *x.shape), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x.contiguous(), group=self.group)
        return out

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
    single_host: bool = False  # every rank on this host: gloo listens on loopback (see gloo_interface)

    @property
    def timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout_s)


def backend_for(device: torch.device) -> str:
    # gloo beside NCCL so that CPU objects (the torchrun control address) can be broadcast too
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def open_store(world_size: int, timeout_s: float, host: str = "127.0.0.1") -> dist.TCPStore:
    """The driver's rendezvous store on a port the OS picks (read it back from `.port`),
    listening on `host` only. torch's TCPStore binds every interface when it makes its own
    socket (whatever the host), so it gets one already bound here. The store has no
    authentication: on loopback only processes of this host can reach it."""
    family, kind, proto, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.bind(address)
        sock.listen(max(world_size, 16))
        store = dist.TCPStore(host, sock.getsockname()[1], world_size, is_master=True,
                              timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False,
                              master_listen_fd=sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store's server owns the descriptor now and closes it
    return store


def init_tensor_parallel(rdzv: Rendezvous, rank: int, store: dist.Store | None = None) -> TensorParallel:
    """Join the default process group as `rank` and return the shard's view of it."""
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized in this process: "
                           "one tensor-parallel engine per process")
    with gloo_interface(loopback_interface() if rdzv.single_host else None):
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


GLOO_IFNAME_ENV = "GLOO_SOCKET_IFNAME"


@contextlib.contextmanager
def gloo_interface(interface: str | None) -> Iterator[None]:
    """gloo listens on the address this host's name resolves to (often its network address)
    unless GLOO_SOCKET_IFNAME names an interface, and reads that variable only while a group is
    made: set it to `interface` for that call alone. A value the user set wins; None: no change."""
    if interface is None or os.environ.get(GLOO_IFNAME_ENV):
        yield
        return
    os.environ[GLOO_IFNAME_ENV] = interface
    try:
        yield
    finally:
        os.environ.pop(GLOO_IFNAME_ENV, None)


def loopback_interface() -> str | None:
    """The loopback interface's name ("lo" on Linux, "lo0" on macOS); None if none is found."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


ABORT_WAIT_S = 10.0  # how long a failed rank waits for its NCCL communicators to abort


def close_tensor_parallel(abort: bool = False) -> None:
    """Leave the process group. `abort` (NCCL only) first aborts the communicators, which also
    unblocks kernels stuck in a collective with a dead peer; that runs on a daemon thread for at
    most ABORT_WAIT_S, since aborting a communicator that live CUDA graphs captured can block."""
    if not dist.is_initialized():
        return
    if not abort or dist.get_backend() == "gloo":
        dist.destroy_process_group()
        return
    done = threading.Event()

    def abort_and_destroy() -> None:
        try:
            # the NCCL backend directly: the composite group's abort would also reach gloo
            dist.group.WORLD._get_backend(torch.device("cuda")).abort()
        except Exception:  # noqa: BLE001 - already aborted (the watchdog) or no NCCL backend
            pass
        dist.destroy_process_group()
        done.set()

    threading.Thread(target=abort_and_destroy, name="tp-nccl-abort", daemon=True).start()
    if not done.wait(ABORT_WAIT_S):
        warnings.warn(f"tensor parallel: the NCCL group did not abort within {ABORT_WAIT_S:.0f} s; "
                      "this process's GPU streams may stay blocked (restart it to use the GPUs again)",
                      RuntimeWarning, stacklevel=2)


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
