"""Incremental detokenizer: the streamed text equals a full decode, stop strings are cut at the
earliest match and never half streamed, incomplete UTF-8 is held back until complete or final.
Benchmarks (pytest-benchmark: time per token of the old window decode, Rust's DecodeStream
and the decoder picked, on text and on a random model's ids; `LLM("tiny").generate` with
detokenization on and off) assert text only, never a time.
Run: pytest tests/engine/test_detokenizer.py   (timings: add --benchmark-only)"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engine import LLM, SamplingParams
from engine.detokenizer import (
    ByteLevelDecoder,
    IncrementalDetokenizer,
    StreamDecoder,
    WindowDecoder,
)
from engine.tokenizer import build_byte_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Ünïcödé façade, naïve café, smörgåsbord.",
    "日本語のテキストと中文文本，한국어 텍스트. Emoji: 🙂🚀👩‍💻 and math ∑∫√∞ ≤ ≥.",
    "def main():\n    return {'key': [1, 2, 3]}  # code, tabs\tand newlines\n",
    "Ελληνικά κείμενα, русский текст, עברית, العربية, हिन्दी — mixed scripts.",
] * 4


def build_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2/Qwen style byte-level BPE with learned merges, two special tokens and one added
    (non-special) token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens(["<tool>", "<tool> é"])  # the second has a character ByteLevel has no byte for
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def build_byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2 style sentencepiece BPE: '▁' for spaces, <0xNN> byte-fallback tokens, and a
    decoder that strips the first leading space."""
    pieces = ["▁the", "▁a", "hello", "▁", "é", "日本", "語", "▁fox", "ing", "s", "."]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    vocab.update({p: len(vocab) + i for i, p in enumerate(pieces)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


class SlowTokenizer:
    """Only `decode`, like a pure-Python tokenizer: the detokenizer must fall back to windows."""

    def __init__(self, fast: PreTrainedTokenizerFast):
        self._fast = fast

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._fast.decode(ids, skip_special_tokens=skip_special_tokens)


TOKENIZERS = {"byte": build_byte_tokenizer(), "bpe": build_bpe_tokenizer(),
              "byte_fallback": build_byte_fallback_tokenizer()}


def stream(detok: IncrementalDetokenizer, chunks: list[list[int]]) -> tuple[list[str], str | None]:
    deltas, stop = [], None
    for i, chunk in enumerate(chunks):
        text, stop = detok.add(chunk, final=i == len(chunks) - 1)
        deltas.append(text)
        if stop is not None:
            break
    return deltas, stop


def chunked(ids: list[int], cuts: list[int]) -> list[list[int]]:
    """Split ids at the given cut points (several tokens per call, as a speculative step or a
    server batching a step's tokens would)."""
    bounds = [0, *sorted({c % (len(ids) + 1) for c in cuts}), len(ids)]
    return [ids[a:b] for a, b in zip(bounds, bounds[1:]) if b > a] or [[]]


def byte_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def is_byte_fallback(tok, i: int) -> bool:
    return tok.convert_ids_to_tokens(i).startswith("<0x")


@st.composite
def id_sequences(draw, tok):
    """Random ids (some past the vocabulary) mixed with the ids of real multi-byte text, and cut
    points for several ids a call. ByteFallback decodes a run of <0xNN> tokens that is not
    valid UTF-8 as one U+FFFD per token, which changes text already decoded when a bad byte
    follows good ones (no incremental decoder can match a full decode there), so for such
    tokenizers byte tokens come only in whole characters, each character's bytes still one
    token apiece."""
    vocab = len(tok)
    if any(is_byte_fallback(tok, i) for i in range(vocab)):
        others = [i for i in range(vocab) if not is_byte_fallback(tok, i)]
        # ids past the vocabulary (a model's vocabulary may be larger) decode to nothing
        others += [vocab, vocab + 1, 151_935]
        groups = draw(st.lists(st.one_of(st.characters(codec="utf-8").map(lambda c: byte_ids(tok, c)),
                                         st.sampled_from(others).map(lambda i: [i])), max_size=30))
        ids = [i for g in groups for i in g]
    else:
        # random byte ids split characters and make invalid sequences; text ids make valid ones
        text_ids = byte_ids(tok, draw(st.text(max_size=12)))
        rand_ids = draw(st.lists(st.one_of(st.integers(0, vocab - 1), st.integers(vocab, 151_935)), max_size=30))
        ids = draw(st.permutations(text_ids + rand_ids)) if draw(st.booleans()) else rand_ids + text_ids
    return ids, draw(st.lists(st.integers(0, 64), max_size=6))


def make_detok(tok, decoder: str, stop: list[str] | None = None) -> IncrementalDetokenizer:
    """The detokenizer with the decoder it picks ("auto") or a forced one."""
    if decoder == "window":
        tok = SlowTokenizer(tok)
    detok = IncrementalDetokenizer(tok, stop or [])
    if decoder == "stream":
        detok.decoder = StreamDecoder(tok.backend_tokenizer)
    return detok


@pytest.mark.parametrize("name, picked", [("byte", ByteLevelDecoder), ("bpe", ByteLevelDecoder),
                                          ("byte_fallback", StreamDecoder)])
def test_each_tokenizer_gets_its_fastest_exact_decoder(name, picked):
    assert type(IncrementalDetokenizer(TOKENIZERS[name], []).decoder) is picked
    assert type(IncrementalDetokenizer(SlowTokenizer(TOKENIZERS[name]), []).decoder) is WindowDecoder


def test_space_clean_up_that_changes_text_falls_back_to_windows():
    """transformers' clean_up_tokenization_spaces rewrites " ." and the like after decoding, which
    the Rust decoders do not; transformers 5 skips it for BPE models unless forced."""
    text = "Hi , there . It 's fine !"
    skipped = build_byte_tokenizer()
    skipped.clean_up_tokenization_spaces = True
    assert type(IncrementalDetokenizer(skipped, []).decoder) is ByteLevelDecoder
    ids = byte_ids(skipped, text)
    assert "".join(stream(IncrementalDetokenizer(skipped, []), [[i] for i in ids])[0]) == skipped.decode(ids) == text
    forced = build_byte_tokenizer()
    forced.clean_up_tokenization_spaces = True
    forced.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    assert forced.decode(ids) != text  # the clean-up applies
    assert type(IncrementalDetokenizer(forced, []).decoder) is WindowDecoder


@pytest.mark.parametrize("decoder", ["auto", "stream"])
@pytest.mark.parametrize("name", TOKENIZERS)
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_streamed_text_equals_full_decode(name, decoder, data):
    tok = TOKENIZERS[name]
    ids, cuts = data.draw(id_sequences(tok))
    chunks = chunked(ids, cuts) if data.draw(st.booleans()) else [[i] for i in ids] or [[]]
    deltas, stop = stream(make_detok(tok, decoder), chunks)
    assert stop is None
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("name", ["byte", "byte_fallback"])
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_slow_tokenizer_fallback_equals_full_decode(name, data):
    tok = TOKENIZERS[name]
    ids, _ = data.draw(id_sequences(tok))
    deltas, _ = stream(IncrementalDetokenizer(SlowTokenizer(tok), []), [[i] for i in ids] or [[]])
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("decoder", ["auto", "stream", "window"])
def test_incomplete_utf8_is_held_back_until_complete(decoder):
    tok = TOKENIZERS["byte"]
    detok = make_detok(tok, decoder)
    ids = byte_ids(tok, "a日b")
    assert len(ids) == 5  # 日 is three bytes, one token each
    assert [detok.add([i])[0] for i in ids] == ["a", "", "", "日", "b"]


def test_final_call_flushes_an_incomplete_character_like_a_full_decode():
    tok = TOKENIZERS["byte"]
    ids = byte_ids(tok, "x日")[:-1]
    detok = IncrementalDetokenizer(tok, ["never"])
    deltas = [detok.add([i], final=k == len(ids) - 1)[0] for k, i in enumerate(ids)]
    assert deltas[:-1] == ["", ""] and "".join(deltas) == tok.decode(ids) == "x\ufffd"


@pytest.mark.parametrize("name", TOKENIZERS)
def test_special_tokens_are_skipped(name):
    tok = TOKENIZERS[name]
    ids = [*byte_ids(tok, "hi"), tok.eos_token_id, *byte_ids(tok, " there")]
    deltas, _ = stream(IncrementalDetokenizer(tok, []), [[i] for i in ids])
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == "hi there"


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("per_call", [1, 3])
def test_stop_string_split_across_tokens_and_calls(name, per_call):
    tok = TOKENIZERS[name]
    ids = byte_ids(tok, "hello world. STOP here STOP")
    chunks = [ids[i : i + per_call] for i in range(0, len(ids), per_call)]
    deltas, stop = stream(IncrementalDetokenizer(tok, ["STOP"]), chunks)
    assert stop == "STOP" and "".join(deltas) == "hello world. "


def test_earliest_stop_string_wins():
    tok = TOKENIZERS["byte"]
    deltas, stop = stream(IncrementalDetokenizer(tok, ["cd", "ab", "zzz"]), [byte_ids(tok, "xabcd")])
    assert stop == "ab" and deltas == ["x"]


def test_holdback_keeps_a_possible_stop_prefix_then_releases_it():
    tok = TOKENIZERS["byte"]
    detok = IncrementalDetokenizer(tok, ["abc"])
    # the last len("abc") - 1 characters stay back: "ab" could start "abc"
    assert [detok.add([i])[0] for i in byte_ids(tok, "xab")] == ["", "", "x"]
    assert detok.add(byte_ids(tok, "d")) == ("a", None)
    assert detok.add(byte_ids(tok, "e"), final=True) == ("bde", None)


def test_stream_that_loses_its_place_resumes_from_a_full_decode():
    """An invalid byte after a valid character turns the whole byte run into U+FFFDs, so the
    Rust stream's prefix no longer matches (it raises); the text sent already stays, the rest
    comes from a full decode, and a fresh stream carries on."""
    tok = TOKENIZERS["byte_fallback"]
    v = tok.get_vocab()
    ids = [*byte_ids(tok, "Ѿ"), v["<0x80>"], v["▁"], v["hello"], v["▁fox"], v["▁a"]]
    detok = IncrementalDetokenizer(tok, [])
    first_stream = detok.decoder._stream
    deltas = [detok.add([i], final=k == len(ids) - 1)[0] for k, i in enumerate(ids)]
    full = tok.decode(ids, skip_special_tokens=True)
    assert full.startswith("\ufffd") and deltas[:2] == ["", "Ѿ"]
    assert "".join(deltas[2:]) == full[1:] and deltas[-2:] == [" fox", " a"]
    assert detok.decoder._stream is not first_stream


def test_calls_after_a_stop_return_nothing():
    tok = TOKENIZERS["byte"]
    detok = IncrementalDetokenizer(tok, ["!"])
    assert detok.add(byte_ids(tok, "hi!yo")) == ("hi", "!")
    assert detok.add(byte_ids(tok, "more"), final=True) == ("", None)


def first_stop(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Brute force, one character at a time: the text before the first stop string to appear
    (the earliest-starting one if several complete on the same character)."""
    for k in range(1, len(text) + 1):
        hits = [(text[:k].find(s), s) for s in stops if s in text[:k]]
        if hits:
            idx, stop = min(hits)
            return text[:idx], stop
    return text, None


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="ab c", max_size=30),
       stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3))
def test_streamed_text_never_contains_part_of_a_stop_string(text, stops):
    """Deltas cannot be taken back, so streaming any part of a stop string would make the joined
    deltas differ from the text cut before the stop string."""
    tok = TOKENIZERS["byte"]
    ids = byte_ids(tok, text) or [tok.eos_token_id]
    deltas, stop = stream(IncrementalDetokenizer(tok, stops), [[i] for i in ids])
    assert ("".join(deltas), stop) == first_stop(text, stops)


# ---- benchmarks: per-token cost of the two decoders, and LLM.generate with/without detokenize --------
STREAMS, TOKENS = 256, 512


def interleaved_run(make, outputs: list[list[int]]) -> list[str]:
    """Feed one token per stream per step, as the engine does, and return each stream's text."""
    detoks = [make() for _ in outputs]
    pieces: list[list[str]] = [[] for _ in outputs]
    for t in range(len(outputs[0])):
        final = t == len(outputs[0]) - 1
        for d, ids, out in zip(detoks, outputs, pieces):
            out.append(d.add([ids[t]], final=final)[0])
    return ["".join(p) for p in pieces]


@pytest.mark.parametrize("decoder", ["window", "stream", "auto"])  # window: the old detokenizer
@pytest.mark.parametrize("name", ["byte", "bpe"])
def test_bench_detokenizer_per_token(benchmark, name, decoder):
    tok = TOKENIZERS[name]
    text_ids = byte_ids(tok, " ".join(CORPUS) * 4)
    outputs = [(text_ids[s * 7 :] + text_ids)[:TOKENS] for s in range(STREAMS)]
    texts = benchmark.pedantic(interleaved_run, args=(lambda: make_detok(tok, decoder), outputs),
                               rounds=2, iterations=1)
    benchmark.extra_info["tokens"] = STREAMS * TOKENS
    assert texts == [tok.decode(o, skip_special_tokens=True) for o in outputs]


@pytest.mark.parametrize("decoder", ["window", "stream", "auto"])
def test_bench_detokenizer_random_model_ids(benchmark, decoder):
    """A random-weight qwen3-0.6b samples ids over 151,936 while the presets' byte tokenizer
    knows 257: most ids decode to nothing, so a decoder that waits for text re-decodes an ever
    longer window (the old one, and DecodeStream); the byte table does not."""
    tok = TOKENIZERS["byte"]
    rng = random.Random(0)
    outputs = [[rng.randrange(151_936) for _ in range(TOKENS // 4)] for _ in range(STREAMS)]
    texts = benchmark.pedantic(interleaved_run, args=(lambda: make_detok(tok, decoder), outputs),
                               rounds=2, iterations=1)
    benchmark.extra_info["tokens"] = STREAMS * TOKENS // 4
    assert texts == [tok.decode(o, skip_special_tokens=True) for o in outputs]


@pytest.fixture(scope="module")
def tiny_llm():
    # one thread: the tiny model's forward is then steady, so the host work shows
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    llm = LLM("tiny", max_model_len=256, num_kv_blocks=1100, block_size=16)
    llm.engine.warm_up()
    yield llm
    llm.shutdown()  # unfreezes the heap warm_up froze
    torch.set_num_threads(threads)


@pytest.mark.parametrize("detokenize", [False, True])
def test_bench_generate_detokenize(benchmark, tiny_llm, detokenize):
    streams, tokens = 64, 192
    prompts = [[(7 * s + j) % 250 + 1 for j in range(32)] for s in range(streams)]
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, detokenize=detokenize)
    outs = benchmark.pedantic(tiny_llm.generate, args=(prompts, params), kwargs={"use_tqdm": False},
                              rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["tokens"] = streams * tokens
    tok = tiny_llm.engine.tokenizer
    for o in outs:
        assert len(o.outputs[0].token_ids) == tokens
        assert o.outputs[0].text == (tok.decode(o.outputs[0].token_ids, skip_special_tokens=True) if detokenize else "")


def test_add_until_stop_ends_at_the_token_that_completes_the_stop_string():
    tok = TOKENIZERS["byte"]
    ids = tok("ab STOP cd").input_ids  # byte tokenizer: one id per character
    detok = IncrementalDetokenizer(tok, ["STOP"])
    text, kept, hit = detok.add_until_stop(ids, final=False)
    assert (text, kept, hit) == ("ab ", len("ab STOP"), "STOP")
    # found on the token that ends the request anyway: that request's own reason stays
    last = IncrementalDetokenizer(tok, ["STOP"])
    assert last.add_until_stop(tok("ab STOP").input_ids, final=True) == ("ab ", len("ab STOP"), None)
    # no stop strings: every token kept, all text out
    assert IncrementalDetokenizer(tok, []).add_until_stop(ids, final=True) == ("ab STOP cd", len(ids), None)
