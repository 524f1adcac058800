"""The per-step message from the tensor-parallel driver to its workers: a `SchedulerOutput` as
a delta against the previous steps (vLLM v1's new-request / cached-request split).

A sequence is sent in full once (`NewSeq`: request id, sampling params, its block table so far,
the step's fields), when first scheduled and again after each preemption (its blocks were freed
and its KV is recomputed). After that it is a `CachedSeq`: its seq_no, the step's known tokens
(none for an async decode, whose one token is a placeholder filled on the device), the block
ids appended since it was last sent, and the step's other fields only where they differ from
what the previous step predicts (start_pos advances by the step's tokens, num_output_tokens by
one after a sampling step; `sample`, `placeholder` and `banned_token_ids` stay). The steady
state, a one-token decode with everything as predicted and no new block, is the bare seq_no
(its token, unless a placeholder, in a flat list beside).

`StepEncoder` (driver) and `StepDecoder` (each worker) keep the same table of sequence states,
keyed by seq_no (never reused), and drop entries when the scheduler reports a sequence freed
(`SchedulerOutput.freed_seq_nos`). The decoder rebuilds a `SchedulerOutput` equal field by field
to the driver's, so every rank prepares identical inputs. Messages must be decoded in the order
they were encoded (the control channel is ordered) and each one exactly once.

The encoder trusts the block manager's invariant that a sequence's block-table list is only ever
appended to while it holds blocks (freeing replaces the list): when the step's table is the same
list object as last time, only its new tail is read; any other list is compared in full, and
anything that is not an extension is sent as a new sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSequence, SchedulerOutput

_NONE: tuple[int, ...] = ()  # one empty sequence for "no tokens / no new blocks" (1 byte pickled)


class StepFields(NamedTuple):
    """A sequence's per-step fields, sent only when they differ from the prediction."""

    start_pos: int
    sample: bool
    num_output_tokens: int
    banned_token_ids: list[int]
    placeholder: bool


class NewSeq(NamedTuple):
    seq_no: int
    request_id: str
    num_preemptions: int
    sampling_params: SamplingParams
    block_table: list[int]
    token_ids: list[int]  # the step's tokens as scheduled (a trailing placeholder included)
    fields: StepFields


class CachedSeq(NamedTuple):
    seq_no: int
    token_ids: tuple[int, ...] | list[int]  # the step's known tokens: without the placeholder
    new_block_ids: tuple[int, ...] | list[int]  # appended to the block table since last sent
    fields: StepFields | None  # None: as predicted from the previous step


class StepDelta(NamedTuple):
    freed_seq_nos: list[int]  # applied before `seqs`
    # in the step's row order; a bare seq_no is a cached sequence's one-token decode with every
    # field as predicted and no new block (the steady state): its token is the placeholder, or
    # else the next of `decode_token_ids` (flat lists: far cheaper to pickle than tuples)
    seqs: list[NewSeq | CachedSeq | int]
    decode_token_ids: list[int]
    num_prefill_tokens: int
    num_decode_tokens: int
    num_preempted: int


@dataclass(slots=True)
class _SeqState:
    """What both ends know of a sequence after the last step that scheduled it: the fields
    predicted for its next step, and its block table."""

    request_id: str
    num_preemptions: int
    sampling_params: SamplingParams
    block_table: list[int]  # encoder: the scheduler's list object; decoder: its own copy
    num_blocks: int  # table length when last sent
    start_pos: int  # predicted for the next step
    sample: bool
    num_output_tokens: int  # predicted for the next step
    banned_token_ids: list[int]
    placeholder: bool

    def predicted(self, s: ScheduledSequence) -> bool:
        return (s.start_pos == self.start_pos and s.sample == self.sample
                and s.num_output_tokens == self.num_output_tokens and s.placeholder == self.placeholder
                and s.banned_token_ids == self.banned_token_ids)

    def take(self, f: StepFields) -> None:
        self.start_pos, self.sample, self.num_output_tokens, self.banned_token_ids, self.placeholder = f


def _fields(s: ScheduledSequence) -> StepFields:
    return StepFields(s.start_pos, s.sample, s.num_output_tokens, s.banned_token_ids, s.placeholder)


def _state(s: ScheduledSequence | NewSeq, f: StepFields, table: list[int]) -> _SeqState:
    return _SeqState(s.request_id, s.num_preemptions, s.sampling_params, table, len(table), *f)


