"""harness/sse.py: the SSE parser and token counting both load generators share."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.sse import (
    EventReader,
    SSEDecoder,
    StreamError,
    StreamState,
    choice_tokens,
    fast_token_count,
)


def chunk(ids, finish=None, text="x", **extra) -> bytes:
    choice = {"index": 0, "finish_reason": finish, "token_ids": ids, "text": text, "logprobs": None}
    return json.dumps({"id": "cmpl-1", "object": "text_completion", "choices": [choice], **extra},
                      separators=(",", ":")).encode()


def usage_chunk(prompt=5, completion=3, cached=2) -> bytes:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion,
             "prompt_tokens_details": {"cached_tokens": cached}}
    return json.dumps({"id": "cmpl-1", "choices": [], "usage": usage}).encode()


def sse(*payloads: bytes, sep: bytes = b"\n") -> bytes:
    return b"".join(b"data: " + p + sep + sep for p in payloads)


def test_decoder_splits_events_across_arbitrary_chunk_boundaries():
    stream = sse(chunk([1]), chunk([2, 3]), b"[DONE]")
    for cut in range(1, len(stream)):
        dec = SSEDecoder()
        got = dec.feed(stream[:cut]) + dec.feed(stream[cut:]) + dec.close()
        assert got == [chunk([1]), chunk([2, 3]), b"[DONE]"], cut


@given(st.lists(st.integers(1, 40), max_size=30), st.sampled_from([b"\n", b"\r\n", b"\r"]))
def test_decoder_any_split_any_line_end(cuts, sep):
    payloads = [chunk([i, i + 1]) for i in range(5)] + [b"[DONE]"]
    stream = sse(*payloads, sep=sep)
    dec, got, pos = SSEDecoder(), [], 0
    for c in cuts:
        got += dec.feed(stream[pos:pos + c])
        pos += c
    got += dec.feed(stream[pos:]) + dec.close()
    assert got == payloads


def test_decoder_general_events():
    dec = SSEDecoder()
    stream = b": ping\n\nevent: message\nid: 7\ndata:{\"a\":\ndata: 1}\n\nretry: 10\n\ndata: tail"
    assert dec.feed(stream) == [b'{"a":\n1}']
    assert dec.close() == [b"tail"]  # a last event without its blank line still counts
    assert dec.close() == []


def test_fast_count_agrees_with_json_and_declines_what_it_cannot_count():
    assert fast_token_count(chunk([])) == 0
    assert fast_token_count(chunk([7])) == 1
    assert fast_token_count(chunk([7, 8, 9, 10])) == 4
    # finish_reason set, usage present, an error, no ids, several choices: full decode
    assert fast_token_count(chunk([7], finish="stop")) is None
    assert fast_token_count(chunk([7], usage={"completion_tokens": 1})) is None
    assert fast_token_count(b'{"error":{"message":"boom"}}') is None
    assert fast_token_count(b'{"choices":[{"finish_reason":null,"text":"hi"}]}') is None
    two = json.dumps({"choices": [{"finish_reason": None, "token_ids": [1]},
                                  {"finish_reason": None, "token_ids": [2, 3]}]}).encode()
    assert fast_token_count(two) is None
    # patterns inside a string value are escaped, so they never match
    tricky = chunk([1, 2], text='"token_ids":[1,2,3,4] "usage" "error"')
    assert fast_token_count(tricky) == 2


def test_choice_tokens_without_ids():
    assert choice_tokens({"text": "hi"}) == 1 and choice_tokens({"text": ""}) == 0
    assert choice_tokens({"delta": {"content": "hi"}}) == 1
    assert choice_tokens({"delta": {"role": "assistant", "content": ""}}) == 0
    assert choice_tokens({"delta": {"content": "a"}, "token_ids": [1, 2, 3]}) == 3


def test_state_counts_times_usage_and_finish():
    st_ = StreamState()
    events = [(chunk([], text=""), 0.5), (chunk([1]), 1.0), (chunk([2, 3, 4]), 2.0),
              (chunk([5], finish="length"), 3.0), (usage_chunk(completion=5), 3.1)]
    for data, t in events:
        assert st_.on_data(data, t) is False
    assert st_.on_data(b"[DONE]", 3.2) is True and st_.done
    assert st_.first_token == 1.0  # the empty chunk carries no token
    assert st_.token_times() == [1.0, 2.0, 2.0, 2.0, 3.0]
    assert st_.num_tokens == 5 and st_.finish_reason == "length"
    assert st_.usage_counts() == (5, 5, 2)


def test_state_without_usage_counts_chunks_and_text():
    st_ = StreamState()
    st_.on_data(b'{"choices":[{"delta":{"role":"assistant","content":""},"finish_reason":null}]}', 0.1)
    st_.on_data(b'{"choices":[{"delta":{"content":"ab"},"finish_reason":null}]}', 0.2)
    st_.on_data(b'{"choices":[{"delta":{"content":"c"},"finish_reason":"stop"}]}', 0.3)
    assert st_.first_token == 0.2 and st_.token_times() == [0.2, 0.3]
    assert st_.usage_counts() == (0, 2, 0) and st_.finish_reason == "stop"


@pytest.mark.parametrize("data, match", [(b'{"error":{"message":"engine died"}}', "engine died"),
                                         (b'{"error":"plain"}', "plain"),
                                         (b"not json", "not JSON"), (b"[1,2]", "not a JSON object")])
def test_state_errors(data, match):
    with pytest.raises(StreamError, match=match):
        StreamState().on_data(data, 0.0)


def test_event_reader_times_events_by_read_and_stops_at_done():
    reader = EventReader(t0=10.0)
    wire = sse(chunk([1]), chunk([2, 3], finish="stop"), b"[DONE]", chunk([9]))
    assert reader.feed(wire[:20], 11.0) is False
    assert reader.feed(wire[20:], 12.5) is True
    reader.close(13.0)
    # both chunks completed in the second read; the chunk after [DONE] is ignored
    assert reader.state.token_times() == [2.5, 2.5, 2.5] and reader.done_at == 2.5
    tail = EventReader()
    tail.feed(b"data: " + chunk([4], finish="length"), 1.0)  # no blank line: the body just ends
    tail.close(2.0)
    assert tail.state.token_times() == [2.0] and tail.state.finish_reason == "length"
