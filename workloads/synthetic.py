"""Synthetic text prompts of exact token lengths, as GuideLLM's synthetic_text and vLLM's random
dataset make them: real words (so a server tokenizes ordinary text), sized with the model's
own tokenizer.

    text = exact_length_text(TokenCounter(tok), 128, random.Random(0))   # count(text) == 128
    synthetic_text(tokenizer, input_len=256, output_len=64, range_ratio=0.5, num_prompts=100)

How a length is hit: sample words from the built-in corpus until their tokens cover the
target, cut the ids to the target (less the tokens the tokenizer adds to every prompt, e.g. a
BOS), decode, and count the decoded text again. Decode-then-encode is not always the identity
(a cut inside a word can merge differently), so the cut moves by the miss and is retried; when
the cuts start to repeat, the next try starts one token further into the word stream. A length
that no retry hits raises ValueError (it never returns a near miss).
"""

from __future__ import annotations

import math
import random
from typing import Any

from workloads.generators import assign_arrivals
from workloads.tokens import TokenCounter
from workloads.trace import TraceRequest

# Plain words (no punctuation): any tokenizer turns them into ordinary text tokens.
CORPUS = tuple("""
the of and to in is that it was for on are with as his they be at one have this from or had by
word but what some we can out other were all there when up use your how said an each she which
do their time if will way about many then them write would like so these her long make thing see
him two has look more day could go come did number sound no most people my over know water than
call first who may down side been now find any new work part take get place made live where after
back little only round man year came show every good me give our under name very through just
form sentence great think say help low line differ turn cause much mean before move right boy old
too same tell does set three want air well also play small end put home read hand port large spell
add even land here must big high such follow act why ask men change went light kind off need house
picture try us again animal point mother world near build self earth father head stand own page
should country found answer school grow study still learn plant cover food sun four between state
keep eye never last let thought city tree cross farm hard start might story saw far sea draw left
late run while press close night real life few north open seem together next white children begin
got walk example ease paper group always music those both mark often letter until mile river car
feet care second book carry took science eat room friend began idea fish mountain stop once base
hear horse cut sure watch color face wood main enough plain girl usual young ready above ever red
list though feel talk bird soon body dog family direct pose leave song measure door product black
short numeral class wind question happen complete ship area half rock order fire south problem
piece told knew pass since top whole king space heard best hour better true during hundred five
remember step early hold west ground interest reach fast verb sing listen six table travel less
morning ten simple several vowel toward war lay against pattern slow center love person money
serve appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall
lead cry dark machine note wait plan figure star box noun field rest correct able pound done beauty
drive stood contain front teach week final gave green quick develop ocean warm free minute strong
""".split())
MAX_TRIES = 64


def _word_ids(counter: TokenCounter, rng: random.Random, need: int) -> list[int]:
    """Content ids of sampled words, at least `need` of them (encoded as one text, so the ids
    are the tokenization of running text, not of isolated words)."""
    words: list[str] = []
    ids: list[int] = []
    while len(ids) < need:
        words += rng.choices(CORPUS, k=max(16, need - len(ids)))
        ids = counter.content_ids(" ".join(words))
    return ids


def exact_length_text(counter: TokenCounter, length: int, rng: random.Random) -> str:
    """A text of sampled words whose prompt token count is exactly `length`."""
    added = counter.count("x") - len(counter.content_ids("x"))  # BOS and friends, per prompt
    if length < added + 1:
        raise ValueError(f"a prompt of {length} tokens cannot hold any text: this tokenizer adds "
                         f"{added} special token(s) to every prompt")
    need = length - added
    pool = _word_ids(counter, rng, need + 64)
    start, cut, seen = 0, need, set()
    for _ in range(MAX_TRIES):
        text = counter.decode(pool[start:start + cut])
        got = counter.count(text) if text.strip() else 0
        if got == length and text.strip():
            return text
        seen.add((start, cut))
        cut = max(1, cut + length - got)
        if (start, cut) in seen or start + cut > len(pool):
            start, cut = start + 1, need  # a cycle: try another stretch of the word stream
            if start + cut > len(pool):
                pool += _word_ids(counter, rng, need + 64)
    raise ValueError(f"could not build a text of exactly {length} tokens in {MAX_TRIES} tries")


def _check_length(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _bounds(length: int, range_ratio: float) -> tuple[int, int]:
    # vLLM's random dataset: floor(len * (1 - r)) .. ceil(len * (1 + r)), both inclusive.
    return max(1, math.floor(length * (1 - range_ratio))), math.ceil(length * (1 + range_ratio))


def synthetic_text(tokenizer: Any, input_len: int = 256, output_len: int = 128, range_ratio: float = 0.0,
                   num_prompts: int = 100, seed: int = 0, ignore_eos: bool = True, rate: float = math.inf,
                   burstiness: float = 1.0) -> list[TraceRequest]:
    """Text prompts of exact token lengths uniform in input_len's range (vLLM's range_ratio
    form), max_tokens uniform in output_len's; ignore_eos (default True) makes the output
    lengths what the trace says, as the token-id generators do."""
    _check_length("input_len", input_len)
    _check_length("output_len", output_len)
    _check_length("num_prompts", num_prompts)
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    counter, rng = TokenCounter(tokenizer), random.Random(seed)
    in_lo, in_hi = _bounds(input_len, range_ratio)
    out_lo, out_hi = _bounds(output_len, range_ratio)
    requests = []
    for i in range(num_prompts):
        n_in, n_out = rng.randint(in_lo, in_hi), rng.randint(out_lo, out_hi)
        requests.append(TraceRequest(arrival_s=0.0, max_tokens=n_out, prompt=exact_length_text(counter, n_in, rng),
                                     request_id=f"synthetic-{i:05d}", ignore_eos=ignore_eos))
    return assign_arrivals(requests, rate, burstiness, seed)
