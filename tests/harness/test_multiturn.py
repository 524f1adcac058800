"""Multi-turn chat workloads through the engine, static and openai backends.

    PYTHONPATH=. python -m pytest tests/harness/test_multiturn.py -q

A small ShareGPT-format file made here is loaded as conversations (workloads/datasets.py) and
replayed: every turn gets a row, turn k is sent only after turn k-1 finished, its prompt holds
the conversation so far (so prompts grow turn by turn), and with prefix caching the engine
serves later turns' prompts partly from the earlier turns' blocks. The openai backend talks to
the tiny server in this process (``create_app`` + ``ServerThread``); with greedy sampling and
the same dummy weights, the server and the in-process engine give the same answers, so each
turn's prompt has the same number of tokens over HTTP and in process.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from engine import EngineConfig
from engine.chat import chat_prompt_token_ids
from engine.tokenizer import build_byte_tokenizer
from harness.backends.base import ReplayOptions
from harness.backends.engine import EngineBackend
from harness.metrics import per_turn_stats
from harness.replay import replay
from harness.report import load_report, write_report
from workloads.chat import History
from workloads.datasets import load_dataset

TURNS = 3
CONVERSATIONS = 3


def _sharegpt_rows() -> list[dict]:
    rows = []
    for i in range(CONVERSATIONS):
        conv = []
        for t in range(TURNS):
            conv.append({"from": "human", "value": f"Conversation {i}, question {t}: tell me about rivers."})
            conv.append({"from": "gpt", "value": "Rivers run to the sea. " * (t + 1)})
        rows.append({"id": f"c{i}", "conversations": conv})
    return rows


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("sg") / "sharegpt.json"
    path.write_text(json.dumps(_sharegpt_rows()))
    requests = load_dataset("sharegpt", build_byte_tokenizer(), path=str(path), num_prompts=CONVERSATIONS,
                            multi_turn=True, output_len=6, min_output_len=1)
    # Greedy, so the server and the in-process engine answer alike.
    return [replace(r, temperature=0.0) for r in requests]


def _check_conversations(records) -> None:
    assert len(records) == CONVERSATIONS * TURNS
    assert all(r.status == "ok" for r in records), [r.error for r in records if r.status != "ok"]
    by_conv: dict[str, list] = {}
    for r in records:
        by_conv.setdefault(r.conversation_id, []).append(r)
    assert len(by_conv) == CONVERSATIONS
    for turns in by_conv.values():
        turns.sort(key=lambda r: r.turn)
        assert [r.turn for r in turns] == list(range(TURNS))
        for prev, cur in zip(turns, turns[1:]):
            assert cur.sent_s >= prev.finished_s  # a turn waits for the previous answer
            assert cur.scheduled_s >= prev.finished_s
            # the history grows: earlier prompt + answer + the new user message
            assert cur.prompt_tokens > prev.prompt_tokens + prev.output_tokens


def _engine_run(name: str, trace, **engine_args):
    backend = EngineBackend("tiny", name, warmup=False, device="cpu", **engine_args)
    try:
        return replay(backend, trace, ReplayOptions(timed=False, progress=False), telemetry=False), backend.engine.block_size
    finally:
        backend.close()


@pytest.fixture(scope="module")
def engine_result(trace):
    return _engine_run("engine", trace)


def test_engine_backend_replays_every_turn_with_growing_history(engine_result):
    result, _ = engine_result
    _check_conversations(result.run.requests)


def test_later_turns_hit_the_earlier_turns_blocks(engine_result):
    result, block_size = engine_result
    for rec in result.run.requests:
        if rec.turn == 0:
            continue
        prev = next(r for r in result.run.requests
                    if r.conversation_id == rec.conversation_id and r.turn == rec.turn - 1)
        # At least the previous turn's full prompt blocks come from the prefix cache.
        assert rec.cached_tokens >= prev.prompt_tokens // block_size * block_size > 0


def test_static_backend_replays_every_turn(trace):
    result, _ = _engine_run("static", trace)
    _check_conversations(result.run.requests)


def test_report_has_per_turn_columns_and_summary(engine_result, tmp_path):
    result, _ = engine_result
    report = write_report(tmp_path / "run", result.run.requests, result.run.steps, [], {})
    df = load_report(tmp_path / "run").requests
    assert sorted(df["turn"].astype(int).unique()) == list(range(TURNS))
    assert df["conversation_id"].nunique() == CONVERSATIONS
    row = report.summary_row()
    assert row["num_conversations"] == CONVERSATIONS
    assert row["mean_turns_per_conversation"] == TURNS
    assert row["ttft_p50_ms_turn_0"] is not None and row[f"ttft_p50_ms_turn_{TURNS - 1}"] is not None
    assert row["mean_cached_tokens_later_turns"] > 0
    assert report.recompute_summary() == row
    table = per_turn_stats(df)
    assert table["turn"].tolist() == list(range(TURNS)) and (table["num"] == CONVERSATIONS).all()
    assert table["mean_prompt_tokens"].is_monotonic_increasing
    assert table["mean_cached_tokens"].iloc[0] == 0 < table["mean_cached_tokens"].iloc[-1]


def test_failed_turn_writes_off_the_rest_of_its_conversation(trace):
    # A context too short for the second turn's history: turn 1 is refused, turn 2 never sent.
    result, _ = _engine_run("engine", trace, max_model_len=80)
    for rec in result.run.requests:
        if rec.turn == 0:
            assert rec.status == "ok"
        else:
            assert rec.status == "error"
    later = [r for r in result.run.requests if r.turn == 2]
    assert all("not sent" in r.error for r in later)


def test_history_grows_turn_by_turn_in_the_chat_prompt():
    tok, history = build_byte_tokenizer(), History()
    prompts = []
    for t in range(3):
        prompts.append(chat_prompt_token_ids(tok, history.ask(f"question {t}")))
        history.answer(f"answer {t}")
    for earlier, later in zip(prompts, prompts[1:]):
        assert len(later) > len(earlier)
        assert later[:len(earlier)] == earlier  # the earlier prompt is a prefix of the later one
    assert [m["role"] for m in history.messages] == ["user", "assistant"] * 3


def test_chat_prompt_matches_the_server_formatting():
    from engine.serve.chat import chat_prompt_token_ids as server_ids
    from engine.serve.protocol import ChatMessage

    tok = build_byte_tokenizer()
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "How are rivers made?"}]
    assert chat_prompt_token_ids(tok, messages) == server_ids(tok, [ChatMessage(**m) for m in messages])


def test_openai_backend_matches_the_engine_turn_by_turn(trace, engine_result):
    from engine.serve import ServerThread, create_app
    from harness.backends.openai import OpenAIBackend

    app = create_app(EngineConfig(model="tiny", device="cpu"))
    with ServerThread(app) as srv:
        backend = OpenAIBackend(srv.url, "tiny")  # endpoint completions: turns still go to chat
        result = replay(backend, trace, ReplayOptions(timed=False, progress=False), telemetry=False)
    records = result.run.requests
    _check_conversations(records)
    local = {r.request_id: r for r in engine_result[0].run.requests}
    assert [r.prompt_tokens for r in records] == [local[r.request_id].prompt_tokens for r in records]
    assert [r.output_tokens for r in records] == [local[r.request_id].output_tokens for r in records]


def test_cli_runs_a_sharegpt_conversation_dataset(tmp_path, capsys):
    from harness.cli import main

    path = tmp_path / "sg.json"
    path.write_text(json.dumps(_sharegpt_rows()))
    out = tmp_path / "run"
    status = main(["run", "--dataset", "sharegpt", "--dataset-path", str(path), "--dataset-tokenizer", "tiny",
                   "--param", "multi_turn=true", "--param", "num_prompts=2", "--param", "output_len=4",
                   "--param", "min_output_len=1", "--device", "cpu", "--no-telemetry", "--no-progress",
                   "--out", str(out)])
    assert status == 0
    report = load_report(out)
    assert len(report.requests) == 2 * TURNS and (report.requests["status"] == "ok").all()
    assert report.summary_row()["num_conversations"] == 2
    assert report.metadata["config"]["workload"]["dataset"] == "sharegpt"


def test_cli_refuses_dataset_flags_without_a_dataset_and_bad_parameters(tmp_path, capsys):
    from harness.cli import main

    assert main(["run", "--workload", "smoke", "--dataset-path", "x.json"]) == 2
    assert "go with --dataset" in capsys.readouterr().err
    assert main(["run", "--dataset", "sharegpt", "--dataset-path", "x.json", "--param", "num_prompt=3"]) == 2
    assert "unknown parameter" in capsys.readouterr().err


def test_client_workers_keep_a_conversation_together(trace):
    from harness.backends.openai import _units

    units = _units(trace)
    assert len(units) == CONVERSATIONS
    assert all(len({r.conversation_id for r in u}) == 1 and [r.turn for r in u] == list(range(TURNS))
               for u in units)


def test_cli_refuses_a_trace_with_broken_turn_numbers(tmp_path, capsys):
    from harness.cli import main

    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"arrival_s": 0, "max_tokens": 2, "prompt": "x", "conversation_id": "c",
                                        "turn": t}) + "\n" for t in (0, 2)))
    assert main(["run", "--trace", str(path)]) == 2
    assert "turns must be 0..1" in capsys.readouterr().err
