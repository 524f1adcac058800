"""Token deltas -> text deltas, in the API process: detokenization and stop strings.

The engine core returns token ids only. Each request's `OutputProcessor` runs them through an
`IncrementalDetokenizer` and, when a stop string appears, ends the request itself with
finish_reason "stop" (stop_reason = the string); the caller then aborts it in the engine, and
tokens the engine made after that one are dropped. This is what `LLMEngine._process` does for
in-process callers: the token that completed the stop string is the last one returned, the text
is cut before the stop string, and a stop string found on the token that also ended the request
for another reason (length, eos) leaves that reason in place.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import RequestDelta
from engine.sampling_params import SamplingParams
from engine.serve.engine_client import TokenDelta


class OutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, params: SamplingParams):
        self._detok = IncrementalDetokenizer(tokenizer, params.stop)
        self.stopped = False  # a stop string ended it here: the engine must be told (abort)

    def process(self, delta: TokenDelta) -> RequestDelta:
        ids, finished = delta.new_token_ids, delta.finished
        reason, stop_reason = delta.finish_reason, delta.stop_reason
        text = ""
        if ids:  # else an abort (or an empty final delta): nothing to decode
            text, kept, hit = self._detok.add_until_stop(ids, finished)
            if hit is not None:
                ids, finished, reason, stop_reason = ids[:kept], True, "stop", hit
                self.stopped = True
        return RequestDelta(delta.request_id, ids, text, finished, reason if finished else None,
                            delta.num_prompt_tokens, delta.num_cached_tokens,
                            stop_reason if finished else None)
