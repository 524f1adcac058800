"""The OpenAI-compatible shim (engine/serve/) on the tiny model, over real loopback sockets.

    .venv/bin/python -m pytest tests/test_serve.py -q

Covers: the official `openai` client (completions and chat, streaming and not, usage equal to
the tokens returned), every bad input -> its 4xx with an OpenAI error object and the server
still serving, client disconnects freeing KV blocks, overload -> clear 429s with nothing lost,
and a bounded hypothesis fuzz that must find no 5xx.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import EngineConfig
from engine.serve import ServerThread, create_app
from engine.serve.chat import default_chat_prompt
from engine.serve.protocol import ChatMessage

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_MODEL_LEN = 2048
MAX_BODY = 64 << 10


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(engine, "tiny", api_key=API_KEY, max_body_bytes=MAX_BODY)
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=30) as client:
        yield client


def metrics(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics").text
    pairs = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {name.removeprefix("llmbench_"): float(value) for name, value in pairs}


def wait_idle(client: httpx.Client, timeout_s: float = 10.0) -> dict[str, float]:
    """Poll /metrics until nothing runs, waits or holds KV blocks; bounded."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = metrics(client)
        if (
            m["num_requests_running"] == m["num_requests_waiting"] == m["kv_blocks_used"] == 0
            and m["num_requests_unstarted"] == 0
        ):
            return m
        assert time.monotonic() < deadline, f"server not idle after {timeout_s} s: {m}"
        time.sleep(0.05)


