"""The engine core in its own process (engine/serve/engine_core.py, core_client.py), on tiny.

    PYTHONPATH=$PWD python -m pytest -q tests/serve/test_engine_core.py

`python -m engine.serve` as users run it (a subprocess: API process + core process): greedy
tokens over HTTP equal `LLM.generate`'s, stop strings end streams where the in-process engine
ends them, a client disconnect frees KV blocks in the core, killing the core gives clean 5xx
errors and a 503 health, SIGINT/SIGTERM leave no process behind, and N API processes share
one core. Also the CoreClient without HTTP and the API-layer pieces (stream merging, stop
strings, --stream-interval) on their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from engine import LLM, EngineConfig, LLMEngine, SamplingParams
from engine.serve import (
    CoreClient,
    EngineOverloaded,
    RequestRejected,
    ServerThread,
    create_app,
    free_port,
)
from engine.serve.engine_client import RequestStream, TokenDelta
from engine.serve.engine_core import CORE_PROCESS_NAME
from engine.serve.output_processor import OutputProcessor
from engine.tokenizer import build_byte_tokenizer

ROOT = Path(__file__).resolve().parents[2]
# one torch thread per process: two OpenMP threads on a busy 2-core machine stall at barriers
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
START_TIMEOUT_S = 120
PROMPTS = ["The quick brown fox", [72, 105, 33, 32, 7, 9]]
LONG = {"model": "tiny", "prompt": "tell me everything", "max_tokens": 2000, "ignore_eos": True}


# ---- processes --------------------------------------------------------------------------------


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (read from /proc: no psutil needed)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def core_pid(server_pid: int) -> int:
    """The engine core process (it names itself, engine_core.CORE_PROCESS_NAME)."""
    cores = [p for p in descendants(server_pid) if comm(p) == CORE_PROCESS_NAME and alive(p)]
    assert len(cores) == 1, f"engine core processes under {server_pid}: {cores}"
    return cores[0]


class Server:
    def __init__(self, tmp: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "engine.serve", "--port", str(self.port),
               "--log-level", "warning", *args]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"server did not come up:\n{self.log.read_text()}")
            time.sleep(0.1)
        self.children = descendants(self.proc.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> bool:
        """Signal the server; True if it exited cleanly: 0, or killed by that very signal
        (uvicorn re-raises the signal it caught once it has shut down)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s) in (0, -sig)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def wait_gone(pids: set[int], timeout_s: float = 10) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while (left := {p for p in pids if alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture
def start_server(tmp_path):
    """Servers a test starts, killed at its end whatever happened (a failed assertion must not
    leave a server running)."""
    started: list[Server] = []

    def start(*args: str) -> Server:
        started.append(Server(tmp_path, *args))
        return started[-1]

    yield start
    for srv in started:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait(10)
            for pid in srv.children:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("core"), "--max-model-len", "2048")
    children = set(srv.children)
    try:
        assert core_pid(srv.proc.pid) in children
        yield srv
        assert srv.stop(signal.SIGTERM)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
    assert not wait_gone(children), f"SIGTERM left behind: {children}"


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", max_model_len=2048)


def metrics(client: httpx.Client) -> dict[str, float]:
    pairs = (line.rsplit(" ", 1) for line in client.get("/metrics").text.splitlines()
             if line and not line.startswith("#"))
    return {name.removeprefix("llmbench_"): float(value) for name, value in pairs}


def wait_idle(client: httpx.Client, timeout_s: float = 15.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        m = metrics(client)
        if m["num_requests_running"] == m["num_requests_waiting"] == m["kv_blocks_used"] == 0:
            return m
        assert time.monotonic() < deadline, f"not idle after {timeout_s} s: {m}"
        time.sleep(0.05)


def stream_events(client: httpx.Client, body: dict) -> list[dict]:
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        lines = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


# ---- over HTTP, through the core process -------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS, ids=["text", "token-ids"])
def test_greedy_tokens_equal_in_process(http, llm, prompt):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = llm.generate([prompt], params)[0].outputs[0]
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["token_ids"] == expected.token_ids
    assert choice["text"] == expected.text
    events = stream_events(http, body)
    assert [t for e in events for t in e["choices"][0]["token_ids"]] == expected.token_ids
    assert "".join(e["choices"][0]["text"] for e in events) == expected.text
    assert len(events) <= 24  # at most one chunk per step, each with all of the step's tokens
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_models_card_says_how_it_serves(http):
    card = http.get("/v1/models").json()["data"][0]
    assert (card["engine"], card["stream_interval"]) == ("core-process", 1)


def _stop_case(llm) -> tuple[str, str]:
    """A prompt and a stop string its greedy output contains past the first token."""
    prompt = "Once upon a time"
    text = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].outputs[0].text
    stop = next((text[i : i + 2] for i in range(3, len(text) - 2) if text[i : i + 2].strip()), None)
    assert stop, f"greedy text has no usable stop string: {text!r}"
    return prompt, stop


def test_stop_string_matches_in_process(http, llm):
    prompt, stop = _stop_case(llm)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop])
    expected = llm.generate([prompt], params)[0].outputs[0]
    assert expected.finish_reason == "stop"
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 40, "temperature": 0,
            "ignore_eos": True, "stop": [stop]}
    choice = http.post("/v1/completions", json=body).json()["choices"][0]
    assert (choice["text"], choice["token_ids"], choice["finish_reason"]) == (
        expected.text, expected.token_ids, "stop")
    events = stream_events(http, body)
    assert "".join(e["choices"][0]["text"] for e in events) == expected.text
    assert [t for e in events for t in e["choices"][0]["token_ids"]] == expected.token_ids
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    wait_idle(http)  # the API side aborted it in the core: nothing left running


