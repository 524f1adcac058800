"""No single request can stall the server (issue #23, the HTTP side), on the tiny model.

    PYTHONPATH=$PWD python -m pytest tests/serve/test_server_hardening.py -q

Covers: the prompt-size limit (characters before tokenizing, tokens after) while /health and a
small request keep answering; bounded `stop`; lone UTF-16 surrogates -> 400 naming the field;
slow headers and slow bodies closed within their deadlines; a client that leaves before its
response counts as 499, never 500; strict booleans and integers, `stop: ""`, the Bearer scheme
in any case; an OpenAPI schema that lists the answers the server gives (no 422); a hypothesis
fuzz over every request field with no 5xx. The last test checks the server still serves with
no KV block held. Timing bounds are generous (a loaded 2-core machine): they catch stalls of
seconds, not slowdowns of milliseconds.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import EngineConfig, LLMEngine
from engine.sampling_params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
from engine.serve import ServerThread, create_app, free_port
from engine.serve.tokenizing import CHARS_PER_TOKEN_BOUND

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_MODEL_LEN = 2048
MAX_PROMPT_CHARS = CHARS_PER_TOKEN_BOUND * MAX_MODEL_LEN  # the default the server derives
MAX_BODY = 1 << 20
TIMEOUT_S = 1.0  # the server's header and body deadlines here
STALL_BOUND_S = 1.0  # what /health and a small request must answer within, whatever else runs
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(engine, "tiny", api_key=API_KEY, max_body_bytes=MAX_BODY,
                     body_timeout_s=TIMEOUT_S, header_timeout_s=TIMEOUT_S)
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client


def metrics(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics").text
    pairs = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {name.removeprefix("llmbench_"): float(value) for name, value in pairs}


def responses(client: httpx.Client, path: str, code: int) -> float:
    """HTTP responses by path and code, read with prometheus_client's parser (label order free)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "llmbench_http_responses_total" and sample.labels == {"path": path, "code": str(code)}:
                return sample.value
    return 0.0


def post_raw(client: httpx.Client, path: str, body: dict) -> httpx.Response:
    """JSON as Python writes it: a lone surrogate goes out as the escape "\\ud800"."""
    return client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})


