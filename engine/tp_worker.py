"""The rank side of tensor parallelism: a `Shard` (one ModelRunner plus the calls the driver
makes on every rank) and the loop that serves the driver's calls over a control connection.

Ranks 1..N-1 run `worker_main` in spawned processes (single host) or `serve_torchrun_rank`
inside a torchrun-launched process (multi-node). The driver (rank 0) sends each call as a
pickled `(method, args)`; a rank answers `("ok", result)` or `("error", summary, traceback)`
and then exits, so that its peers' collectives fail instead of waiting for it. A step comes as
`execute_step` with a `StepDelta` (engine/step_delta.py): each rank's `StepDecoder` rebuilds the
driver's `SchedulerOutput` from it, so only new sequences and per-step changes travel.

Fault injection for tests: `ENGINE_TP_FAIL_AT=RANK:STEP` makes that rank raise at its STEP-th
step (`execute_step`, `execute_model` or `execute_model_async`; STEP 0: while the shard is being built).
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Client, Connection
from typing import Any

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.distributed import (
    Rendezvous,
    TensorParallel,
    close_tensor_parallel,
    init_tensor_parallel,
)
from engine.model_runner import ModelRunner, PendingSample
from engine.scheduler import SchedulerOutput
from engine.step_delta import StepDecoder, StepDelta

FAIL_ENV = "ENGINE_TP_FAIL_AT"
AUTHKEY_ENV = "ENGINE_TP_AUTHKEY"  # torchrun: the control channel's shared secret (same on every rank)
AUTHKEY_FILE_ENV = "ENGINE_TP_AUTHKEY_FILE"  # or a file holding it
STOP = "stop"
STEP = "execute_step"  # the driver's step call: its answer carries no ids (rank 0's are used)
PARENT_POLL_S = 1.0


def shard_config(config: EngineConfig, local_rank: int) -> EngineConfig:
    """Pin a CUDA rank to its node-local device (ModelRunner would use the global rank)."""
    if config.device_type == "cuda" and config.device in ("auto", "cuda"):
        return config.with_overrides(device=str(config.device_for_rank(local_rank)))
    return config


class Shard:
    """One rank's model shard. The driver calls these methods on every rank in lockstep."""

    def __init__(self, config: EngineConfig, tp: TensorParallel):
        self.fail_at = _injected_failure_step(tp.rank)
        self.rank = tp.rank
        self.steps = 0
        self._maybe_fail()
        self.runner = ModelRunner(config, tp)
        self.decoder = StepDecoder()

    def available_kv_blocks(self) -> int:
        return self.runner.available_kv_blocks()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)

    def execute_step(self, delta: StepDelta) -> None:
        """A worker's step: the driver's SchedulerOutput rebuilt from its delta, launched."""
        self.execute_model_async(self.decoder.decode(delta))

    def execute_model(self, out: SchedulerOutput) -> list[int | None]:
        return self.execute_model_async(out).result()

    def execute_model_async(self, out: SchedulerOutput) -> PendingSample:
        # Every rank samples the same ids (its vocabulary slice, then the ranks' chunk winners, or
        # the all-gathered logits, with the same seeds), so each fills async placeholders from its
        # own copy; only rank 0's ids reach the host (a worker's result is [None] * n, at once).
        self.steps += 1
        self._maybe_fail()
        return self.runner.execute_model_async(out)

    def close(self) -> None:
        self.runner.close()

    def _maybe_fail(self) -> None:
        if self.fail_at == self.steps:
            raise RuntimeError(f"injected failure ({FAIL_ENV}) on rank {self.rank} at step {self.steps}")


def _injected_failure_step(rank: int) -> int | None:
    spec = os.environ.get(FAIL_ENV)
    if not spec:
        return None
    fail_rank, _, step = spec.partition(":")
    return int(step or 0) if int(fail_rank) == rank else None


def serve(conn: Connection, make_shard: Callable[[], Shard]) -> int:
    """Build the shard, then answer the driver's calls until it says stop or goes away.
    Returns the process exit code."""
    try:
        shard = make_shard()
        conn.send(("ok", None))
        while True:
            try:
                method, args = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):  # the driver is gone: nobody to answer
                return 1
            if method == STOP:
                shard.close()  # graphs first: NCCL's destroy waits for graphs that use it
                return 0
            result = getattr(shard, method)(*args)
            conn.send(("ok", None if method == "execute_model" else result))  # rank 0's ids are used
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the driver
        _report(conn, exc)
        return 1


def _report(conn: Connection, exc: BaseException) -> None:
    try:
        conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
    except (OSError, EOFError):
        pass


def worker_main(rank: int, config: EngineConfig, rdzv: Rendezvous, conn: Connection, parent_pid: int) -> None:
    """Entry of a spawned rank (single host)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's; it shuts us down
    _exit_with_parent(parent_pid)
    if config.device_type == "cpu":
        # the ranks share the host's cores: without this, N ranks x all cores oversubscribe them
        torch.set_num_threads(max(1, torch.get_num_threads() // rdzv.world_size))
    conn.send(("ok", None))  # alive and imported: the driver may now join the rendezvous
    code = serve(conn, lambda: Shard(shard_config(config, rank), init_tensor_parallel(rdzv, rank)))
    _leave(conn, code)


def serve_torchrun_rank(config: EngineConfig, tp: TensorParallel, local_rank: int) -> None:
    """A torchrun-launched rank other than 0: connect to the driver's control listener (its
    address, and its key unless the environment gives one, come over the process group), serve
    it, then end the process."""
    box: list[Any] = [None, None]
    dist.broadcast_object_list(box, src=0)
    address, authkey = box
    if authkey is None:
        authkey = control_authkey()
        if authkey is None:
            raise RuntimeError(f"rank 0 takes the tensor-parallel control key from {AUTHKEY_ENV} or "
                               f"{AUTHKEY_FILE_ENV}, which rank {tp.rank} lacks: set it on every rank")
    conn = Client(tuple(address), authkey=authkey)
    conn.send(tp.rank)
    code = serve(conn, lambda: Shard(shard_config(config, local_rank), tp))
    _leave(conn, code)


def control_authkey() -> bytes | None:
    """The torchrun control channel's key from the environment: ENGINE_TP_AUTHKEY (the secret
    itself) or ENGINE_TP_AUTHKEY_FILE (a file holding it); None if neither is set, and rank 0
    then makes a random key and sends it to the other ranks over the process group (the
    connections torch.distributed made between the ranks; clear text on the network between
    nodes). Spawned workers need none of this: their channel is a pipe."""
    secret = os.environ.get(AUTHKEY_ENV)
    path = os.environ.get(AUTHKEY_FILE_ENV)
    if path:
        try:
            with open(path, "rb") as f:
                secret_bytes = f.read().strip()
        except OSError as exc:
            raise RuntimeError(f"{AUTHKEY_FILE_ENV}={path}: cannot read the key ({exc})") from exc
    elif secret:
        secret_bytes = secret.encode()
    else:
        return None
    if len(secret_bytes) < 16:
        raise RuntimeError(f"the tensor-parallel control key ({AUTHKEY_FILE_ENV if path else AUTHKEY_ENV}) "
                           "must be at least 16 bytes")
    return secret_bytes


def _leave(conn: Connection, code: int) -> None:
    conn.close()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        close_tensor_parallel(abort=code != 0)
    finally:
        # os._exit: skip interpreter teardown, which can block on a broken communicator
        os._exit(code)


def _exit_with_parent(parent_pid: int) -> None:
    """Die with the driver even when stuck in a collective (where a pipe EOF goes unseen)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="tp-parent-watch", daemon=True).start()
