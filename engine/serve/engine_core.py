"""The engine core process: the LLMEngine's step loop and nothing else.

    API server(s) --[list of AddRequest/AbortRequest]--> core   (drained between steps)
    API server(s) <--[one CoreOutput per step]----------- core   (each gets its own requests)

The core adds requests as token ids with `detokenize=False` and no stop strings; API processes
tokenize, detokenize and match stop strings (output_processor.py), so a step costs the same
however many streams are open and however long their text is. While the engine has work the
core steps, draining every pending input message before each step; when idle it blocks on its
connections (no CPU). After a step each API process gets one message with all of its requests'
token deltas, acceptances, rejections (a 400) and the gauges for /metrics; an API process with
nothing new still gets the gauges every `SNAPSHOT_EVERY_S` and when the engine goes idle.

IPC: `multiprocessing.connection` (a Unix socket pair per API process, pickle). Measured on the
dev machine (2 cores, 2026-12-01) a round trip of a 256-delta step message took 114 us over a
Pipe with pickle vs 140 us over pyzmq PAIR (ipc://) with msgpack; pickle and msgpack cost the
same to encode+decode it (75 vs 83 us). The stdlib needs no dependency (the GPU image has no
pyzmq), and `multiprocessing` passes connections and the listening socket to spawned children.

Lifetime: the core exits when any API connection closes (that API process is gone), on a
`Shutdown` message, or on SIGTERM (also sent by the kernel when its parent dies, Linux); it
ignores SIGINT (a Ctrl-C reaches the whole process group: the API side decides). Exiting shuts
the engine down, which stops tensor-parallel workers (they also watch their parent).
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from multiprocessing.connection import Connection, wait

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.serve.core_messages import (
    AbortRequest,
    AddRequest,
    CoreFailed,
    CoreOutput,
    CoreReady,
    Shutdown,
)
from engine.serve.engine_client import EngineSnapshot, StepTotals, engine_snapshot, token_delta

logger = logging.getLogger(__name__)

SNAPSHOT_EVERY_S = 0.25
CORE_PROCESS_NAME = "llmbench-core"  # what ps/top show (/proc/PID/comm)


def run_engine_core(config: EngineConfig, conns: list[Connection], log_level: str = "INFO") -> None:
    """Process entry point (spawn): build the engine, serve `conns` until told to stop."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s engine-core: %(message)s")
    set_parent_death_signal()
    set_process_name(CORE_PROCESS_NAME)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        engine = LLMEngine(config)
    except BaseException as e:  # tell the API side why, then die: it reports the reason
        for conn in conns:
            try:
                conn.send(CoreFailed(f"{type(e).__name__}: {e}"))
            except OSError:
                pass
        raise
    try:
        EngineCore(engine, conns).run()
    finally:
        engine.shutdown()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _prctl(option: int, arg: int | bytes) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, arg) == 0
    except OSError:
        return False


def set_parent_death_signal() -> None:
    """Ask Linux for a SIGTERM when the parent dies, so a SIGKILLed server orphans nothing."""
    if not _prctl(1, signal.SIGTERM):  # PR_SET_PDEATHSIG
        logger.info("no parent-death signal on this OS; relying on the connection EOF")


def set_process_name(name: str) -> None:
    """The name ps/top show for this process (Linux, 15 bytes at most); spawned children
    otherwise all read as `python`."""
    _prctl(15, name.encode()[:15])  # PR_SET_NAME


class EngineCore:
    def __init__(self, engine: LLMEngine, conns: list[Connection]):
        self.engine = engine
        self.conns = conns
        self.owner: dict[str, int] = {}  # request id -> index of the API connection it came from
        self.totals = StepTotals()
        self._last_sent = [0.0] * len(conns)
        self._reset_outbox()

    def _reset_outbox(self) -> None:
        n = len(self.conns)
        self._deltas: list[list] = [[] for _ in range(n)]
        self._accepted: list[list[str]] = [[] for _ in range(n)]
        self._rejected: list[list[tuple[str, str]]] = [[] for _ in range(n)]
        self._failed: list[list[tuple[str, str]]] = [[] for _ in range(n)]

    def run(self) -> None:
        snap = self._snapshot()
        for conn in self.conns:
            conn.send(CoreReady(self.engine.config.max_model_len,
                                self.engine.config.model_config.vocab_size, snap))
        while self._drain(block=not self.engine.has_unfinished_requests()):
            if self.engine.has_unfinished_requests():
                self._step()
            self._send(idle=not self.engine.has_unfinished_requests())

    # ---- input --------------------------------------------------------------------------
    def _drain(self, block: bool) -> bool:
        """Apply every message waiting on any connection; False: time to stop."""
        # busy: one poll per connection (cheaper than building a selector every step)
        ready = wait(self.conns) if block else [c for c in self.conns if c.poll()]
        for conn in ready:
            index = self.conns.index(conn)
            while True:
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    logger.info("API connection %d closed; shutting down", index)
                    return False
                if isinstance(msg, Shutdown):
                    logger.info("shutdown requested by API connection %d", index)
                    return False
                for op in msg:
                    self._apply(op, index)
                if not conn.poll():
                    break
        return True

    def _apply(self, op: AddRequest | AbortRequest, index: int) -> None:
        if isinstance(op, AbortRequest):
            self.engine.abort_request(op.request_id)  # False if unknown or already done
            return
        try:
            self.engine.add_request(op.request_id, op.prompt_token_ids, op.params)
        except ValueError as e:
            self._rejected[index].append((op.request_id, str(e)))
            return
        self.owner[op.request_id] = index
        self._accepted[index].append(op.request_id)

    # ---- stepping -----------------------------------------------------------------------
    def _step(self) -> None:
        try:
            deltas = self.engine.step()
        except Exception as e:
            logger.exception("engine step failed; failing %d requests in flight", len(self.owner))
            self._fail_all(f"engine step failed: {type(e).__name__}: {e}")
            return
        self.totals.add(self.engine.last_step_stats)
        for delta in deltas:
            index = self.owner.get(delta.request_id)
            if index is None:
                continue
            self._deltas[index].append(token_delta(delta))
            if delta.finished:
                del self.owner[delta.request_id]

    def _fail_all(self, message: str) -> None:
        """Every request in flight is aborted (KV freed) and its API process told why."""
        for request_id, index in self.owner.items():
            self.engine.abort_request(request_id)
            self._failed[index].append((request_id, message))
        self.owner.clear()
        try:
            self.engine.step()  # drain the abort deltas it queued (nothing left to schedule)
        except Exception:
            logger.exception("draining aborts after a failed step failed")

    # ---- output -------------------------------------------------------------------------
    def _snapshot(self) -> EngineSnapshot:
        return engine_snapshot(self.engine, self.totals)

    def _send(self, idle: bool) -> None:
        snap, now = self._snapshot(), time.monotonic()
        for index, conn in enumerate(self.conns):
            out = CoreOutput(self._deltas[index], self._accepted[index], self._rejected[index],
                             self._failed[index], snap)
            has_news = out.deltas or out.accepted or out.rejected or out.failed
            if has_news or idle or now - self._last_sent[index] >= SNAPSHOT_EVERY_S:
                try:
                    conn.send(out)
                except OSError:  # that API process is gone: the next drain sees the EOF
                    continue
                self._last_sent[index] = now
        self._reset_outbox()