def assert_error(r: httpx.Response, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    return error


def completion(**fields: object) -> dict:
    return {"model": "tiny", "prompt": "Hello", "max_tokens": 2, **fields}


def chat(**fields: object) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            **fields}


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def worst_latency_while(server_url: str, background: Callable[[], None],
                        probes: dict[str, Callable[[httpx.Client], httpx.Response]]
                        ) -> tuple[dict[str, float], list[BaseException]]:
    """Run `background` on a thread; meanwhile call each probe in turn until it ends, each on
    its own client. The worst latency of each probe (all must answer 200) and the thread's
    errors."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            background()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            errors.append(e)

    worst = dict.fromkeys(probes, 0.0)
    thread = threading.Thread(target=run)
    with httpx.Client(base_url=server_url, headers=AUTH, timeout=60) as client:
        thread.start()
        while thread.is_alive():
            for name, probe in probes.items():
                t = time.perf_counter()
                r = probe(client)
                worst[name] = max(worst[name], time.perf_counter() - t)
                assert r.status_code == 200, r.text
            time.sleep(0.02)
        thread.join()
    return worst, errors


SMALL_PROBES: dict[str, Callable[[httpx.Client], httpx.Response]] = {
    "health": lambda c: c.get("/health"),
    "small completion": lambda c: c.post("/v1/completions", json=completion(max_tokens=1)),
}


# ---- 1. prompt size ---------------------------------------------------------------------------


def test_prompt_over_char_limit_is_rejected_before_tokenizing(http):
    r = post_raw(http, "/v1/completions", completion(prompt="a" * (MAX_PROMPT_CHARS + 1)))
    error = assert_error(r, 400, "prompt")
    assert error["code"] == "context_length_exceeded"
    assert str(MAX_PROMPT_CHARS) in error["message"] and "characters" in error["message"]
    parts = [{"type": "text", "text": "a" * (MAX_PROMPT_CHARS // 2 + 1)}] * 2
    r = post_raw(http, "/v1/chat/completions", chat(messages=[{"role": "user", "content": parts}]))
    assert "characters" in assert_error(r, 400, "messages")["message"]


def test_prompt_within_char_limit_still_gets_the_token_check(http):
    # the byte tokenizer: one token per character, so this fits the character bound only
    r = post_raw(http, "/v1/completions", completion(prompt="a" * MAX_MODEL_LEN))
    error = assert_error(r, 400, "prompt")
    assert "tokens" in error["message"] and error["code"] == "context_length_exceeded"
    assert http.post("/v1/completions", json=completion(prompt="a" * 100)).status_code == 200


def test_maximal_prompts_do_not_stall_health_or_small_requests(server, http):
    at_limit = json.dumps(completion(prompt="b" * MAX_PROMPT_CHARS))  # tokenized, then too long
    at_body_limit = json.dumps(completion(prompt="c" * (MAX_BODY - 100)))  # rejected unread
    chat_at_limit = json.dumps(chat(messages=[{"role": "user", "content": "d" * MAX_PROMPT_CHARS}]))
    headers = {**AUTH, "Content-Type": "application/json"}

    def big_requests() -> None:
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
            for _ in range(3):
                for path, body in (("/v1/completions", at_limit), ("/v1/completions", at_body_limit),
                                   ("/v1/chat/completions", chat_at_limit)):
                    r = client.post(path, content=body)
                    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"

    worst, errors = worst_latency_while(server.url, big_requests, SMALL_PROBES)
    assert not errors, errors
    assert max(worst.values()) < STALL_BOUND_S, worst


@pytest.fixture
def long_prompt_server():
    """Its own engine and app, taking prompts long enough to keep a tokenizer busy for
    seconds (as a long-context model's limit does)."""
    eng = LLMEngine(EngineConfig(model="tiny", max_model_len=MAX_MODEL_LEN))
    try:
        with ServerThread(create_app(eng, "tiny", api_key=API_KEY, max_prompt_chars=4 << 20,
                                     max_body_bytes=8 << 20)) as srv:
            yield srv
    finally:
        eng.shutdown()


def test_small_requests_do_not_wait_for_a_long_prompts_tokenization(long_prompt_server):
    url = long_prompt_server.url
    long_prompt = json.dumps(completion(prompt="e" * (2 << 20)))  # ~seconds to tokenize
    big_latency: list[float] = []

    def big_request() -> None:
        with httpx.Client(base_url=url, headers={**AUTH, "Content-Type": "application/json"},
                          timeout=120) as client:
            t = time.perf_counter()
            r = client.post("/v1/completions", content=long_prompt)
            big_latency.append(time.perf_counter() - t)
            assert "tokens" in assert_error(r, 400, "prompt")["message"]

    worst, errors = worst_latency_while(url, big_request, SMALL_PROBES)
    assert not errors, errors
    assert max(worst.values()) < STALL_BOUND_S, (worst, big_latency)


# ---- 2. stop ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [
    [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)],
    "x" * (MAX_STOP_STRING_CHARS + 1),
    ["ok", "x" * (MAX_STOP_STRING_CHARS + 1)],
    "",
    [""],
    ["ok", 5],
])
def test_stop_out_of_bounds_is_400_naming_stop(http, stop):
    assert_error(post_raw(http, "/v1/completions", completion(stop=stop)), 400, "stop")
    assert_error(post_raw(http, "/v1/chat/completions", chat(stop=stop)), 400, "stop")


