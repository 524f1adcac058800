"""GuideLLM against the server, offline, with the preset tokenizer saved by `llmbench tokenizer
save` (issue #20): a short synchronous run of synthetic prompts must complete, and the token
counts GuideLLM reports must be the server's.

GuideLLM is not in the `test` extra (it pulls sanic, uvloop, httptools ... and uvicorn would
pick the last two up): `nox -s interop` installs it and runs this file; without it the test
skips, saying so.

    nox -s interop
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine import EngineConfig, LLMEngine
from engine.serve import ServerThread, create_app
from engine.tokenizer import save_tokenizer

pytest.importorskip("guidellm", reason="guidellm is not installed: `nox -s interop` installs it and runs this")

NUM_REQUESTS, PROMPT_TOKENS, OUTPUT_TOKENS = 4, 32, 16


def served_tokens(base_url: str) -> tuple[float, float]:
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(base_url + "/metrics").text)}
    return tuple(families[name].samples[0].value for name in ("vllm:prompt_tokens", "vllm:generation_tokens"))


@pytest.mark.slow
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_guidellm_runs_offline_and_counts_tokens_as_the_server(tmp_path, route):
    config = EngineConfig(model="tiny", max_model_len=512)
    save_tokenizer(config, tmp_path / "tokenizer")
    engine = LLMEngine(config)
    try:
        with ServerThread(create_app(engine)) as srv:
            before = served_tokens(srv.url)
            cmd = [
                sys.executable, "-m", "guidellm", "run",
                "--backend", f"kind=openai_http,target={srv.url},model=tiny,request_format={route}",
                "--tokenizer", f"kind=huggingface_auto,model={tmp_path / 'tokenizer'}",
                "--profile", "kind=synchronous",
                "--constraint", f"kind=max_requests,count={NUM_REQUESTS}",
                "--data", f"kind=synthetic_text,prompt_tokens={PROMPT_TOKENS},output_tokens={OUTPUT_TOKENS}",
                "--output", f"kind=json,path={tmp_path / 'benchmarks.json'}",
                "--disable-console",
            ]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
            run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
            after = served_tokens(srv.url)
            (bench,) = json.loads((tmp_path / "benchmarks.json").read_text())["benchmarks"]
            done = bench["requests"]["successful"]
            assert len(done) == NUM_REQUESTS and not bench["requests"]["errored"]
            for req in done:  # its prompt (or messages), as the server counts it
                body = json.loads(req["request_args"])["body"]
                asked = {"prompt": body["prompt"]} if "prompt" in body else {"messages": body["messages"]}
                count = httpx.post(srv.url + "/tokenize", json=asked).json()["count"]
                assert req["input_metrics"]["text_tokens"] == count
                # the synthetic prompt has the asked length in our tokenizer (chat adds its template)
                assert count == PROMPT_TOKENS if "prompt" in body else count > PROMPT_TOKENS
                assert req["output_metrics"]["text_tokens"] == OUTPUT_TOKENS
    finally:
        engine.shutdown()
    reported = (sum(r["input_metrics"]["text_tokens"] for r in done),
                sum(r["output_metrics"]["text_tokens"] for r in done))
    assert reported == (after[0] - before[0], after[1] - before[1])
