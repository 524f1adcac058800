"""The server as other tools see it (issue #20): vLLM's /tokenize and /detokenize, vLLM's
metric names, a preset tokenizer saved where AutoTokenizer finds it, OpenAI error objects on
every unknown route and method.

    PYTHONPATH=$PWD python -m pytest tests/serve/test_interop.py -q
"""

from __future__ import annotations

import dataclasses

import httpx
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from engine import EngineConfig
from engine.outputs import RequestDelta
from engine.serve import ServerThread, create_app
from engine.serve.engine_client import EngineSnapshot
from engine.serve.generation import _Progress
from engine.serve.metrics import ServerMetrics
from engine.tokenizer import PRESET_TOKENIZER, save_tokenizer
from harness.cli import main as llmbench
from harness.scrape import parse_metrics, server_summary

MAX_MODEL_LEN = 1024  # the engine fixture (conftest.py) reads it
MODEL = "tiny-served"  # a served name other than the preset's: model_name must follow it
PROMPTS = ["Hello, world!", "naïve café — 日本語 <|endoftext|> tabs\tand\nnewlines", " "]
VLLM_FAMILIES = {  # family name as the parser reports it (counters lose _total) -> type
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:num_preemptions": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:time_per_output_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
}


@pytest.fixture(scope="module")
def http(engine):
    with ServerThread(create_app(engine, MODEL, api_key="k")) as srv:
        with httpx.Client(base_url=srv.url, headers={"Authorization": "Bearer k"}, timeout=30) as client:
            yield client


def complete(http: httpx.Client, prompt: str, max_tokens: int = 4, **extra: object) -> dict:
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                                           "ignore_eos": True, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def families(http: httpx.Client) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}


def sample(family: object, suffix: str = "", **labels: str) -> float:
    (value,) = [s.value for s in family.samples  # type: ignore[attr-defined]
                if s.name == family.name + suffix and labels.items() <= s.labels.items()]  # type: ignore[attr-defined]
    return value


# ---- /tokenize, /detokenize -----------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenize_counts_what_a_completion_bills(http, prompt):
    tok = http.post("/tokenize", json={"model": MODEL, "prompt": prompt}).json()
    assert set(tok) >= {"count", "max_model_len", "tokens"}
    assert tok["count"] == len(tok["tokens"]) == complete(http, prompt)["usage"]["prompt_tokens"]
    assert tok["max_model_len"] == 1024
    back = http.post("/detokenize", json={"model": MODEL, "tokens": tok["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": prompt}
    # the token-id prompt a tool builds from /tokenize is billed the same
    assert complete(http, tok["tokens"])["usage"]["prompt_tokens"] == tok["count"]


def test_tokenize_messages_counts_what_a_chat_bills(http):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi there"}]
    tok = http.post("/tokenize", json={"model": MODEL, "messages": messages}).json()
    chat = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 2})
    assert chat.status_code == 200, chat.text
    assert tok["count"] == chat.json()["usage"]["prompt_tokens"]
    bare = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert bare["tokens"] == tok["tokens"][: bare["count"]] and bare["count"] < tok["count"]


