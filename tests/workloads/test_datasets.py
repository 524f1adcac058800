"""Dataset sources (workloads/datasets.py), exact-length synthetic text (workloads/synthetic.py)
and the trace format's conversation fields.

    PYTHONPATH=. python -m pytest tests/workloads/test_datasets.py -q

Token counts are checked with the presets' byte tokenizer and with a small BPE tokenizer
trained here (merges, and a BOS added to every prompt), so that decode-then-encode is not the
identity and a prompt carries a special token: the cases exact-length text must handle.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from engine.tokenizer import build_byte_tokenizer
from workloads.datasets import DATASETS, load_dataset
from workloads.spec import WorkloadSpec
from workloads.synthetic import CORPUS, exact_length_text, synthetic_text
from workloads.tokens import TokenCounter
from workloads.trace import TraceError, TraceRequest, load_trace, save_trace

BYTES = build_byte_tokenizer()


def _bpe_with_bos() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<unk>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(1)
    tok.train_from_iterator([" ".join(rng.choices(CORPUS, k=50)) for _ in range(200)], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


BPE = _bpe_with_bos()


def _sharegpt(path: Path, conversations: list[list[tuple[str, str]]]) -> str:
    rows = [{"id": f"c{i}", "conversations": [m for user, gpt in conv
                                               for m in ({"from": "human", "value": user}, {"from": "gpt", "value": gpt})]}
            for i, conv in enumerate(conversations)]
    path.write_text(json.dumps(rows))
    return str(path)


# --- synthetic text -------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(length=st.integers(min_value=2, max_value=600), seed=st.integers(0, 2**16))
def test_exact_length_text_has_exactly_the_requested_tokens(length, seed):
    for tok in (BYTES, BPE):
        text = exact_length_text(TokenCounter(tok), length, random.Random(seed))
        assert len(tok(text).input_ids) == length
        assert text.strip()


def test_exact_length_counts_the_bos_and_refuses_room_for_no_text():
    counter = TokenCounter(BPE)
    text = exact_length_text(counter, 2, random.Random(0))  # BOS + one text token
    assert BPE(text).input_ids[0] == BPE.bos_token_id and len(BPE(text).input_ids) == 2
    with pytest.raises(ValueError, match="cannot hold any text"):
        exact_length_text(counter, 1, random.Random(0))


def test_synthetic_dataset_lengths_in_range_and_seeded():
    reqs = synthetic_text(BPE, input_len=100, output_len=20, range_ratio=0.5, num_prompts=20, seed=3)
    lengths = [len(BPE(r.prompt).input_ids) for r in reqs]
    assert all(50 <= n <= 150 for n in lengths) and len(set(lengths)) > 1
    assert all(10 <= r.max_tokens <= 30 and r.ignore_eos for r in reqs)
    assert reqs == synthetic_text(BPE, input_len=100, output_len=20, range_ratio=0.5, num_prompts=20, seed=3)


# --- ShareGPT -------------------------------------------------------------------------------


def test_sharegpt_single_turn_takes_the_first_human_turn_and_the_answer_length(tmp_path):
    convs = [[(f"Question {i} about the rivers of the north?", "Answer text " * (i + 1)),
              ("A follow-up question here?", "More.")] for i in range(6)]
    path = _sharegpt(tmp_path / "sg.json", convs)
    reqs = load_dataset("sharegpt", BPE, path=path, num_prompts=4, seed=1)
    assert len(reqs) == 4 and len({r.prompt for r in reqs}) == 4
    by_prompt = {user: gpt for conv in convs for user, gpt in conv[:1]}
    for r in reqs:
        assert r.prompt in by_prompt and r.conversation_id is None
        assert r.max_tokens == len(BPE(by_prompt[r.prompt], add_special_tokens=False).input_ids)
    assert reqs == load_dataset("sharegpt", BPE, path=path, num_prompts=4, seed=1)  # seeded shuffle
    assert [r.prompt for r in load_dataset("sharegpt", BPE, path=path, num_prompts=6, shuffle=False)] == \
        [conv[0][0] for conv in convs]


def test_sharegpt_filters_by_prompt_and_output_length(tmp_path):
    convs = [[("hi", "a long enough answer for the filter")],          # prompt too short
             [("a good question about the sea?", "ok")],               # answer too short
             [("a good question about the sea?", "an answer that is long enough")],
             [("word " * 300, "an answer that is long enough")]]        # prompt too long
    path = _sharegpt(tmp_path / "sg.json", convs)
    reqs = load_dataset("sharegpt", BYTES, path=path, min_prompt_len=4, min_output_len=4, max_prompt_len=1024,
                        max_total_len=2048)
    assert [r.prompt for r in reqs] == ["a good question about the sea?"]
    reqs = load_dataset("sharegpt", BYTES, path=path, max_prompt_len=None, max_total_len=None)
    assert sorted(len(r.prompt) for r in reqs) == [30, 1500]  # the long prompt passes now
    reqs = load_dataset("sharegpt", BYTES, path=path, min_prompt_len=1, min_output_len=1)
    assert sorted(r.prompt for r in reqs) == ["a good question about the sea?"] * 2 + ["hi"]
    with pytest.raises(ValueError, match="no row passed"):
        load_dataset("sharegpt", BYTES, path=path, min_prompt_len=5000)


def test_output_len_fixed_or_sampled(tmp_path):
    path = _sharegpt(tmp_path / "sg.json", [[(f"question number {i} please", "x")] for i in range(30)])
    assert {r.max_tokens for r in load_dataset("sharegpt", BYTES, path=path, output_len=16)} == {16}
    sampled = [r.max_tokens for r in load_dataset("sharegpt", BYTES, path=path, output_len="8:12")]
    assert set(sampled) <= set(range(8, 13)) and len(set(sampled)) > 1
    assert [r.max_tokens for r in load_dataset("sharegpt", BYTES, path=path, output_len=[8, 12])] == sampled
    with pytest.raises(ValueError, match="output_len"):
        load_dataset("sharegpt", BYTES, path=path, output_len="12:8")


def test_sharegpt_multi_turn_keeps_turns_in_order(tmp_path):
    convs = [[(f"c{i} question {t} about the sea?", "answer " * (t + 2)) for t in range(4)] for i in range(5)]
    path = _sharegpt(tmp_path / "sg.json", convs)
    reqs = load_dataset("sharegpt", BYTES, path=path, num_prompts=3, multi_turn=True, max_turns=3, rate=2.0)
    by_conv: dict[str, list[TraceRequest]] = {}
    for r in reqs:
        by_conv.setdefault(r.conversation_id, []).append(r)
    assert len(by_conv) == 3
    for turns in by_conv.values():
        assert [r.turn for r in turns] == [0, 1, 2]
        assert len({r.arrival_s for r in turns}) == 1  # turns share the conversation's arrival
        i = int(turns[0].prompt[1])
        assert [r.prompt for r in turns] == [convs[i][t][0] for t in range(3)]
        assert [r.max_tokens for r in turns] == [len(("answer " * (t + 2)).encode()) for t in range(3)]
    assert len({turns[0].arrival_s for turns in by_conv.values()}) == 3


def test_multi_turn_context_limit_ends_a_conversation(tmp_path):
    path = _sharegpt(tmp_path / "sg.json", [[("question about the sea?", "answer " * 10)] * 5])
    reqs = load_dataset("sharegpt", BYTES, path=path, multi_turn=True, max_context_len=200)
    # each turn adds 23 + 70 tokens: two fit in 200, the third would pass it
    assert [r.turn for r in reqs] == [0, 1]


def test_openai_messages_rows_and_jsonl_files(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "be terse"}, {"role": "user", "content": "what is a river?"},
                          {"role": "assistant", "content": "water that flows"}]}]
    path = tmp_path / "sg.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (req,) = load_dataset("sharegpt", BYTES, path=str(path))
    assert req.prompt == "what is a river?" and req.max_tokens == len("water that flows")


# --- JSONL prompts and HF datasets ----------------------------------------------------------


def test_jsonl_prompts_with_output_lengths_and_answers(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "first prompt here", "output_len": 9}) + "\n\n"
                    + json.dumps({"prompt": "second prompt here", "completion": "twelve chars"}) + "\n")
    reqs = load_dataset("jsonl", BYTES, path=str(path), shuffle=False)
    assert [(r.prompt, r.max_tokens) for r in reqs] == [("first prompt here", 9), ("second prompt here", 12)]


def test_jsonl_row_without_prompt_names_the_row(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "fine prompt", "output_len": 5}) + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"row 2: no text field 'prompt'"):
        load_dataset("jsonl", BYTES, path=str(path), shuffle=False)


def test_hf_dataset_loads_a_local_parquet_file(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"question": [f"What is {i} plus {i}, exactly?" for i in range(8)],
                             "answer": ["the answer is " + "x" * i for i in range(8)]}), path)
    reqs = load_dataset("hf", BYTES, path=str(path), prompt_field="question", num_prompts=5, seed=2,
                        cache_dir=str(tmp_path / "cache"))
    assert len(reqs) == 5
    for r in reqs:
        i = int(r.prompt.split()[2])
        assert r.max_tokens == len("the answer is ") + i
    conv = tmp_path / "conv.parquet"
    pq.write_table(pa.Table.from_pylist([{"conversations": [{"from": "human", "value": "hello there river"},
                                                           {"from": "gpt", "value": "hello back to you"}]}]), conv)
    (r,) = load_dataset("hf", BYTES, path=str(conv), cache_dir=str(tmp_path / "cache"))
    assert (r.prompt, r.max_tokens) == ("hello there river", len("hello back to you"))


def test_unknown_dataset_and_parameters():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("nope", BYTES)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['num_prompt'\]"):
        load_dataset("sharegpt", BYTES, path="x.json", num_prompt=3)
    with pytest.raises(ValueError, match="needs a path"):
        load_dataset("sharegpt", BYTES)
    assert set(DATASETS) == {"sharegpt", "jsonl", "hf", "synthetic"}


def test_workload_spec_builds_a_dataset_with_the_callers_tokenizer(tmp_path):
    path = _sharegpt(tmp_path / "sg.json", [[(f"question number {i} here", "an answer")] for i in range(4)])
    spec = WorkloadSpec(dataset="sharegpt", dataset_path=path, params={"num_prompts": 2}, rate=5.0)
    assert spec.name == "sharegpt"
    with pytest.raises(ValueError, match="needs a tokenizer"):
        spec.build()
    reqs = spec.build(tokenizer=BYTES)
    assert len(reqs) == 2 and reqs[0].arrival_s == 0.0 < reqs[1].arrival_s
    with pytest.raises(ValueError, match="exactly one"):
        WorkloadSpec(kind="smoke", dataset="sharegpt")
    with pytest.raises(ValueError, match="min_prompt_len"):
        WorkloadSpec(dataset="sharegpt", dataset_path=path, params={"min_prompt_len": -1}).check()


# --- the trace format's conversation fields -------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_conversation_fields_round_trip(tmp_path, suffix):
    reqs = [TraceRequest(arrival_s=0.0, max_tokens=4, prompt=f"turn {t}", request_id=f"c0-{t}",
                         conversation_id="c0", turn=t) for t in range(3)]
    path = save_trace(reqs + [TraceRequest(arrival_s=1.0, max_tokens=2, prompt_token_ids=[1, 2])], tmp_path / f"t{suffix}")
    loaded = load_trace(path)
    assert loaded[:3] == reqs and loaded[3].conversation_id is None


@pytest.mark.parametrize("row, field", [
    ({"arrival_s": 0, "max_tokens": 2, "prompt": "x", "turn": 0}, "conversation_id"),
    ({"arrival_s": 0, "max_tokens": 2, "prompt": "x", "conversation_id": "c"}, "turn"),
    ({"arrival_s": 0, "max_tokens": 2, "prompt_token_ids": [1], "conversation_id": "c", "turn": 0}, "prompt"),
    ({"arrival_s": 0, "max_tokens": 2, "prompt": "x", "conversation_id": "c", "turn": -1}, "turn"),
])
def test_bad_conversation_rows_are_refused(tmp_path, row, field):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(TraceError, match=f"field '{field}'"):
        load_trace(path)


def test_a_sharegpt_file_given_as_a_trace_points_to_the_dataset(tmp_path):
    path = tmp_path / "sg.jsonl"
    path.write_text(json.dumps({"id": "c0", "conversations": []}) + "\n")
    with pytest.raises(TraceError, match="--dataset sharegpt"):
        load_trace(path)
