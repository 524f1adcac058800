"""The driver's side of the tensor-parallel control channel: one Connection per worker rank,
bounded waits that also watch each worker's liveness, and the shutdown that leaves no process
behind. Holds no reference to the executor, so `weakref.finalize` can close it on GC and exit."""

from __future__ import annotations

import pickle
import threading
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import torch.multiprocessing as mp

from engine.distributed import close_tensor_parallel
from engine.tp_worker import STOP

ERROR_GRACE_S = 5.0  # after one rank fails, how long the others get to report
JOIN_S = 5.0  # a stopped worker's time to exit before it is terminated
FAILED_JOIN_S = 0.5  # the same after a failure (it may be stuck in a collective)

Errors = dict[int, tuple[str, str]]  # rank -> (summary, traceback)
MAIN_GUARD_HINT = ('A script that uses tensor parallelism must create the engine under `if __name__ == "__main__":` '
                   "(see the multiprocessing docs, 'Safe importing of main module').")


class WorkerFailure(RuntimeError):
    def __init__(self, errors: Errors):
        super().__init__("; ".join(f"rank {r}: {s}" for r, (s, _) in sorted(errors.items())))
        self.errors = errors


class Workers:
    """Ranks 1..N-1 as seen from the driver. `procs[i]` is None for ranks we did not spawn."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.conns: list[Connection] = []
        self.procs: list[BaseProcess | None] = []
        # calls sent to each worker whose answers are not read yet: under async scheduling a
        # step's answer is read only after the next step is sent, so two may be outstanding
        self.unanswered: list[int] = []
        self.owns_group = False  # this process joined a torch.distributed group to leave at close
        self.failed = False
        self.closed = False
        self._lock = threading.Lock()
        self._wake: Connection | None = None

    def add(self, conn: Connection, proc: BaseProcess | None) -> None:
        self.conns.append(conn)
        self.procs.append(proc)
        self.unanswered.append(0)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None and p.pid is not None]

    def send(self, payload: bytes) -> None:
        for i, conn in enumerate(self.conns):
            conn.send_bytes(payload)
            self.unanswered[i] += 1

    def gather(self, what: str) -> list[Any]:
        """Every worker's oldest unread answer, in rank order; WorkerFailure if any failed.
        Answers come in call order, so gathers must follow the order of the sends."""
        results, errors = self._collect(time.monotonic() + self.timeout_s, what)
        if errors:
            raise WorkerFailure(errors)
        return results

    def drain_errors(self) -> Errors:
        """After rank 0 failed: the messages that workers send within the grace period. Answers
        to earlier calls still unread (an async step's) are skipped: the error comes after them."""
        return self._collect(time.monotonic() + ERROR_GRACE_S, "the failed call", drain=True)[1]

    def _collect(self, deadline: float, what: str, drain: bool = False) -> tuple[list[Any], Errors]:
        results, errors = [], {}
        for rank in range(1, len(self.conns) + 1):
            status, *rest = self._answer(rank, deadline, what)
            while drain and status == "ok" and self.unanswered[rank - 1] > 0:
                status, *rest = self._answer(rank, deadline, what)
            if status == "ok":
                results.append(rest[0])
            else:
                errors[rank] = (rest[0], rest[1])
                # the others are probably stuck in a collective with the failed rank
                deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)
        return results, errors

    def _answer(self, rank: int, deadline: float, what: str) -> tuple:
        conn, proc = self.conns[rank - 1], self.procs[rank - 1]
        ready = wait([conn] + ([proc.sentinel] if proc is not None else []), max(0.0, deadline - time.monotonic()))
        if not ready:
            return ("error", f"no answer to {what} within the time allowed (timeout {self.timeout_s:.0f} s)", "")
        if conn.poll():  # a message sent just before exiting is still there to read
            try:
                answer = conn.recv()
            except (EOFError, OSError):
                pass
            else:
                # start-up messages answer no call: the count stays at 0
                self.unanswered[rank - 1] = max(0, self.unanswered[rank - 1] - 1)
                return answer
        if proc is not None:
            proc.join(1.0)
        code = proc.exitcode if proc is not None else None
        if what == "import":  # died before our code ran in it: while importing the main module
            return ("error", f"exited (exit code {code}) while starting, before it could report (its error is "
                             f"on stderr). {MAIN_GUARD_HINT}", "")
        return ("error", f"exited (exit code {code}) during {what} without a message", "")

    # ---- liveness and shutdown ----------------------------------------------------------
    def watch_if(self, enabled: bool) -> None:
        """On NCCL a dead peer leaves our collectives waiting forever: a thread aborts the group
        when a worker ends unexpectedly, so rank 0's step returns and the failure is reported."""
        sentinels = [p.sentinel for p in self.procs if p is not None]
        if not enabled or not sentinels:
            return
        wake_r, self._wake = mp.Pipe(duplex=False)
        threading.Thread(target=self._watch, args=(sentinels, wake_r), name="tp-worker-watch", daemon=True).start()

    def _watch(self, sentinels: list[int], wake: Connection) -> None:
        wait([*sentinels, wake])
        with self._lock:
            if not self.closed:
                self.failed = True
                close_tensor_parallel(abort=True)
                self.owns_group = False

    def close(self) -> None:
        """Stop the workers, leave the process group, and make sure every worker has ended."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self._wake is not None:
                self._wake.close()
            stop = pickle.dumps((STOP, ()))
            for conn in self.conns:
                try:
                    conn.send_bytes(stop)
                except OSError:
                    pass
            if self.owns_group:  # also unblocks workers stuck in a collective with us
                close_tensor_parallel(abort=self.failed)
        self._reap()
        for conn in self.conns:
            conn.close()

    def _reap(self) -> None:
        procs = [p for p in self.procs if p is not None]
        grace = FAILED_JOIN_S if self.failed else JOIN_S  # after a failure their state is moot
        for proc in procs:
            proc.join(grace)
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(1.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