def test_disconnect_frees_blocks_in_the_core(server, http):
    before = wait_idle(http)
    aborts = before.get('request_finished_total{finish_reason="abort"}', 0)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            lines = r.iter_lines()  # kept referenced: a dropped httpx iterator closes the socket
            assert next(lines).startswith("data:")
            deadline = time.monotonic() + 5  # the gauges come with the core's step messages
            while (mid := metrics(http))["kv_blocks_used"] == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert mid["num_requests_running"] == 1 and mid["kv_blocks_used"] > 0, mid
    after = wait_idle(http)
    assert after['request_finished_total{finish_reason="abort"}'] == aborts + 1
    assert after["generation_tokens_total"] - before["generation_tokens_total"] < LONG["max_tokens"]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_core_blocks_instead_of_spinning(server, http):
    steps = wait_idle(http)["engine_steps_total"]
    core = core_pid(server.proc.pid)
    time.sleep(0.2)  # let the last snapshot go out
    before = cpu_seconds(core)
    time.sleep(1.0)
    assert cpu_seconds(core) - before < 0.1  # a spinning loop would burn ~1 s
    assert metrics(http)["engine_steps_total"] == steps


def test_bad_request_is_a_400_across_the_boundary(http):
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": [1, 10**9], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["message"]
    assert http.post("/v1/completions", json={"model": "tiny", "prompt": "ok", "max_tokens": 2}).status_code == 200


# ---- faults and shutdown (servers of their own) -------------------------------------------------


def _running(text: str) -> float:
    line = next(x for x in text.splitlines() if x.startswith("llmbench_num_requests_running "))
    return float(line.split()[1])