def test_tokenize_options_and_mistakes(http):
    strs = http.post("/tokenize", json={"prompt": "ab", "return_token_strs": True}).json()
    assert strs["token_strs"] == ["a", "b"] and strs["count"] == 2  # model may be left out, as in vLLM
    cases = [
        ("/tokenize", {"model": "gpt-9", "prompt": "x"}, 404, "model"),
        ("/tokenize", {"model": MODEL}, 400, "prompt"),
        ("/tokenize", {"model": MODEL, "messages": []}, 400, "messages"),
        ("/tokenize", {"model": MODEL, "prompt": 7}, 400, "prompt"),
        ("/detokenize", {"model": MODEL, "tokens": [1, -1]}, 400, "tokens"),
        ("/detokenize", {"model": MODEL, "tokens": [10**9]}, 400, "tokens"),
        ("/detokenize", {"model": MODEL}, 400, "tokens"),
    ]
    for path, body, status, param in cases:
        r = http.post(path, json=body)
        assert r.status_code == status, (path, body, r.text)
        assert r.json()["error"]["param"] == param, r.text
    r = http.post("/tokenize", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


# ---- the tokenizer for other tools ------------------------------------------------------------


def test_saved_preset_tokenizer_loads_with_autotokenizer_and_encodes_like_the_server(http, tmp_path):
    out = tmp_path / "tok"
    assert llmbench(["tokenizer", "save", "--model", "tiny", "--max-model-len", "1024", "--out", str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.model_max_length == 1024 and tok.eos_token == "<|endoftext|>"
    for prompt in PROMPTS:
        served = http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
        assert tok(prompt).input_ids == served
        assert tok.decode(served) == prompt


def test_models_card_names_the_tokenizer(http, tmp_path):
    (card,) = http.get("/v1/models").json()["data"]
    assert card["tokenizer"] == PRESET_TOKENIZER
    # a checkpoint's tokenizer is named by where it came from
    saved = tmp_path / "tok"
    save_tokenizer(EngineConfig(model="tiny"), saved)
    app = create_app(EngineConfig(model="tiny", tokenizer=str(saved)), engine_in_process=True)
    assert app.state.server.tokenizer_name == str(saved)


def test_saving_without_a_tokenizer_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer"):
        save_tokenizer(EngineConfig(model="tiny", skip_tokenizer_init=True), tmp_path / "x")


# ---- /metrics under vLLM's names ------------------------------------------------------------


def test_metrics_have_vllm_families_with_model_name(http):
    before = families(http)
    for name, kind in VLLM_FAMILIES.items():
        assert before[name].type == kind, name
        assert all(s.labels.get("model_name") == MODEL for s in before[name].samples), name
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "count me", "max_tokens": 6,
                                           "ignore_eos": True, "stream": True,
                                           "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    after = families(http)
    grew = {name: sample(after[name], suffix, model_name=MODEL) - sample(before[name], suffix, model_name=MODEL)
            for name, suffix in [("vllm:prompt_tokens", "_total"), ("vllm:generation_tokens", "_total"),
                                 ("vllm:time_to_first_token_seconds", "_count"),
                                 ("vllm:e2e_request_latency_seconds", "_count"),
                                 ("vllm:time_per_output_token_seconds", "_count"),
                                 ("vllm:inter_token_latency_seconds", "_count")]}
    # one ITL per token after the first arrival: 5, fewer only if the first arrival held several
    assert 1 <= grew.pop("vllm:inter_token_latency_seconds") <= 6 - 1
    assert grew == {"vllm:prompt_tokens": len("count me"), "vllm:generation_tokens": 6,
                    "vllm:time_to_first_token_seconds": 1, "vllm:e2e_request_latency_seconds": 1,
                    "vllm:time_per_output_token_seconds": 1}
    # the vLLM names and our own are the same numbers
    for ours, theirs in [("llmbench_generation_tokens", "vllm:generation_tokens"),
                         ("llmbench_prompt_tokens", "vllm:prompt_tokens"),
                         ("llmbench_num_preemptions", "vllm:num_preemptions")]:
        assert sample(after[ours], "_total") == sample(after[theirs], "_total")
    itl = after["vllm:inter_token_latency_seconds"]
    tpot = after["vllm:time_per_output_token_seconds"]
    assert sample(itl, "_sum") > 0 and sample(tpot, "_sum") > 0
    assert sample(itl, "_bucket", le="+Inf") == sample(itl, "_count")


def test_itl_spreads_an_arrival_over_its_tokens_and_tpot_is_per_request():
    metrics = ServerMetrics(model_name="m")
    progress = _Progress(0.0, metrics=metrics)
    for ids in ([5], [], [6, 7, 8], [9]):  # the first token, nothing, three at once, one
        progress.add(RequestDelta("r", ids, "", False, None, 4, 0))
    assert metrics.itl_s.count == 3 + 1 and 0 < metrics.itl_s.total
    metrics.observe_request(4, 5, "length", ttft_s=1.0, e2e_s=3.0)
    assert (metrics.tpot_s.count, metrics.tpot_s.total) == (1, 0.5)  # (3 - 1) / (5 - 1)
    metrics.observe_request(4, 1, "length", ttft_s=1.0, e2e_s=1.0)  # one token: no TPOT
    assert metrics.tpot_s.count == 1


def test_scraper_reads_one_prefix_not_both():
    """The server exports every gauge twice (llmbench_*, vllm:*): the summary must not add them."""
    metrics = ServerMetrics(model_name="m")
    snap = EngineSnapshot(num_running=3, num_waiting=2, kv_blocks_used=10, kv_blocks_total=40, num_preemptions=1)
    rows = parse_metrics(metrics.render(snap, 0), 1.0) + parse_metrics(
        metrics.render(dataclasses.replace(snap, num_preemptions=4), 0), 2.0)
    summary = server_summary(pd.DataFrame(rows, columns=["t_s", "family", "sample", "labels", "value"]))
    assert (summary["server_running_peak"], summary["server_queue_peak"]) == (3, 2)
    assert summary["server_kv_usage_peak"] == 0.25 and summary["server_preemptions"] == 3


def test_step_counters_give_the_mean_step_and_batch_between_scrapes():
    """llmbench_engine_step_seconds_total / _scheduled_seqs_total over engine_steps_total, as
    differences between the window's first and last scrape (what happened before it is not counted)."""
    metrics = ServerMetrics(model_name="m")
    before = EngineSnapshot(num_steps=100, step_seconds=50.0, scheduled_seqs=400, scheduled_tokens=4000)
    after = dataclasses.replace(before, num_steps=110, step_seconds=50.03, scheduled_seqs=720, scheduled_tokens=4320)
    rows = parse_metrics(metrics.render(before, 0), 1.0) + parse_metrics(metrics.render(after, 0), 2.0)
    summary = server_summary(pd.DataFrame(rows, columns=["t_s", "family", "sample", "labels", "value"]))
    assert summary["server_mean_step_ms"] == pytest.approx(3.0) and summary["server_step_batch_mean"] == 32.0
    idle = server_summary(pd.DataFrame(parse_metrics(metrics.render(before, 0), 1.0) * 2,
                                       columns=["t_s", "family", "sample", "labels", "value"]))
    assert idle["server_mean_step_ms"] is None and idle["server_step_batch_mean"] is None  # no step in the window


# ---- errors other tools can read --------------------------------------------------------------


@pytest.mark.parametrize("method, path, status", [
    ("POST", "/v1/embeddings", 404),
    ("GET", "/v1/nothing/here", 404),
    ("POST", "/v2/completions", 404),
    ("GET", "/v1/completions", 405),
    ("PUT", "/v1/chat/completions", 405),
    ("DELETE", "/v1/models", 405),
    ("GET", "/tokenize", 405),
    ("POST", "/metrics", 405),
])
def test_unknown_routes_and_methods_answer_openai_errors(http, method, path, status):
    r = http.request(method, path, json={"model": MODEL})
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert path in error["message"] and method in error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == ("not_found" if status == 404 else "method_not_allowed")
    if status == 405:
        assert r.headers["Allow"] and r.headers["Allow"] in error["message"]


def test_tokenize_keeps_the_generation_routes_prompt_limit(http):
    """/tokenize checks the same character limit before tokenizing, so it cannot stall the server
    either (engine/serve/tokenizing.py serves both)."""
    from engine.serve.tokenizing import CHARS_PER_TOKEN_BOUND

    too_long = "x" * (CHARS_PER_TOKEN_BOUND * 1024 + 1)  # the fixture's max_model_len is 1024
    for body in ({"prompt": too_long}, {"messages": [{"role": "user", "content": too_long}]}):
        r = http.post("/tokenize", json={"model": MODEL, **body})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