def test_maximal_stop_list_is_accepted_and_cheap(server, http):
    """A request with the largest stop list slows a concurrent request by less than 2x,
    compared with the same concurrent request without stop strings."""
    never = [chr(0x4E00 + i) * MAX_STOP_STRING_CHARS for i in range(MAX_STOP_STRINGS)]
    long = completion(prompt="stop strings", max_tokens=2000, ignore_eos=True, temperature=0,
                      stream=True)
    probe = completion(prompt="probe", max_tokens=32, ignore_eos=True, temperature=0)

    def probe_latency(background: dict) -> float:
        """The probe's latency while `background` streams (closed after: aborted)."""
        times: list[float] = []
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as side, \
                side.stream("POST", "/v1/completions", json=background) as stream:
            assert stream.status_code == 200
            chunks = stream.iter_bytes()
            next(chunks)  # it runs
            for _ in range(3):
                times.append(timed(lambda: http.post("/v1/completions", json=probe)))
            next(chunks)  # and still runs: it was generating during every probe
        return min(times)  # min: the least disturbed by whatever else the machine runs

    # interleaved, so drift in the machine's load hits both sides alike
    plain, stopped = [], []
    for _ in range(2):
        plain.append(probe_latency(long))
        stopped.append(probe_latency(long | {"stop": never}))
    r = http.post("/v1/completions", json=completion(stop=never, max_tokens=4))
    assert r.status_code == 200, r.text
    assert min(stopped) < 2 * min(plain) + 0.1, (plain, stopped)


# ---- 3. lone surrogates -----------------------------------------------------------------------


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", completion(prompt="\ud800"), "prompt"),
    ("/v1/completions", completion(prompt=["ok \udfff"]), "prompt"),
    ("/v1/completions", completion(stop=["\ud800"]), "stop"),
    ("/v1/completions", completion(stop="a\udc00"), "stop"),
    ("/v1/completions", completion(model="tiny\ud800"), "model"),
    ("/v1/completions", completion(user="\ud800"), "user"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "\ud800"}]), "messages"),
    ("/v1/chat/completions",
     chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x\udbff"}]}]), "messages"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "hi", "name": "\ud800"}]),
     "messages"),
    ("/v1/chat/completions", chat(stop="\ud800"), "stop"),
])
def test_lone_surrogate_is_400_naming_the_field(http, path, body, param):
    error = assert_error(post_raw(http, path, body), 400, param)
    assert "Unicode" in error["message"] or "surrogate" in error["message"]


# ---- 4. slow headers and bodies ---------------------------------------------------------------


def closed_within(sock: socket.socket, bound_s: float, trickle: bytes = b"") -> tuple[float, bytes]:
    """Send `trickle` one byte every 0.1 s (never finishing the request) until the server
    closes the connection; (seconds until it did, what it answered)."""
    t0, answer = time.monotonic(), b""
    sock.settimeout(0.1)
    sent = 0
    while time.monotonic() - t0 < bound_s:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            data = None
        except ConnectionResetError:
            return time.monotonic() - t0, answer
        if data == b"":
            return time.monotonic() - t0, answer
        if data:
            answer += data
        elif sent < len(trickle):
            sock.sendall(trickle[sent:sent + 1])
            sent += 1
    raise AssertionError(f"connection still open after {bound_s} s (answered {answer[:200]!r})")


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-key\r\n"


def test_connection_without_headers_is_closed(server):
    with connect(server.url) as idle, connect(server.url) as slow:
        elapsed, _ = closed_within(idle, TIMEOUT_S + 4)
        assert elapsed >= TIMEOUT_S * 0.9
        # trickling header bytes does not extend the deadline
        elapsed, _ = closed_within(slow, TIMEOUT_S + 4, trickle=HEAD + b"X-Slow: " + b"a" * 200)
        assert elapsed < TIMEOUT_S + 4


def test_keep_alive_connection_with_slow_next_request_is_closed(server):
    body = json.dumps(completion(max_tokens=1)).encode()
    request = HEAD + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    with connect(server.url) as sock:
        sock.sendall(request)
        _, answer = closed_within(sock, TIMEOUT_S + 4, trickle=b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 200)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def test_slow_body_gets_408_and_is_closed(server, http):
    before = responses(http, "/v1/completions", 408)
    with connect(server.url) as sock:
        sock.sendall(HEAD + b"Content-Type: application/json\r\nContent-Length: 400\r\n\r\n{")
        _, answer = closed_within(sock, TIMEOUT_S + 4, trickle=b" " * 300)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_timeout" in answer
    assert responses(http, "/v1/completions", 408) == before + 1


# ---- 5. clients that leave are not 500s -------------------------------------------------------


