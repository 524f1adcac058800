"""Tensor parallelism across processes: the driver (the process that owns the LLMEngine) hosts
rank 0's shard; ranks 1..N-1 are worker processes, each with one shard (engine/tp_worker.py).

Control channel: one `multiprocessing` Connection per worker (a Pipe for spawned workers, an
authenticated TCP connection under torchrun). Each call (`available_kv_blocks`,
`allocate_kv_cache`, a step) is pickled once, sent to every worker, run on rank 0, and then
every worker's answer is awaited, so all ranks run the same calls in the same order. A step
travels as a `StepDelta` against the previous ones (engine/step_delta.py: a sequence's block
table and sampling params once, then only new block ids and changed fields), from which each
worker rebuilds the `SchedulerOutput` that rank 0's runner gets. A step
(`execute_model_async`) returns once launched; its answers are awaited when its result is
taken, which under async scheduling is after the next step has been launched (so up to two
answers per worker are outstanding, read in call order). A failure is seen at the latest when
its step's result is taken. Every rank samples the same ids from the same all-gathered logits
with the same seeded generator, so each fills the next step's placeholder tokens from its own
device copy and only rank 0's ids go to the host. Model tensors move only through
torch.distributed collectives (NCCL on CUDA, gloo on CPU).

Failures: a worker that raises sends its message and exits; its peers' collectives then fail
(gloo) or are aborted by a watcher thread that sees the process end (NCCL). The driver collects
the messages, shuts every rank down and raises one RuntimeError naming each failed rank. Waits
are bounded: answers by `config.dist_timeout_s` with liveness checks, collectives by the same
process-group timeout. Workers die with the driver (pipe EOF, parent-pid watch) and are
terminated at shutdown, on garbage collection and at interpreter exit.

Launch: single host by default (spawned workers, rendezvous on a TCPStore at a free port, or
`config.dist_init_method`). Under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, LOCAL_RANK set) each
rank is a torchrun process running the same script: rank 0 drives, the other ranks serve it
from inside `LLM(...)` and exit when it shuts down.

Exposure: in the spawned launch the rendezvous store and gloo listen on loopback only
(`Rendezvous.store_host`, `distributed.gloo_interface`; a user's `dist_init_method` or
GLOO_SOCKET_IFNAME wins) and the control channel is a pipe. NCCL's bootstrap (GPUs) follows
NCCL_SOCKET_IFNAME ("lo" keeps it on loopback). Under torchrun the control listener binds the
one address the other ranks reach rank 0 at (loopback with --standalone) and authenticates them
with ENGINE_TP_AUTHKEY / ENGINE_TP_AUTHKEY_FILE when set (never sent), else with a random key
sent over the process group (`tp_worker.control_authkey`).
"""

from __future__ import annotations

import ast
import gc
import os
import pickle
import socket
import sys
import warnings
import weakref
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection, Listener
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.config import EngineConfig
from engine.distributed import (
    Rendezvous,
    TensorParallel,
    TorchrunEnv,
    backend_for,
    init_tensor_parallel,
    open_store,
    symmetric_memory_used,
)
from engine.model_runner import PendingSample
from engine.scheduler import SchedulerOutput
from engine.step_delta import StepEncoder
from engine.tp_control import MAIN_GUARD_HINT, WorkerFailure, Workers
from engine.tp_worker import (
    STEP,
    Shard,
    control_authkey,
    serve_torchrun_rank,
    shard_config,
    worker_main,
)

T = TypeVar("T")