def assert_serving(http: httpx.Client) -> None:
    r = http.post(
        "/v1/completions",
        json={"model": "tiny", "prompt": "ok", "max_tokens": 2, "ignore_eos": True},
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return err


# ---- the official client ---------------------------------------------------------------------


def test_completion_usage_matches_tokens(oai, engine):
    prompt = "The harness counts tokens."
    r = oai.completions.create(
        model="tiny", prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    ids = r.choices[0].model_extra["token_ids"]
    assert r.usage.completion_tokens == len(ids) == 12
    assert r.usage.prompt_tokens == len(engine.tokenizer(prompt).input_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert r.choices[0].text == engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert r.choices[0].finish_reason == "length"


def test_completion_stream_matches_non_stream(oai):
    kwargs = dict(
        model="tiny",
        prompt=[72, 105, 33, 32],
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    whole = oai.completions.create(**kwargs)
    chunks = list(
        oai.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    token_chunks = [c for c in chunks if c.choices]
    assert [
        t for c in token_chunks for t in c.choices[0].model_extra["token_ids"]
    ] == whole.choices[0].model_extra["token_ids"]
    # one chunk per engine step, each with all of that step's tokens (one here: plain decode),
    # fewer if the stream fell behind and merged what queued up
    assert 1 <= len(token_chunks) <= 10
    assert "".join(c.choices[0].text for c in token_chunks) == whole.choices[0].text
    assert token_chunks[-1].choices[0].finish_reason == "length"
    usage = chunks[-1].usage  # the final chunk: no choices, only usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 10 and usage.prompt_tokens == 4


def test_chat_non_stream_and_stream(oai, engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = oai.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    expected_prompt = default_chat_prompt([ChatMessage(**m) for m in messages])
    assert r.usage.prompt_tokens == len(engine.tokenizer(expected_prompt).input_ids)
    assert r.usage.completion_tokens == len(r.choices[0].model_extra["token_ids"]) == 6
    assert r.choices[0].message.role == "assistant"
    chunks = list(
        oai.chat.completions.create(
            model="tiny",
            messages=messages,
            max_completion_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    token_chunks = [c for c in chunks if c.choices]
    assert token_chunks[0].choices[0].delta.role == "assistant"  # role rides on the first token
    assert "".join(c.choices[0].delta.content for c in token_chunks) == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 6 >= len(token_chunks)
    assert sum(len(c.choices[0].model_extra["token_ids"]) for c in token_chunks) == 6


def test_models_health_metrics(http, oai):
    assert [m.id for m in oai.models.list()] == ["tiny"]
    assert http.get("/health").json() == {"status": "ok"}
    assert_serving(http)
    m = metrics(http)
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_blocks_used",
        "kv_blocks_total",
        "kv_cache_usage_ratio",
        "generation_tokens_total",
        "e2e_request_latency_seconds_count",
        "time_to_first_token_seconds_count",
    ):
        assert name in m
    assert m["kv_blocks_total"] > 0 and m["generation_tokens_total"] > 0
    assert m['http_responses_total{code="200",path="/v1/completions"}'] >= 1


# ---- bad input -------------------------------------------------------------------------------

GOOD = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
BAD_BODIES = [  # (id, raw body, status, param or None)
    ("malformed-json", '{"model": "tiny", "prompt": ', 400, None),
    ("not-an-object", "[1, 2, 3]", 400, None),
    ("nan-literal", '{"model": "tiny", "prompt": "a", "temperature": NaN}', 400, "temperature"),
    ("missing-prompt", {"model": "tiny"}, 400, "prompt"),
    ("prompt-wrong-type", {**GOOD, "prompt": 5}, 400, "prompt"),
    ("max-tokens-string", {**GOOD, "max_tokens": "many"}, 400, "max_tokens"),
    ("unknown-model", {**GOOD, "model": "gpt-9"}, 404, "model"),
    ("prompt-too-long", {**GOOD, "prompt": "x" * (MAX_MODEL_LEN + 10)}, 400, "prompt"),
    ("prompt-plus-max-tokens", {**GOOD, "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
    ("negative-temperature", {**GOOD, "temperature": -1}, 400, "temperature"),
    ("top-p-zero", {**GOOD, "top_p": 0}, 400, "top_p"),
    ("top-k-negative", {**GOOD, "top_k": -5}, 400, "top_k"),
    ("min-over-max", {**GOOD, "min_tokens": 9}, 400, "min_tokens"),
    ("zero-max-tokens", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("n-two", {**GOOD, "n": 2}, 400, "n"),
    ("seed-huge", {**GOOD, "seed": 2**80}, 400, "seed"),
    ("empty-stop", {**GOOD, "stop": [""]}, 400, "stop"),
    ("token-outside-vocab", {**GOOD, "prompt": [1, 2, 10**9]}, 400, None),
    ("empty-prompt", {**GOOD, "prompt": ""}, 400, "prompt"),
    ("two-prompts", {**GOOD, "prompt": ["a", "b"]}, 400, "prompt"),
    (
        "stream-options-without-stream",
        {**GOOD, "stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),
]
BAD_CHATS = [
    ("no-messages", {"model": "tiny", "messages": []}, 400, "messages"),
    (
        "bad-role",
        {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages",
    ),
    (
        "image-part",
        {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages",
    ),
    (
        "logprobs",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": True},
        400,
        "logprobs",
    ),
]


@pytest.mark.parametrize(
    "path,body,status,param",
    [("/v1/completions", *c[1:]) for c in BAD_BODIES]
    + [("/v1/chat/completions", *c[1:]) for c in BAD_CHATS],
    ids=[c[0] for c in BAD_BODIES] + [f"chat-{c[0]}" for c in BAD_CHATS],
)
def test_bad_request_gets_openai_error(http, path, body, status, param):
    raw = body if isinstance(body, str) else json.dumps(body)
    err = assert_openai_error(
        http.post(path, content=raw, headers={"Content-Type": "application/json"}), status
    )
    if param is not None:
        assert err["param"] == param, err
    assert_serving(http)


def test_oversize_body_declared_and_chunked(http):
    big = json.dumps({**GOOD, "prompt": "x" * (MAX_BODY + 1)}).encode()
    assert_openai_error(
        http.post("/v1/completions", content=big, headers={"Content-Type": "application/json"}), 413
    )

    def chunks():  # no Content-Length: the limit must hold while reading
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    assert_openai_error(
        http.post(
            "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}
        ),
        413,
    )
    assert_serving(http)


def test_api_key_required(server, http):
    with httpx.Client(base_url=server.url, timeout=10) as anon:
        assert_openai_error(anon.post("/v1/completions", json=GOOD), 401)
        r = anon.post("/v1/completions", json=GOOD, headers={"Authorization": "Bearer wrong"})
        assert assert_openai_error(r, 401)["code"] == "invalid_api_key"
        assert anon.get("/health").status_code == 200  # probes need no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert_serving(http)


def test_idle_loop_does_not_spin(http):
    steps = wait_idle(http)["engine_steps_total"]
    time.sleep(0.3)
    assert metrics(http)["engine_steps_total"] == steps


def test_unknown_route_and_method(http):
    assert_openai_error(http.get("/v1/nothing"), 404)
    assert_openai_error(http.get("/v1/completions"), 405)


# ---- disconnects -----------------------------------------------------------------------------

LONG = {
    "model": "tiny",
    "prompt": "tell me everything",
    "max_tokens": 2000,
    "ignore_eos": True,
}  # ~5 s


def test_stream_disconnect_frees_blocks(server, http, engine):
    before = wait_idle(http)
    aborts = before.get('request_finished_total{finish_reason="abort"}', 0)
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            lines = (
                r.iter_lines()
            )  # kept referenced: a dropped httpx iterator closes the connection
            got = [line for line in itertools.islice(lines, 6) if line.startswith("data:")]
            assert len(got) == 3  # data line, blank line, ...
            mid = metrics(http)
            assert mid["num_requests_running"] == 1 and mid["kv_blocks_used"] > 0, mid
        # leaving both blocks closes the connection mid-stream
    after = wait_idle(http)
    assert after['request_finished_total{finish_reason="abort"}'] == aborts + 1
    assert after["generation_tokens_total"] - before["generation_tokens_total"] < LONG["max_tokens"]
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished_requests()
    assert_serving(http)


def test_non_stream_disconnect_frees_blocks(server, http):
    before = wait_idle(http)
    aborts = before.get('request_finished_total{finish_reason="abort"}', 0)
    with httpx.Client(
        base_url=server.url, headers=AUTH, timeout=httpx.Timeout(10, read=0.15)
    ) as client:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the socket
            client.post("/v1/completions", json=LONG)
    after = wait_idle(http)
    assert after['request_finished_total{finish_reason="abort"}'] == aborts + 1
    assert_serving(http)


# ---- overload --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_server():
    """max_num_seqs=2, max_waiting=2, max_model_len=64: easy to overload, fast to fuzz. The
    engine runs in its own core process (the served default), so overload and fuzz cross the
    process boundary; the module's `server` covers the in-process engine."""
    config = EngineConfig(model="tiny", max_num_seqs=2, max_model_len=64)
    with ServerThread(create_app(config, "tiny", max_waiting=2)) as srv:
        yield srv


async def _burst(url: str, n: int) -> list[tuple[int, dict | list]]:
    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, dict | list]:
        body = {
            "model": "tiny",
            "prompt": f"burst {i}",
            "max_tokens": 24,
            "ignore_eos": True,
            "stream": True,
        }
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return r.status_code, {
                    "body": json.loads(await r.aread()),
                    "retry_after": r.headers.get("retry-after"),
                }
            return 200, [line async for line in r.aiter_lines() if line.startswith("data:")]

    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30), limits=limits) as client:
        return await asyncio.wait_for(
            asyncio.gather(*(one(client, i) for i in range(n))), timeout=60
        )


def test_overload_gets_clear_429_and_nothing_is_lost(small_server):
    results = asyncio.run(_burst(small_server.url, 16))
    codes = [code for code, _ in results]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) >= 1 and codes.count(200) >= 2, codes
    for code, payload in results:
        if code == 429:
            assert (
                "overloaded" in payload["body"]["error"]["message"]
                and payload["retry_after"] == "1"
            )
        else:  # every accepted request completes: 24 token chunks, a finish reason, [DONE]
            events = [json.loads(line[5:]) for line in payload[:-1]]
            assert payload[-1] == "data: [DONE]"
            assert sum(len(e["choices"][0]["token_ids"]) for e in events) == 24
            assert events[-1]["choices"][0]["finish_reason"] == "length"
    with httpx.Client(base_url=small_server.url, timeout=10) as http:
        m = wait_idle(http)
        assert m['http_responses_total{code="429",path="/v1/completions"}'] == codes.count(429)
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "after", "max_tokens": 2})
        assert r.status_code == 200


# ---- fuzz ------------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
    max_leaves=6,
)


_VALID_SAMPLING = {
    "max_tokens": st.integers(1, 16), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 2000), "seed": st.integers(-(2**63), 2**63 - 1), "min_tokens": st.integers(0, 1),
    "ignore_eos": st.booleans(), "stop": st.lists(st.text(min_size=1, max_size=3), max_size=3),
    "stop_token_ids": st.lists(st.integers(0, 600), max_size=3), "n": st.just(1), "user": st.text(max_size=5),
}
_completion = st.fixed_dictionaries(
    {"model": st.just("tiny"),
     "prompt": st.text(min_size=1, max_size=40) | st.lists(st.integers(0, 511), min_size=1, max_size=12)},
    optional=_VALID_SAMPLING,
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=20)}
)
_chat = st.fixed_dictionaries(
    {"model": st.just("tiny"), "messages": st.lists(_message, min_size=1, max_size=3)},
    optional={**_VALID_SAMPLING, "max_completion_tokens": st.integers(1, 16)},
)
_bad_value = _json | st.integers(-(2**70), 2**70) | st.floats(-1e30, 1e30) | st.text(max_size=20)


@st.composite
def _requests(draw) -> tuple[str, object]:
    """A valid request, or one with one field replaced or dropped, or any JSON at all."""
    path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    body = draw(_completion if path == "/v1/completions" else _chat)
    body["stream"] = draw(st.booleans())
    if body["stream"] and draw(st.booleans()):
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    kind = draw(st.sampled_from(["valid", "bad-field", "drop-field", "any-json"]))
    if kind == "bad-field":
        body[draw(st.sampled_from(sorted({*body, *_VALID_SAMPLING, "logprobs", "echo"})))] = draw(_bad_value)
    elif kind == "drop-field":
        del body[draw(st.sampled_from(sorted(body)))]
    elif kind == "any-json":
        body = draw(_json)
    return path, body


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=_requests())
def test_fuzz_finds_no_5xx(small_server, case):
    path, body = case
    with httpx.Client(base_url=small_server.url, timeout=20) as client:
        with client.stream("POST", path, json=body) as r:
            raw = r.read().decode()
    assert r.status_code < 500, (body, raw)
    if r.status_code != 200:
        assert set(json.loads(raw)["error"]) == {"message", "type", "param", "code"}
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert raw.endswith("data: [DONE]\n\n") and '"error"' not in raw, raw[-300:]
    else:
        assert json.loads(raw)["usage"]["completion_tokens"] >= 1


# ---- engine failure --------------------------------------------------------------------------


class _FailOnce:
    """Stands in for LLMEngine.step: the next call after arm() raises, then it is the real one."""

    def __init__(self, step):
        self.step, self.armed = step, False

    def arm(self) -> None:
        self.armed = True

    def __call__(self):
        if self.armed:
            self.armed = False
            raise RuntimeError("injected step failure")
        return self.step()


def test_step_failure_fails_in_flight_with_500_and_is_logged(engine, http, caplog):
    engine.step = fail = _FailOnce(
        engine.step
    )  # an instance attribute: the loop thread sees it next step
    try:
        fail.arm()
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "boom", "max_tokens": 8})
        assert "injected step failure" in assert_openai_error(r, 500)["message"]
        with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data:")  # a token arrived: the headers (200) are out
            fail.arm()
            rest = [line for line in lines if line.startswith("data:")]
        assert "injected step failure" in json.loads(rest[-2][5:])["error"]["message"]
        assert rest[-1] == "data: [DONE]"
        wait_idle(http)
        assert_serving(http)
        assert http.get("/health").status_code == 200
    finally:
        del engine.step
    assert "engine step failed" in caplog.text and "injected step failure" in caplog.text


def test_cli_engine_options_reach_the_config():
    from engine.serve.cli import build_parser, engine_config

    args = build_parser().parse_args(["--scheduling-policy", "static", "--static-reservation", "max_model_len",
                                      "--disable-custom-all-reduce", "--all-reduce-norm-fusion", "off",
                                      "--max-model-len", "256"])
    cfg = engine_config(args)
    assert (cfg.scheduling_policy, cfg.static_reservation, cfg.disable_custom_all_reduce,
            cfg.all_reduce_norm_fusion, cfg.max_model_len) == ("static", "max_model_len", True, "off", 256)
    default = engine_config(build_parser().parse_args([]))
    assert (default.static_reservation, default.all_reduce_norm_fusion) == ("max_tokens", "push")
    for bad in (["--static-reservation", "pow2"], ["--all-reduce-norm-fusion", "magic"]):
        with pytest.raises(SystemExit):  # the flags take their choices from engine/config.py
            build_parser().parse_args(bad)