def test_partial_body_then_close_counts_499_not_500(server, http):
    before_500 = responses(http, "/v1/completions", 500)
    before_499 = responses(http, "/v1/completions", 499)
    for _ in range(3):
        with connect(server.url) as sock:
            sock.sendall(HEAD + b"Content-Length: 1000\r\n\r\n{\"model\": ")
            time.sleep(0.1)
    deadline = time.monotonic() + 10
    while responses(http, "/v1/completions", 499) < before_499 + 3:
        assert time.monotonic() < deadline, metrics(http)
        time.sleep(0.05)
    assert responses(http, "/v1/completions", 500) == before_500


def test_non_stream_disconnect_counts_499(server, http):
    before = {code: responses(http, "/v1/completions", code) for code in (499, 500, 503)}
    body = json.dumps(completion(max_tokens=2000, ignore_eos=True)).encode()
    with connect(server.url) as sock:
        sock.sendall(HEAD + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                     + body)
        time.sleep(0.5)
    deadline = time.monotonic() + 20
    while responses(http, "/v1/completions", 499) < before[499] + 1:
        assert time.monotonic() < deadline, metrics(http)
        time.sleep(0.05)
    assert responses(http, "/v1/completions", 500) == before[500]
    assert responses(http, "/v1/completions", 503) == before[503]


# ---- 6. strict validation, Bearer scheme ------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", True), ("max_tokens", 2.0), ("max_tokens", "2"), ("stream", "yes"),
    ("stream", 1), ("ignore_eos", "true"), ("temperature", "0.5"), ("temperature", True),
    ("top_k", False), ("seed", "1"), ("stop_token_ids", [True]), ("n", True), ("min_tokens", 1.0),
])
def test_strict_types(http, field, value):
    assert_error(post_raw(http, "/v1/completions", completion(**{field: value})), 400, field)
    assert_error(post_raw(http, "/v1/chat/completions", chat(**{field: value})), 400, field)


def test_strict_nested_and_chat_fields(http):
    r = post_raw(http, "/v1/chat/completions", chat(stream=True, stream_options={"include_usage": 1}))
    assert_error(r, 400, "stream_options")
    assert_error(post_raw(http, "/v1/chat/completions", chat(max_completion_tokens=False)), 400,
                 "max_completion_tokens")
    assert_error(post_raw(http, "/v1/completions", completion(prompt=[1, True])), 400, "prompt")


def test_floats_take_integers(http):
    r = http.post("/v1/completions", json=completion(temperature=0, top_p=1))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_bearer_scheme_is_case_insensitive(server, scheme):
    r = httpx.post(server.url + "/v1/completions", json=completion(max_tokens=1),
                   headers={"Authorization": f"{scheme} {API_KEY}"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("header", [f"Basic {API_KEY}", f"Bearer {API_KEY}x", "Bearer", API_KEY,
                                    f"Bearer{API_KEY}"])
def test_wrong_authorization_is_401(server, header):
    r = httpx.post(server.url + "/v1/completions", json=completion(max_tokens=1),
                   headers={"Authorization": header})
    assert r.status_code == 401, r.text


# ---- 7. OpenAPI -------------------------------------------------------------------------------


def test_openapi_documents_the_answers_given(http):
    schema = http.get("/openapi.json").json()
    assert "422" not in json.dumps(schema)
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    error_ref = "#/components/schemas/ErrorResponse"
    for path in ("/v1/completions", "/v1/chat/completions"):
        answers = schema["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "404", "413", "429", "503"} <= set(answers), answers
        assert answers["400"]["content"]["application/json"]["schema"]["$ref"] == error_ref
    assert "503" in schema["paths"]["/health"]["get"]["responses"]
    error = schema["components"]["schemas"]["ErrorObject"]
    assert set(error["properties"]) == {"message", "type", "param", "code"}
    # what the schema promises is what a 400 carries
    body = post_raw(http, "/v1/completions", completion(max_tokens=True)).json()
    assert set(body) == {"error"} and set(body["error"]) == set(error["properties"])


# ---- fuzz: arbitrary JSON in every field ------------------------------------------------------

SURROGATES = st.sampled_from(["\ud800", "\udfff", "a\udc00b", "\udbff\ud800"])
TEXT = st.one_of(st.text(max_size=20), SURROGATES)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), TEXT,
                   st.integers(min_value=-3, max_value=40))
JSON = st.recursive(SCALAR, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)), max_leaves=12)

