"""Sampler on CPU: temperature sampling follows the softmax, top-k/top-p restrict the support,
greedy rows take argmax, banned ids never appear. Run: pytest tests/test_sampler.py"""

from __future__ import annotations

import random

import torch

from engine.sampler import Sampler, SamplingMetadata
from engine.sampling_params import SamplingParams

N = 4000


def sample(logits: torch.Tensor, params: list[SamplingParams], banned=None) -> torch.Tensor:
    meta = SamplingMetadata.build(params, [0] * len(params), banned or [[] for _ in params],
                                  logits.shape[1], torch.device("cpu"), random.Random(0))
    return Sampler(seed=0, device=torch.device("cpu"))(logits, meta)


def test_temperature_sampling_follows_softmax():
    probs = torch.tensor([0.1, 0.2, 0.7])
    ids = sample(probs.log().repeat(N, 1), [SamplingParams(temperature=1.0)] * N)
    freq = torch.bincount(ids, minlength=3).float() / N
    assert torch.allclose(freq, probs, atol=0.03), freq
    # temperature 0.5 squares the odds before normalising
    sharp = probs**2 / (probs**2).sum()
    ids = sample(probs.log().repeat(N, 1), [SamplingParams(temperature=0.5)] * N)
    assert torch.allclose(torch.bincount(ids, minlength=3).float() / N, sharp, atol=0.03)


def test_top_k_top_p_restrict_support_and_greedy_rows():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]]).repeat(N, 1)
    top_k = sample(logits, [SamplingParams(temperature=1.0, top_k=2)] * N)
    assert set(top_k.tolist()) == {3, 4}
    # softmax of 0..4: the top token holds 0.64, the top two 0.87: top_p 0.7 keeps exactly two
    top_p = sample(logits, [SamplingParams(temperature=1.0, top_p=0.7)] * N)
    assert set(top_p.tolist()) == {3, 4}
    mixed = sample(logits[:2], [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=1)])
    assert mixed.tolist() == [4, 4]


def test_banned_ids_are_never_sampled():
    logits = torch.tensor([[5.0, 0.0, 0.0]]).repeat(200, 1)
    ids = sample(logits, [SamplingParams(temperature=1.0)] * 200, banned=[[0]] * 200)
    assert 0 not in ids.tolist()


class _TwoRanksGather:
    """Stands in for a TP group whose other rank holds `rest` (the rest of the vocabulary)."""

    def __init__(self, rest: torch.Tensor):
        self.rest = rest

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.rest], dim=-1)


def test_vocab_slice_without_the_one_pass_kernel_samples_the_gathered_rows():
    """A rank's vocabulary slice where the one-pass kernel does not apply (here: CPU, top-k and
    banned ids): the sampler gathers whole rows (the padding cut off) and samples those."""
    from engine.sampler import VocabShard

    vocab, per_rank = 9, 5
    logits = torch.randn(6, vocab)
    logits[0, 7] = 10.0  # greedy row 0 wins on the other rank's slice
    padded = torch.cat([logits, torch.full((6, 2 * per_rank - vocab), 50.0)], 1)  # padding would win
    shard = VocabShard(_TwoRanksGather(padded[:, per_rank:]), 0, per_rank, vocab)
    params = [SamplingParams(temperature=t, top_k=k) for t, k in ((0.0, 0), (1.0, 3), (0.7, 0))] * 2
    banned = [[], [], [int(logits[2].argmax())], [], [], []]
    meta = SamplingMetadata.build(params, [0] * 6, banned, vocab, torch.device("cpu"), random.Random(0))
    got = Sampler(seed=0, device=torch.device("cpu"))(padded[:, :per_rank], meta, shard)
    want = Sampler(seed=0, device=torch.device("cpu"))(logits, meta)
    assert torch.equal(got, want) and int(got[0]) == 7 and int(got.max()) < vocab
