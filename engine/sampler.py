"""Sampling on the device with no host sync: greedy rows take argmax; the others race
probs / Exp(1) noise (Gumbel-max in another guise). Seeded requests draw their noise from a
generator keyed by (seed, output index), so their tokens do not depend on batch composition."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from engine.distributed import TensorParallel
from engine.sampling_params import SamplingParams


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [B] float32, 0 = greedy
    top_k: torch.Tensor | None  # [B] int64 (vocab size where disabled); None if no row uses it
    top_p: torch.Tensor | None  # [B] float32; None if no row uses it
    all_greedy: bool
    seeded: list[tuple[int, int]]  # (row, generator seed)
    banned: list[tuple[int, list[int]]]  # (row, token ids masked out: min_tokens)
    row_seeds: list[int]  # per-row noise seed: the request's (seed, output index), else random

    @classmethod
    def build(cls, params: list[SamplingParams], output_lens: list[int], banned: list[list[int]],
              vocab_size: int, device: torch.device, rng: random.Random) -> SamplingMetadata:
        temps = [p.temperature for p in params]
        seeded = [(i, _request_seed(p.seed, n)) for i, (p, n) in enumerate(zip(params, output_lens))
                  if p.seed is not None and p.temperature > 0]
        row_seeds = [rng.getrandbits(31) for _ in params]
        for i, seed in seeded:
            row_seeds[i] = seed
        use_k = any(p.top_k > 0 for p in params)
        use_p = any(p.top_p < 1.0 for p in params)
        return cls(
            temperature=torch.tensor(temps, dtype=torch.float32).to(device, non_blocking=True),
            top_k=torch.tensor([min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params]).to(device)
            if use_k else None,  # top_k above the vocabulary means the whole vocabulary
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32).to(device) if use_p else None,
            all_greedy=all(t == 0.0 for t in temps),
            seeded=seeded,
            banned=[(i, ids) for i, ids in enumerate(banned) if ids],
            row_seeds=row_seeds,
        )


@dataclass(frozen=True)
class VocabShard:
    """Logits that hold one tensor-parallel rank's slice of the vocabulary: columns start ..
    start + num_cols of it, then padding up to the slice width (the last rank's)."""

    tp: TensorParallel
    start: int
    num_cols: int
    vocab_size: int

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        """The whole rows, [n, vocab_size], on every rank."""
        return self.tp.all_gather_last_dim(logits)[:, : self.vocab_size]


def _request_seed(seed: int, output_index: int) -> int:
    """A seed per (request seed, output position): the same tokens whatever the batch."""
    return (seed * 1_000_003 + output_index) & 0x7FFFFFFF


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask logits outside each row's top-k and nucleus (sort-based reference)."""
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    if top_k is not None:
        kth = sorted_logits.gather(1, (top_k - 1).clamp(min=0).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p
        before = probs.cumsum(-1) - probs
        sorted_logits = sorted_logits.masked_fill(before >= top_p.unsqueeze(1), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, idx, sorted_logits)


def _exp1(shape, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device).clamp_(min=1e-20).log_().neg_()


class Sampler:
    def __init__(self, seed: int, device: torch.device):
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.rng = random.Random(seed)  # row seeds for the GPU kernel's noise
        self.device = device

    def warm_up(self, logits: torch.Tensor, max_rows: int, shard: VocabShard | None = None) -> None:
        """Compile the one-pass kernels (GPU) in every variant a batch of 1 .. max_rows rows of
        logits like `logits` ([n, width]) picks: each chunk size is its own compiled kernel, and
        the first steps to need one (a timed run's, say) would otherwise pay the compile."""
        if not logits.is_cuda:
            return
        from engine.kernels.sample import gumbel_chunks, pick_from_chunks

        groups = shard.tp.size if shard is not None else 1
        for rows in sorted({1, max_rows}):
            x = torch.zeros(rows, logits.shape[1], dtype=logits.dtype, device=logits.device)
            temperature = torch.ones(rows, dtype=torch.float32, device=logits.device)
            seeds = torch.zeros(rows, dtype=torch.int64, device=logits.device)
            chunks = gumbel_chunks(x, temperature, seeds, *((shard.start, shard.num_cols) if shard else ()))
            pick_from_chunks(chunks.expand(groups, *chunks.shape).contiguous())  # as all-gathered over TP

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata,
                 shard: VocabShard | None = None) -> torch.Tensor:  # [B, V] -> [B]
        """`shard`: the logits are this rank's slice of the vocabulary. The one-pass kernel samples
        the slice and the ranks exchange their chunk winners; other paths gather whole rows."""
        one_pass = logits.is_cuda and meta.top_k is None and meta.top_p is None
        if shard is not None and not (one_pass and not meta.banned):
            logits, shard = shard.gather(logits), None
        if meta.banned:
            logits = logits.float()  # a copy: the graph's logits buffer stays untouched
            for row, ids in meta.banned:
                logits[row, ids] = float("-inf")
        if one_pass:
            from engine.kernels.sample import gumbel_argmax, gumbel_chunks, pick_from_chunks

            seeds = torch.tensor(meta.row_seeds, dtype=torch.int64).to(logits.device, non_blocking=True)
            if shard is None:
                return gumbel_argmax(logits, meta.temperature, seeds)
            chunks = gumbel_chunks(logits, meta.temperature, seeds, shard.start, shard.num_cols)
            return pick_from_chunks(shard.tp.all_gather(chunks))  # same seeds on every rank: same ids
        greedy = logits.argmax(dim=-1)
        if meta.all_greedy:
            return greedy
        logits = logits.float() / meta.temperature.clamp(min=1e-5).unsqueeze(1)
        if meta.top_k is not None or meta.top_p is not None:
            logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p)
        probs = logits.softmax(dim=-1)
        # Exp(1) noise as -log(U): on CPU torch.rand + log is ~1.5x faster than exponential_
        noise = _exp1(probs.shape, self.generator, probs.device)
        for row, seed in meta.seeded:
            gen = torch.Generator(device=probs.device).manual_seed(seed)
            noise[row] = _exp1(probs.shape[1:], gen, probs.device)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(meta.temperature == 0, greedy, sampled)