COMPLETION_FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed",
                     "stop", "stop_token_ids", "min_tokens", "ignore_eos", "stream",
                     "stream_options", "user", "n", "presence_penalty", "frequency_penalty",
                     "logit_bias", "echo", "best_of", "logprobs", "suffix"]
CHAT_FIELDS = [f for f in COMPLETION_FIELDS if f not in ("prompt", "echo", "best_of", "suffix")] + [
    "messages", "max_completion_tokens", "top_logprobs", "tools", "response_format"]
MESSAGE_FIELDS = ["role", "content", "name"]


@st.composite
def fuzz_case(draw: st.DrawFn) -> tuple[str, dict]:
    if draw(st.booleans()):
        path, body, fields = "/v1/completions", completion(), COMPLETION_FIELDS
    else:
        path, body, fields = "/v1/chat/completions", chat(), CHAT_FIELDS
        if draw(st.booleans()):
            message = {"role": "user", "content": "Hi"}
            for name in draw(st.lists(st.sampled_from(MESSAGE_FIELDS), min_size=1, max_size=2)):
                message[name] = draw(JSON)
            body["messages"] = [message]
    for name in draw(st.lists(st.sampled_from(fields), max_size=3)):
        body[name] = draw(JSON)
    body.setdefault("max_tokens", 2)
    return path, body


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=fuzz_case())
def test_fuzz_every_field_finds_no_5xx(http, case):
    path, body = case
    r = post_raw(http, path, body)
    assert r.status_code < 500, (body, r.text)
    if r.status_code != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


# ---- the real server process ------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[str]:
    """`python -m engine.serve` with the hardening flags (engine core in its own process)."""
    port, log = free_port(), tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [sys.executable, "-m", "engine.serve", "--port", str(port), "--log-level", "warning",
           "--max-model-len", "512", "--max-prompt-chars", "3000", "--header-timeout", "1",
           "--body-timeout", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_served_flags_bound_prompts_and_slow_clients(served):
    r = httpx.post(served + "/v1/completions", json=completion(prompt="a" * 3001))
    error = assert_error(r, 400, "prompt")
    assert "3000" in error["message"]
    r = httpx.post(served + "/v1/completions", json=completion(prompt="a" * 3000))
    assert "tokens" in assert_error(r, 400, "prompt")["message"]  # past the char check
    with connect(served) as slow_head, connect(served) as slow_body:
        slow_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99\r\n\r\n{")
        _, answer = closed_within(slow_body, 5, trickle=b" " * 50)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        closed_within(slow_head, 5, trickle=HEAD)


def test_served_maximal_prompts_do_not_stall(served):
    at_limit = json.dumps(completion(prompt="b" * 3000))
    huge = json.dumps(completion(prompt="c" * (4 << 20)))  # within the 8 MB default body limit

    def big_requests() -> None:
        with httpx.Client(base_url=served, timeout=60,
                          headers={"Content-Type": "application/json"}) as client:
            for body in (at_limit, huge, at_limit, huge):
                t = time.perf_counter()
                assert client.post("/v1/completions", content=body).status_code == 400
                big_latency.append(time.perf_counter() - t)

    big_latency: list[float] = []

    worst, errors = worst_latency_while(served, big_requests, SMALL_PROBES)
    assert not errors, errors
    assert max(worst.values()) < STALL_BOUND_S, worst
    # refused before tokenizing: 4 MB of prompt costs parsing, not seconds of tokenizer time
    assert max(big_latency) < 5, big_latency


# ---- after everything -------------------------------------------------------------------------


def test_zz_server_still_serves_and_holds_no_blocks(http):
    deadline = time.monotonic() + 20
    while (m := metrics(http))["kv_blocks_used"] or m["num_requests_running"] or m["num_requests_waiting"]:
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    r = http.post("/v1/chat/completions", json=chat(max_tokens=3))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    assert metrics(http)["kv_blocks_used"] == 0