def test_core_death_gives_5xx_and_503_health_and_nothing_hangs(start_server):
    srv = start_server()
    children = set(srv.children)

    async def in_flight() -> tuple[list[str], httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as ac:
            whole = asyncio.ensure_future(ac.post("/v1/completions", json=LONG))
            async with ac.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
                lines = []
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    lines.append(line)
                    if len(lines) == 1:  # both requests are in the core: kill it
                        deadline = time.monotonic() + 10
                        while _running((await ac.get("/metrics")).text) < 2:
                            assert time.monotonic() < deadline, "the two requests never ran together"
                            await asyncio.sleep(0.02)
                        os.kill(core_pid(srv.proc.pid), signal.SIGKILL)
            return lines, await whole

    try:
        t0 = time.monotonic()
        lines, response = asyncio.run(asyncio.wait_for(in_flight(), timeout=30))
        assert time.monotonic() - t0 < 20  # LONG alone runs for ~5 s: both ended early
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][5:])["error"]
        assert "engine core process died" in error["message"]
        assert response.status_code == 500, response.text
        assert "engine core process died" in response.json()["error"]["message"]
        with httpx.Client(base_url=srv.url, timeout=10) as client:
            assert client.get("/health").status_code == 503
            r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
    finally:
        assert srv.stop()
    assert not wait_gone(children)


def test_sigint_leaves_no_process_behind(start_server):
    """Stopped while a stream is open: shutdown must not wait for it, and must end the core
    (and anything it started) too. (SIGTERM: the module server's teardown, and the core-death
    and two-API-server tests.)"""
    sig = signal.SIGINT
    srv = start_server()
    children = set(srv.children)
    assert core_pid(srv.proc.pid) in children
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data:")
            assert srv.stop(sig)
    assert not wait_gone(children), f"left behind: {children}"


def test_core_exits_when_the_api_process_is_killed(start_server):
    srv = start_server()
    core = core_pid(srv.proc.pid)
    srv.proc.kill()  # SIGKILL: no shutdown code runs in the API process
    srv.proc.wait(10)
    assert not wait_gone({core}), "the engine core outlived its API process"


def test_two_api_servers_share_one_core(llm, start_server):
    srv = start_server("--api-server-count", "2", "--max-model-len", "2048")
    children = set(srv.children)
    try:
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        expected = [o.outputs[0].token_ids for o in llm.generate([f"p{i}" for i in range(8)], params)]

        async def burst() -> list[list[int]]:
            async def one(i: int) -> list[int]:  # a connection each: spread over both servers
                async with httpx.AsyncClient(base_url=srv.url, timeout=30) as ac:
                    body = {"model": "tiny", "prompt": f"p{i}", "max_tokens": 12, "temperature": 0,
                            "ignore_eos": True}
                    r = await ac.post("/v1/completions", json=body)
                    assert r.status_code == 200, r.text
                    return r.json()["choices"][0]["token_ids"]

            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(8))), timeout=60)

        assert asyncio.run(burst()) == expected
        names = sorted(comm(p) for p in children if comm(p).startswith("llmbench"))
        assert names == sorted([CORE_PROCESS_NAME, "llmbench-api-0", "llmbench-api-1"])
    finally:
        assert srv.stop(signal.SIGINT)
    assert not wait_gone(children), f"left behind: {children}"