class MultiprocExecutor:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.size = config.tensor_parallel_size
        self.timeout_s = config.dist_timeout_s
        self.workers = Workers(self.timeout_s)
        self._shard: list[Shard | None] = [None]  # a box the finalizer can empty
        self._finalizer = weakref.finalize(self, _close, self._shard, self.workers)  # GC, interpreter exit
        self._error: str | None = None
        self.encoder = StepEncoder()  # the workers' StepDecoders mirror its state
        try:
            if dist.is_initialized():  # checked before anything is spawned
                raise RuntimeError("torch.distributed is already initialized in this process: "
                                   "one tensor-parallel engine per process")
            launch = TorchrunEnv.from_environ()
            tp = self._start_spawned() if launch is None else self._start_torchrun(launch)
            self.shard = Shard(shard_config(self.config, tp.rank if launch is None else launch.local_rank), tp)
            self._await_workers("start")
            self.num_kv_blocks = min(self._collective_rpc("available_kv_blocks"))  # every rank must fit it
            self._collective_rpc("allocate_kv_cache", self.num_kv_blocks)
        except BaseException as exc:
            self._fail(exc)

    @property
    def shard(self) -> Shard | None:
        return self._shard[0]

    @shard.setter
    def shard(self, shard: Shard | None) -> None:
        self._shard[0] = shard

    # ---- start-up -----------------------------------------------------------------------
    def _start_spawned(self) -> TensorParallel:
        call_site = unguarded_main_call()
        if call_site is not None:
            raise RuntimeError(f"{call_site} starts a tensor-parallel engine when the script is imported: its "
                               f"worker processes import the script again (multiprocessing's spawn), so each "
                               f"would start one more. {MAIN_GUARD_HINT}")
        device_type = self.config.device_type
        if device_type == "cuda" and torch.cuda.device_count() < self.size:
            raise ValueError(f"tensor_parallel_size={self.size} needs {self.size} CUDA devices on this host, "
                             f"found {torch.cuda.device_count()} (multi-node: launch with torchrun)")
        if device_type == "cuda" and not self.config.disable_custom_all_reduce and symmetric_memory_used():
            warnings.warn("tensor parallel: this process already set up symmetric memory for an earlier "
                          "engine and fresh workers cannot join it again (torch counts rendezvous per "
                          "process); this engine uses NCCL for every all-reduce", RuntimeWarning, stacklevel=3)
            self.config = self.config.with_overrides(disable_custom_all_reduce=True)
        store = None
        rdzv = Rendezvous(self.size, backend_for(self.config.device_for_rank()), self.timeout_s,
                          init_method=self.config.dist_init_method, single_host=True)
        if rdzv.init_method is None:
            store = open_store(self.size, self.timeout_s, rdzv.store_host)
            rdzv = replace(rdzv, store_port=store.port)
        ctx = mp.get_context("spawn")
        for rank in range(1, self.size):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(rank, self.config, rdzv, theirs, os.getpid()),
                               name=f"tp-worker-{rank}", daemon=True)  # daemon: terminated at exit
            proc.start()
            theirs.close()  # so that our death reaches the worker as EOF
            self.workers.add(ours, proc)
        self._await_workers("import")  # all alive before we block in the rendezvous
        tp = init_tensor_parallel(rdzv, 0, store)
        self.workers.owns_group = True
        self.workers.watch_if(rdzv.backend != "gloo")  # NCCL never notices a dead peer by itself
        return tp

    def _start_torchrun(self, env: TorchrunEnv) -> TensorParallel:
        if env.world_size != self.size:
            raise ValueError(f"torchrun WORLD_SIZE={env.world_size} must equal tensor_parallel_size={self.size}")
        rdzv = Rendezvous(self.size, backend_for(self.config.device_for_rank()), self.timeout_s,
                          init_method=self.config.dist_init_method or "env://")
        tp = init_tensor_parallel(rdzv, env.rank)
        self.workers.owns_group = True
        if env.rank != 0:
            serve_torchrun_rank(self.config, tp, env.local_rank)  # never returns
        # the listener binds the one address the workers reach it at (loopback under --standalone)
        env_key = control_authkey()
        authkey = env_key or os.urandom(32)
        with Listener((_reachable_ip(os.environ["MASTER_ADDR"]), 0), authkey=authkey) as listener:
            # a key from the environment never travels; else the random key goes to the ranks
            # over the process group's own connections (see control_authkey)
            dist.broadcast_object_list([listener.address, None if env_key else authkey], src=0)
            conns: dict[int, Connection] = {}
            for _ in range(1, self.size):
                conn = listener.accept()
                conns[conn.recv()] = conn
        for rank in range(1, self.size):
            self.workers.add(conns[rank], None)
        return tp

    # ---- calls on every rank ------------------------------------------------------------
    def _collective_rpc(self, method: str, *args: Any) -> list[Any]:
        """Run `method` on every rank; results in rank order."""
        self._send(method, *args)
        local = self._guarded(getattr(self.shard, method), *args)
        return [local, *self._gather(method)]

    def _send(self, method: str, *args: Any) -> None:
        """Start `method` on every worker (their answers are read by `_gather`, in send order)."""
        self._check_usable()
        payload = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        self._guarded(self.workers.send, payload)

    def _gather(self, what: str) -> list[Any]:
        """The workers' answers to the oldest call not gathered yet, in rank order."""
        self._check_usable()
        return self._guarded(self.workers.gather, what)

    def _check_usable(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the tensor-parallel executor has failed earlier: {self._error}")
        if self.shard is None:
            raise RuntimeError("the tensor-parallel executor is shut down")

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        """Any failure of a call on the ranks shuts every rank down and names the failed ones."""
        try:
            return fn(*args)
        except BaseException as exc:
            self._fail(exc)

    def _await_workers(self, phase: str) -> None:
        self._guarded(self.workers.gather, phase)

    def execute_model(self, out: SchedulerOutput) -> list[int | None]:
        return self.execute_model_async(out).result()

    def execute_model_async(self, out: SchedulerOutput) -> PendingStep:
        """Launch one step on every rank, workers first so that they start at once; the workers'
        answers are read when the result is taken. Results must be taken in launch order (the
        engine's in-flight queue is FIFO), as each worker answers its calls in order."""
        self._check_usable()
        # a failed encode leaves the encoder out of step with the decoders: the executor fails
        delta = self._guarded(self.encoder.encode, out)
        self._send(STEP, delta)  # a worker's step returns once launched
        local = self._guarded(self.shard.execute_model_async, out)
        return PendingStep(self, local)

    # ---- failure and shutdown -----------------------------------------------------------
    def _fail(self, exc: BaseException) -> NoReturn:
        """Shut every rank down, then raise one error naming each failed rank (a worker's own
        message first: the driver's error is usually its consequence)."""
        if self.workers.closed:  # already reported (a nested call) or shut down
            raise exc
        if isinstance(exc, WorkerFailure):
            errors = exc.errors
        else:  # rank 0 failed, perhaps because a worker did (a gloo peer closed): ask them
            errors = {} if isinstance(exc, KeyboardInterrupt) else self.workers.drain_errors()
        self.workers.failed = True
        self.shutdown()
        if not errors or isinstance(exc, KeyboardInterrupt):
            raise exc
        self._error = "; ".join(f"rank {r}: {summary}" for r, (summary, _) in sorted(errors.items()))
        details = "".join(f"\n--- rank {r} ---\n{tb}" for r, (_, tb) in sorted(errors.items()) if tb)
        raise RuntimeError(f"tensor-parallel worker failed: {self._error}{details}") from exc

    def shutdown(self) -> None:
        self._finalizer()  # idempotent: rank 0's shard is freed and Workers.close runs once


def _close(shard_box: list[Shard | None], workers: Workers) -> None:
    """Free rank 0's shard (its CUDA graphs before the NCCL group: destroying a communicator
    that live graphs still use hangs), then stop the workers and leave the group. After a
    failure the group is aborted instead, and nothing waits on the device (a collective may be
    stuck on a dead peer)."""
    shard, shard_box[0] = shard_box[0], None
    try:
        if shard is not None and not workers.failed:
            shard.close()
    finally:
        # the shard's layers hold the process group, some of them in reference cycles: free them
        # now, so the group is destroyed below while the interpreter is alive (destroyed during
        # interpreter teardown, gloo's threads sometimes abort the process)
        shard = None
        gc.collect()
        workers.close()


class PendingStep:
    """A step running on every rank: `result()` waits for the workers' answers (a failure on any
    rank raises there), then gives rank 0's sampled ids."""

    def __init__(self, executor: MultiprocExecutor, local: PendingSample):
        self.executor, self.local = executor, local
        self.ids: list[int | None] | None = None

    def result(self) -> list[int | None]:
        if self.ids is None:  # gather once: a second read would take the next step's answers
            self.executor._gather("execute_model")
            self.ids = self.executor._guarded(self.local.result)
        return self.ids


def unguarded_main_call() -> str | None:
    """"file:line" of the script's top-level statement that is creating this engine if it lies
    outside an `if __name__ == "__main__":` block (spawned workers re-run such code); None when
    the call is guarded or there is no script file (python -c, a notebook)."""
    main = sys.modules.get("__main__")
    file = getattr(main, "__file__", None)
    if not file:
        return None
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_code.co_name == "<module>" and frame.f_globals is vars(main)):
        frame = frame.f_back
    if frame is None:  # not called from the script's top level (a thread, an interactive session)
        return None
    try:
        with open(file, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):  # unreadable: the workers' own error will tell
        return None
    line = frame.f_lineno
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_main_test(node.test):
            if node.body[0].lineno <= line <= (node.body[-1].end_lineno or line):
                return None
    return f"{file}:{line}"


def _is_main_test(test: ast.expr) -> bool:
    """`__name__ == "__main__"`, either way round."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    names = {s.id for s in sides if isinstance(s, ast.Name)}
    consts = {s.value for s in sides if isinstance(s, ast.Constant)}
    return names == {"__name__"} and consts == {"__main__"}


def _reachable_ip(master_addr: str) -> str:
    """This host's address on the interface that routes to the master (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((master_addr, 9))
        return s.getsockname()[0]