class StepEncoder:
    """The driver's side: turns each `SchedulerOutput` into a `StepDelta`."""

    def __init__(self) -> None:
        self.seqs: dict[int, _SeqState] = {}

    def encode(self, out: SchedulerOutput) -> StepDelta:
        states = self.seqs
        for seq_no in out.freed_seq_nos:
            states.pop(seq_no, None)
        seqs: list[NewSeq | CachedSeq | int] = []
        decode_tokens: list[int] = []
        for s in out.seqs:
            seq_no, tokens = s.seq_no, s.token_ids
            st = states.get(seq_no)
            if (st is not None and len(tokens) == 1 and s.block_table is st.block_table
                    and len(s.block_table) == st.num_blocks and s.sampling_params is st.sampling_params
                    and s.num_preemptions == st.num_preemptions and st.predicted(s)):
                seqs.append(seq_no)  # the steady decode: nothing the worker cannot predict but its token
                if not s.placeholder:
                    decode_tokens.append(tokens[0])
                st.start_pos += 1
                st.num_output_tokens += st.sample
                continue
            new_ids = None if st is None else self._new_block_ids(st, s)
            if new_ids is None:
                f = _fields(s)
                seqs.append(NewSeq(seq_no, s.request_id, s.num_preemptions, s.sampling_params, list(s.block_table),
                                   tokens, f))
                st = states[seq_no] = _state(s, f, s.block_table)
            else:
                fields = None
                if not st.predicted(s):
                    fields = _fields(s)
                    st.take(fields)
                known = tokens[:-1] if s.placeholder else tokens
                if fields is None and not new_ids and len(tokens) == 1:
                    seqs.append(seq_no)  # as above, for a table that is another list with the same ids
                    decode_tokens.extend(known)
                else:
                    seqs.append(CachedSeq(seq_no, known or _NONE, new_ids, fields))
            st.start_pos += len(tokens)  # the next step's prediction
            st.num_output_tokens += st.sample
        return StepDelta(out.freed_seq_nos, seqs, decode_tokens, out.num_prefill_tokens, out.num_decode_tokens,
                         out.num_preempted)

    @staticmethod
    def _new_block_ids(st: _SeqState, s: ScheduledSequence) -> tuple[int, ...] | list[int] | None:
        """The block ids appended since `st` was sent, or None if `s` must be sent as new."""
        if s.num_preemptions != st.num_preemptions:
            return None
        if s.sampling_params is not st.sampling_params:
            if s.sampling_params != st.sampling_params:
                return None
            st.sampling_params = s.sampling_params  # an equal copy: identity serves next time
        table, n = s.block_table, st.num_blocks
        if table is not st.block_table:  # not the list we saw: check that it extends what was sent
            if len(table) < n or table[:n] != st.block_table[:n]:
                return None
            st.block_table = table
        if len(table) < n:  # the same list shrank: the append-only invariant broke, start over
            return None
        st.num_blocks = len(table)
        return table[n:] if len(table) > n else _NONE


class StepDecoder:
    """A worker's side: rebuilds the driver's `SchedulerOutput` from each `StepDelta`."""

    def __init__(self) -> None:
        self.seqs: dict[int, _SeqState] = {}

    def decode(self, delta: StepDelta) -> SchedulerOutput:
        states = self.seqs
        for seq_no in delta.freed_seq_nos:
            states.pop(seq_no, None)
        seqs = []
        decode_tokens = iter(delta.decode_token_ids)
        for d in delta.seqs:
            kind = type(d)
            if kind is NewSeq:
                seq_no = d.seq_no
                st = states[seq_no] = _state(d, d.fields, list(d.block_table))
                tokens = list(d.token_ids)
            else:
                seq_no = d if kind is int else d.seq_no
                st = states.get(seq_no)
                if st is None:
                    raise RuntimeError(f"step delta names sequence {seq_no}, which this worker does not hold "
                                       "(a step message was lost or decoded twice)")
                if kind is int:  # a one-token decode: the placeholder, or its known token
                    tokens = [0] if st.placeholder else [next(decode_tokens)]
                else:
                    if d.new_block_ids:
                        st.block_table.extend(d.new_block_ids)
                        st.num_blocks = len(st.block_table)
                    if d.fields is not None:
                        st.take(d.fields)
                    tokens = [*d.token_ids, 0] if st.placeholder else list(d.token_ids)
            seqs.append(ScheduledSequence(
                st.request_id, tokens, st.start_pos, st.block_table, st.sample, st.sampling_params,
                st.num_output_tokens, st.num_preemptions, st.banned_token_ids, seq_no, st.placeholder,
            ))
            st.start_pos += len(tokens)  # the next step's prediction
            st.num_output_tokens += st.sample
        return SchedulerOutput(seqs, delta.num_prefill_tokens, delta.num_decode_tokens, delta.num_preempted,
                               list(delta.freed_seq_nos))