def test_cli_server_flags():
    from engine.serve.cli import build_parser, main

    args = build_parser().parse_args(["--stream-interval", "4", "--api-server-count", "2"])
    assert (args.stream_interval, args.api_server_count, args.engine_in_process) == (4, 2, False)
    assert build_parser().parse_args(["--engine-in-process"]).engine_in_process
    for bad in (["--api-server-count", "0"], ["--api-server-count", "2", "--engine-in-process"],
                ["--stream-interval", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(bad)
        assert exc.value.code == 2, bad


# ---- the core client without HTTP -------------------------------------------------------------


def test_core_client_streams_rejects_overloads_and_stops(llm):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompt = [5, 6, 7, 8]
    expected = llm.generate([prompt], params)[0].outputs[0].token_ids

    async def run() -> None:
        client = CoreClient.spawn(EngineConfig(model="tiny", max_model_len=256), max_waiting=1)
        client.start()
        try:
            stream = await client.add_request("a", prompt, params)
            got, last = [], None
            async for delta in stream:
                assert isinstance(delta, TokenDelta)
                got += delta.new_token_ids
                last = delta
            assert got == expected and last.finished and last.finish_reason == "length"
            assert last.num_prompt_tokens == len(prompt)
            with pytest.raises(RequestRejected, match="outside the vocabulary"):
                await client.add_request("bad", [10**9], params)
            first = asyncio.ensure_future(client.add_request("b", prompt, params))
            await asyncio.sleep(0)  # "b" is queued, not started: max_waiting=1 is reached
            with pytest.raises(EngineOverloaded):
                await client.add_request("c", prompt, params)
            stream_b = await first
            stream_b.abort()
            deltas = [d async for d in stream_b]
            assert deltas[-1].finish_reason in ("abort", "length")
            deadline = time.monotonic() + 5
            while client.snapshot.kv_blocks_used and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert client.snapshot.kv_blocks_used == 0 and client.num_unstarted == 0
        finally:
            client.stop()
        assert not client.is_alive and not client.process.is_alive()

    asyncio.run(run())


# ---- API-layer pieces ---------------------------------------------------------------------------


def test_stream_merges_what_queued_up():
    async def run() -> None:
        stream = RequestStream("r", lambda _: None)
        for i, done in ((1, False), (2, False), (3, True)):
            stream.put(TokenDelta("r", [i], done, "length" if done else None, 4, 0))
        merged = [d async for d in stream]
        assert len(merged) == 1 and merged[0].new_token_ids == [1, 2, 3] and merged[0].finished

    asyncio.run(run())


def test_output_processor_cuts_at_the_stop_string_token():
    tok = build_byte_tokenizer()
    ids = tok("hello world, again").input_ids
    out = OutputProcessor(tok, SamplingParams(stop=["o w"], max_tokens=50))
    delta = out.process(TokenDelta("r", ids, False, None, 3, 0))
    assert out.stopped and delta.finished and delta.finish_reason == "stop" and delta.stop_reason == "o w"
    assert delta.new_text == "hell" and delta.new_token_ids == ids[: len("hello w")]


@pytest.fixture(scope="module")
def interval_server():
    eng = LLMEngine(EngineConfig(model="tiny", max_model_len=256))
    with ServerThread(create_app(eng, "tiny", stream_interval=4)) as srv:
        yield srv
    eng.shutdown()


def test_stream_interval_coalesces(interval_server):
    with httpx.Client(base_url=interval_server.url, timeout=30) as client:
        body = {"model": "tiny", "prompt": "abc", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.headers["x-stream-interval"] == "4"
            lines = [line[5:] for line in r.iter_lines() if line.startswith("data:")]
        events = [json.loads(line) for line in lines[:-1]]
        sizes = [len(e["choices"][0]["token_ids"]) for e in events]
        # the first tokens at once (TTFT: not held for 4; more than one when the stream fell behind
        # the engine, as on a loaded machine), then chunks of at least 4, then the rest
        assert sizes[0] < 4 and sum(sizes) == 10, sizes
        assert all(s >= 4 for s in sizes[1:-1]) and len(sizes) <= 4, sizes
        whole = client.post("/v1/completions", json=body).json()["choices"][0]
        assert [t for e in events for t in e["choices"][0]["token_ids"]] == whole["token_ids"]
        assert client.get("/v1/models").json()["data"][0]["stream_interval"] == 4


def test_two_api_servers_all_stop_when_the_core_dies(start_server):
    """With several API processes the supervisor stops them all and exits 1: a load balancer
    or a restart policy sees a dead server, not a half-working one."""
    srv = start_server("--api-server-count", "2")
    children = set(srv.children)
    try:
        # /health answered once one API server ran: the other may still be starting
        want = {CORE_PROCESS_NAME, "llmbench-api-0", "llmbench-api-1"}
        deadline = time.monotonic() + 60
        while not {comm(p) for p in children} >= want:
            assert time.monotonic() < deadline, {p: comm(p) for p in children}
            time.sleep(0.1)
        os.kill(core_pid(srv.proc.pid), signal.SIGKILL)
        assert srv.proc.wait(30) == 1
    finally:
        srv.stop()  # a no-op once it exited
    assert not wait_gone(children), f"left behind: {children}"

