"""Tensor parallelism: the sharded layers against their unsharded maths (in-process), greedy
tokens of TP=2 and TP=4 on CPU (gloo) identical to TP=1 and to HF transformers (also with async
scheduling, and seeded samples), worker failures surfacing in the caller with no process left
behind, and TP=2 vs TP=1 on two GPUs (NCCL).
Run: pytest tests/test_tensor_parallel.py"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

import psutil
import pytest
import torch
import torch.nn.functional as F
from checkpoints import assert_bf16_near, assert_matches_hf, build_checkpoint, hf_greedy

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.distributed import (
    FUSED_MAX_PROGRAMS,
    PUSH_MAX_ROWS,
    SymmetricLayout,
    TensorParallel,
    symmetric_memory_used,
)
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.norm import RMSNorm
from engine.tp_worker import AUTHKEY_ENV, FAIL_ENV

MAX_NEW = 8
_rng = random.Random(7)
_SHARED = [_rng.randrange(256) for _ in range(33)]
PROMPTS = [[_rng.randrange(256) for _ in range(n)] for n in (1, 6, 17, 40)]
PROMPTS += [_SHARED + [_rng.randrange(256) for _ in range(n)] for n in (2, 9)]
CPU = dict(device="cpu", dtype="float32", block_size=16, max_model_len=128, num_kv_blocks=48)
REPO = str(Path(__file__).resolve().parents[2])
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


# ---- layers, one rank at a time in this process ---------------------------------------------
@dataclasses.dataclass(frozen=True)
class SimTP(TensorParallel):
    """A rank whose all-reduce returns a given total (the test computes it from every rank)."""

    total: torch.Tensor | None = None

    def all_reduce(self, x):
        return x if self.total is None else x.copy_(self.total)

    def all_gather_last_dim(self, x):
        return x


@pytest.mark.parametrize("vocab,size", [(301, 2), (9, 4), (300, 4)])
def test_vocab_parallel_embedding_and_head(vocab, size):
    full, ids, hidden = torch.randn(vocab, 8), torch.arange(vocab), torch.randn(5, 8)
    embed = [VocabParallelEmbedding(vocab, 8, SimTP(r, size)) for r in range(size)]
    for e in embed:
        e.weight.weight_loader(e.weight, full)
    assert torch.equal(sum(e(ids) for e in embed), F.embedding(ids, full))  # each id found on one rank
    heads = [ParallelLMHead(vocab, 8, SimTP(r, size)) for r in range(size)]
    for h, e in zip(heads, embed):
        h.weight = e.weight  # tied, as in Qwen3
    logits = torch.cat([h(hidden) for h in heads], dim=-1)[:, :vocab]  # what the all-gather builds
    torch.testing.assert_close(logits, hidden @ full.T)


@pytest.mark.parametrize("heads,kv_heads,size", [(4, 2, 2), (8, 4, 4), (8, 2, 2)])
def test_qkv_shards_keep_gqa_groups(heads, kv_heads, size):
    d, hidden = 4, 16
    q, k, v = torch.randn(heads * d, hidden), torch.randn(kv_heads * d, hidden), torch.randn(kv_heads * d, hidden)
    bias = {name: torch.randn(w.shape[0]) for name, w in (("q", q), ("k", k), ("v", v))}
    x = torch.randn(3, hidden)
    fq, fk, fv = (x @ w.T + bias[n] for n, w in (("q", q), ("k", k), ("v", v)))
    for r in range(size):
        layer = QKVParallelLinear(hidden, d, heads, kv_heads, True, SimTP(r, size))
        for name, w in (("q", q), ("k", k), ("v", v)):
            layer.weight.weight_loader(layer.weight, w, name)
            layer.bias.weight_loader(layer.bias, bias[name], name)
        lq, lk, lv = layer(x).split([layer.num_heads * d, layer.num_kv_heads * d, layer.num_kv_heads * d], dim=-1)
        hq, hkv = heads // size, kv_heads // size
        torch.testing.assert_close(lq, fq[:, r * hq * d : (r + 1) * hq * d])
        torch.testing.assert_close(lk, fk[:, r * hkv * d : (r + 1) * hkv * d])
        torch.testing.assert_close(lv, fv[:, r * hkv * d : (r + 1) * hkv * d])
        # local q head j reads local kv head j // group: the same pairing as the full model's
        group = heads // kv_heads
        assert all((r * hq + j) // group == r * hkv + j // group for j in range(hq))


def test_mlp_shards_and_row_parallel_bias_added_once():
    size, hidden, inter = 2, 8, 12
    gate, up, down, bias = torch.randn(inter, hidden), torch.randn(inter, hidden), torch.randn(hidden, inter), torch.randn(hidden)
    x = torch.randn(3, hidden)
    want = F.linear(F.silu(x @ gate.T) * (x @ up.T), down, bias)
    partials, ups = [], []
    for r in range(size):
        gu = MergedColumnParallelLinear(hidden, [inter, inter], False, SimTP(r, size))
        gu.weight.weight_loader(gu.weight, gate, 0)
        gu.weight.weight_loader(gu.weight, up, 1)
        g, u = gu(x).chunk(2, dim=-1)
        ups.append(F.silu(g) * u)
        partials.append(ups[-1] @ down[:, r * inter // size : (r + 1) * inter // size].T)
    total = sum(partials)
    for r in range(size):
        row = RowParallelLinear(inter, hidden, True, SimTP(r, size, total=total))
        row.weight.weight_loader(row.weight, down)
        row.bias.weight_loader(row.bias, bias)
        torch.testing.assert_close(row(ups[r]), want)


def test_row_parallel_partial_sums_are_summed_by_the_next_norm():
    """reduce=False: o_proj / down_proj hand their partial sums to the RMSNorm after them."""
    size, inter, hidden = 2, 12, 8
    down, xs = torch.randn(hidden, inter), [torch.randn(3, inter // size) for _ in range(size)]
    partials = [x @ down[:, r * inter // size:(r + 1) * inter // size].T for r, x in enumerate(xs)]
    residual, total = torch.randn(3, hidden), sum(partials)
    norm = RMSNorm(hidden)
    norm.weight.data.uniform_(0.5, 1.5)
    for r in range(size):
        tp = SimTP(r, size, total=total)
        row = RowParallelLinear(inter, hidden, False, tp, reduce=False)
        row.weight.weight_loader(row.weight, down)
        part = row(xs[r])
        torch.testing.assert_close(part, partials[r])  # not summed here
        got, got_res = norm(part, residual, tp)
        torch.testing.assert_close(got_res, total + residual)
        torch.testing.assert_close(got, norm(total + residual))
    with pytest.raises(ValueError, match="bias"):
        RowParallelLinear(inter, hidden, True, SimTP(0, size), reduce=False)


@pytest.mark.parametrize("world", [2, 3, 8])
@pytest.mark.parametrize("push_slot", [0, 40])
def test_symmetric_buffer_regions_never_overlap(world, push_slot):
    """torch's region, the push receive slots (one per sending rank), every rank's barrier
    partial-sum slot and the barrier signals are disjoint and inside the buffer; a rank's GEMM
    writes only its own slots."""
    layout = SymmetricLayout(region=1000, slot=96, world=world, push_slot=push_slot, itemsize=2)
    spans = [(0, layout.region)]
    for slot in (0, 1):
        starts = [layout.own_starts(slot, rank) for rank in range(world)]
        assert len({push for push, _ in starts}) == (world if push_slot else 1)  # a receive slot per sender
        assert len({barrier for _, barrier in starts}) == 1  # each rank its own buffer's one slot
        spans += [(push, push + push_slot) for push, _ in starts]
    spans += [(layout.own_starts(slot, 0)[1], layout.own_starts(slot, 0)[1] + layout.slot) for slot in (0, 1)]
    assert layout.numel - layout.signals_start == FUSED_MAX_PROGRAMS * world * 4 // 2
    spans.append((layout.signals_start, layout.numel))
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert spans[-1][1] == layout.numel


def test_symmetric_layout_picks_the_protocol_by_rows():
    """Decode-sized partials go to the push receive slots, larger ones (prefill) to the barrier
    slot, and what fits neither to NCCL (None)."""
    hidden = 8
    layout = SymmetricLayout(region=64, slot=(PUSH_MAX_ROWS + 40) * hidden, world=2,
                             push_slot=PUSH_MAX_ROWS * hidden, itemsize=2)
    push, barrier = layout.own_starts(1, rank=1)
    assert layout.own_start(3, hidden, 1, 1) == push
    assert layout.own_start(PUSH_MAX_ROWS, hidden, 1, 1) == push
    assert layout.own_start(PUSH_MAX_ROWS + 1, hidden, 1, 1) == barrier
    assert layout.own_start(PUSH_MAX_ROWS + 41, hidden, 1, 1) is None
    no_push = SymmetricLayout(region=64, slot=16 * hidden, world=2, push_slot=0, itemsize=2)
    assert no_push.own_start(3, hidden, 0, 0) == no_push.own_starts(0, 0)[1]


def test_merged_column_rejects_uneven_parts():
    with pytest.raises(ValueError, match="not divisible"):
        MergedColumnParallelLinear(8, [6, 10], False, SimTP(0, 4))


# ---- engines ---------------------------------------------------------------------------------
def worker_children() -> list[psutil.Process]:
    """Our spawned children (multiprocessing's resource tracker aside)."""
    kids = [" ".join(_cmdline(p)) for p in psutil.Process().children(recursive=True)]
    return [c for c in kids if "spawn_main" in c and "resource_tracker" not in c]


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def assert_gone(pids: list[int], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.05)
    assert not alive, f"worker processes left behind: {alive}"
    assert not worker_children()


def run(engine: LLMEngine, prompts=PROMPTS, params: SamplingParams = GREEDY,
        stats: list | None = None) -> tuple[list[list[int]], int]:
    """Tokens per prompt and the prefix-cache hits; each step's stats go to `stats` if given."""
    ids = [engine.add_request(None, p, params) for p in prompts]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    hits = 0
    while engine.has_unfinished_requests():
        for d in engine.step():
            tokens[d.request_id] += d.new_token_ids
        hits = engine.last_step_stats.prefix_hit_tokens
        if stats is not None:
            stats.append(engine.last_step_stats)
    return [tokens[i] for i in ids], hits


def tp_vs_tp1(path: str, size: int, by_gc: bool = False, **mode) -> None:
    """TP=`size` greedy tokens equal TP=1's and HF's (a difference is accepted only at an HF
    near-tie); the workers must be gone after shutdown (or after garbage collection)."""
    reference = hf_greedy(path, PROMPTS, MAX_NEW)
    want, _ = run(LLMEngine(EngineConfig(model=path, **CPU, **mode)))
    engine = LLMEngine(EngineConfig(model=path, tensor_parallel_size=size, **CPU, **mode))
    pids = engine.executor.workers.pids
    assert len(pids) == size - 1 and all(psutil.pid_exists(p) for p in pids)
    try:
        got, _ = run(engine)
        if mode.get("enable_prefix_caching"):
            again, hits = run(engine)  # second pass: the prompts' full blocks come from the cache
            assert again == got and hits > 0
    finally:
        if by_gc:
            del engine
            gc.collect()
        else:
            engine.shutdown()
    assert_gone(pids)
    assert_matches_hf(want, reference)
    assert_matches_hf(got, reference)
    assert_matches_hf(got, [(w, gaps) for w, (_, gaps) in zip(want, reference)])


@pytest.fixture(scope="module")
def qwen3_gqa8(tmp_path_factory) -> str:
    """8 query / 4 kv heads (TP=4 divides both) and a vocabulary TP=4 does not divide."""
    return build_checkpoint("qwen3", str(tmp_path_factory.mktemp("ckpt") / "qwen3_8_4"), num_heads=8,
                            num_kv_heads=4, vocab_size=301)


@pytest.mark.parametrize("arch,mode", [
    ("llama", {"enable_prefix_caching": False, "enable_chunked_prefill": False}),
    ("qwen3", {"enable_prefix_caching": True, "enable_chunked_prefill": True,
               "max_num_batched_tokens": 16, "max_num_seqs": 4}),
])
def test_tp2_matches_tp1_and_hf(arch, mode, checkpoint_dirs):
    tp_vs_tp1(checkpoint_dirs[arch], 2, **mode)


def test_tp4_matches_tp1_and_hf(qwen3_gqa8):
    tp_vs_tp1(qwen3_gqa8, 4, by_gc=True)


# plan step N+1 before step N's tokens reach the host, with preemption and chunking in play
ASYNC = {**CPU, "async_scheduling": True, "num_kv_blocks": 10, "max_num_batched_tokens": 16}
# seeded: a request's noise depends on (seed, output index) only, not on how steps were batched
SEEDED = SamplingParams(temperature=0.8, top_p=0.95, seed=11, max_tokens=MAX_NEW, ignore_eos=True)


def test_tp2_async_scheduling_matches_tp1(checkpoint_dirs):
    """Under TP every rank fills the next step's placeholder tokens from its own sampled ids:
    a rank filling a different token would put different KV in its shard and change the output.
    Greedy tokens must match TP=1 (sync) and HF; seeded samples must equal TP=1's."""
    path = checkpoint_dirs["qwen3"]
    reference = hf_greedy(path, PROMPTS, MAX_NEW)
    tp1 = LLMEngine(EngineConfig(model=path, **{**ASYNC, "async_scheduling": False}))
    want, _ = run(tp1)
    want_sampled, _ = run(tp1, params=SEEDED)
    engine = LLMEngine(EngineConfig(model=path, tensor_parallel_size=2, **ASYNC))
    pids = engine.executor.workers.pids
    group_holder = weakref.ref(engine.executor.shard.runner.tp)
    stats: list = []
    try:
        assert engine.async_scheduling
        got, _ = run(engine, stats=stats)
        got_sampled, _ = run(engine, params=SEEDED, stats=stats)
    finally:
        gc.disable()  # only shutdown may free it
        try:
            engine.shutdown()
        finally:
            gc.enable()
    assert_gone(pids)
    # rank 0's process group is freed at shutdown, not left to interpreter teardown (where
    # gloo's threads sometimes abort the process: seen under torchrun)
    assert group_holder() is None
    assert sum(s.num_preempted for s in stats) > 0
    assert any(s.num_prefill_tokens and s.num_decode_tokens for s in stats), "no mixed prefill+decode step"
    assert_matches_hf(got, reference)
    assert_matches_hf(got, [(w, gaps) for w, (_, gaps) in zip(want, reference)])
    assert got_sampled == want_sampled
    assert got_sampled != got  # the sampled run did sample


@pytest.mark.parametrize("async_scheduling,prefix_caching", [(False, True), (False, False), (True, False)])
def test_tp2_step_deltas_under_preemption_match_tp1_and_hf(checkpoint_dirs, async_scheduling, prefix_caching):
    """Workers rebuild each step from a delta (engine/step_delta.py): a sequence's table and
    params once, then new block ids and changed fields; a preempted sequence comes back in full.
    A worker that rebuilt a different step would write different KV into its shard or sample
    from different rows, and the tokens would differ from TP=1's. (The async run with prefix
    caching on is test_tp2_async_scheduling_matches_tp1.)"""
    path = checkpoint_dirs["llama"]
    mode = {**ASYNC, "async_scheduling": async_scheduling, "enable_prefix_caching": prefix_caching}
    reference = hf_greedy(path, PROMPTS, MAX_NEW)
    want, _ = run(LLMEngine(EngineConfig(model=path, **{**mode, "async_scheduling": False})))
    engine = LLMEngine(EngineConfig(model=path, tensor_parallel_size=2, **mode))
    pids = engine.executor.workers.pids
    stats: list = []
    try:
        got, _ = run(engine, stats=stats)
        again, hits = run(engine, stats=stats)
        # the driver's delta state holds at most the last step's sequences (freed ones are dropped)
        assert len(engine.executor.encoder.seqs) <= len(PROMPTS)
    finally:
        engine.shutdown()
    assert_gone(pids)
    assert sum(s.num_preempted for s in stats) > 0
    assert any(s.num_prefill_tokens and s.num_decode_tokens for s in stats), "no mixed prefill+decode step"
    assert (hits > 0) == prefix_caching
    assert again == got
    assert_matches_hf(got, reference)
    assert_matches_hf(got, [(w, gaps) for w, (_, gaps) in zip(want, reference)])


def test_head_counts_must_divide(checkpoint_dirs):
    with pytest.raises(ValueError, match="tensor_parallel_size=4 does not divide num_key_value_heads=2"):
        EngineConfig(model=checkpoint_dirs["qwen3"], tensor_parallel_size=4)
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide num_attention_heads=4"):
        EngineConfig(model=checkpoint_dirs["llama"], tensor_parallel_size=3)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_worker_failure_in_step_surfaces_and_cleans_up(checkpoint_dirs, monkeypatch, async_scheduling):
    """Async: rank 0's step 3 fails first (its collective's peer left) while rank 1's answer to
    step 2 is still unread: the report must reach past it to rank 1's own message."""
    monkeypatch.setenv(FAIL_ENV, "1:3")
    with socket.socket() as s:  # a user-given rendezvous address (the default picks its own)
        s.bind(("127.0.0.1", 0))
        init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    engine = LLMEngine(EngineConfig(model=checkpoint_dirs["llama"], tensor_parallel_size=2, dist_init_method=init,
                                    async_scheduling=async_scheduling, **CPU))
    assert engine.async_scheduling == async_scheduling
    pids = engine.executor.workers.pids
    with pytest.raises(RuntimeError, match=r"rank 1: RuntimeError: injected failure .* on rank 1 at step 3"):
        run(engine)
    assert_gone(pids)
    with pytest.raises(RuntimeError, match="failed earlier"):
        engine.step()
    engine.shutdown()  # idempotent after a failure


def test_worker_failure_at_start_surfaces_and_cleans_up(checkpoint_dirs, monkeypatch):
    monkeypatch.setenv(FAIL_ENV, "1:0")
    with pytest.raises(RuntimeError, match="rank 1: RuntimeError: injected failure .* at step 0"):
        LLMEngine(EngineConfig(model=checkpoint_dirs["llama"], tensor_parallel_size=2, **CPU))
    assert_gone([])


def _listening(pids: list[int]) -> list[str]:
    """The addresses these processes listen on (TCP, IPv4 and IPv6)."""
    return [c.laddr.ip for c in psutil.net_connections("inet") if c.pid in pids and c.status == psutil.CONN_LISTEN]


def test_spawned_tp_listens_on_loopback_only(checkpoint_dirs):
    """The rendezvous store (torch binds every interface unless handed a bound socket) and
    everything else the driver and its worker open listen on loopback."""
    engine = LLMEngine(EngineConfig(model=checkpoint_dirs["llama"], tensor_parallel_size=2, **CPU))
    pids = engine.executor.workers.pids
    try:
        addresses = _listening([os.getpid(), *pids])
    finally:
        engine.shutdown()
    assert_gone(pids)
    assert addresses and all(ip in ("127.0.0.1", "::1") for ip in addresses), addresses


def test_store_binds_the_host_it_is_given():
    from engine.distributed import open_store

    for host in ("127.0.0.1", "::1"):
        store = open_store(2, 5.0, host)
        try:
            listening = [c.laddr for c in psutil.net_connections("inet")
                         if c.pid == os.getpid() and c.status == psutil.CONN_LISTEN and c.laddr.port == store.port]
        finally:
            del store
        assert [a.ip for a in listening] == [host]


def test_gloo_interface_is_set_for_the_group_creation_only(monkeypatch):
    from engine.distributed import GLOO_IFNAME_ENV, gloo_interface, loopback_interface

    monkeypatch.delenv(GLOO_IFNAME_ENV, raising=False)
    lo = loopback_interface()
    assert lo in ("lo", "lo0")
    with gloo_interface(lo):
        assert os.environ[GLOO_IFNAME_ENV] == lo
    assert GLOO_IFNAME_ENV not in os.environ
    monkeypatch.setenv(GLOO_IFNAME_ENV, "eth7")  # the user's choice wins
    with gloo_interface(lo):
        assert os.environ[GLOO_IFNAME_ENV] == "eth7"
    assert os.environ[GLOO_IFNAME_ENV] == "eth7"


def test_torchrun_control_key_from_the_environment(tmp_path, monkeypatch):
    from engine.tp_worker import AUTHKEY_ENV, AUTHKEY_FILE_ENV, control_authkey

    monkeypatch.delenv(AUTHKEY_ENV, raising=False)
    monkeypatch.delenv(AUTHKEY_FILE_ENV, raising=False)
    assert control_authkey() is None  # rank 0 then makes a random one
    monkeypatch.setenv(AUTHKEY_ENV, "short")
    with pytest.raises(RuntimeError, match="at least 16 bytes"):
        control_authkey()
    monkeypatch.setenv(AUTHKEY_ENV, "a-secret-of-some-length")
    assert control_authkey() == b"a-secret-of-some-length"
    key_file = tmp_path / "key"
    key_file.write_bytes(b"from-a-file-0123456789\n")
    monkeypatch.setenv(AUTHKEY_FILE_ENV, str(key_file))
    assert control_authkey() == b"from-a-file-0123456789"  # the file wins over the variable
    monkeypatch.setenv(AUTHKEY_FILE_ENV, str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="cannot read the key"):
        control_authkey()


UNGUARDED = """
from engine import LLM
llm = LLM("tiny", tensor_parallel_size=2, device="cpu", num_kv_blocks=8)
"""
# guarded, but the workers' import of the script fails: the fallback message
FAILS_IN_WORKER = """
import sys
if __name__ != "__main__":
    sys.exit("the worker cannot import this script")
from engine import LLM
if __name__ == "__main__":
    llm = LLM("tiny", tensor_parallel_size=2, device="cpu", num_kv_blocks=8)
"""


@pytest.mark.parametrize("script, match", [
    (UNGUARDED, r"unguarded\.py:3 starts a tensor-parallel engine when the script is imported"),
    (FAILS_IN_WORKER, r"rank 1: exited \(exit code 1\) while starting, before it could report"),
])
def test_script_without_main_guard_gets_the_hint(tmp_path, script, match):
    import re

    path = tmp_path / ("unguarded.py" if script is UNGUARDED else "fails.py")
    path.write_text(script)
    proc = subprocess.run([sys.executable, str(path)], env={**os.environ, "PYTHONPATH": REPO},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    # the caller's exception, as the traceback ends
    error = next(ln for ln in reversed(proc.stderr.splitlines()) if ln.startswith("RuntimeError:"))
    assert re.search(match, error), proc.stderr[-3000:]
    assert 'if __name__ == "__main__":' in error


DRIVER = """
import os, sys
from engine import LLMEngine, EngineConfig
if __name__ == "__main__":
    engine = LLMEngine(EngineConfig(model="tiny", tensor_parallel_size=2, device="cpu", num_kv_blocks=8))
    print(*engine.executor.workers.pids, flush=True)
    sys.stdin.read()  # until killed
"""


def test_workers_exit_when_the_driver_is_killed(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": REPO}
    driver = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
    try:
        pids = [int(p) for p in driver.stdout.readline().split()]
        assert len(pids) == 1 and psutil.pid_exists(pids[0])
        driver.send_signal(signal.SIGKILL)  # no finalizer runs: the workers must notice by themselves
        driver.wait()
        assert_gone(pids)
    finally:
        driver.kill()
        driver.wait()


TORCHRUN_SCRIPT = """
import json, sys
from engine import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(sys.argv[1], tensor_parallel_size=2, **json.loads(sys.argv[2]))
    # ranks other than 0 serve rank 0 from inside LLM(...) and exit when it shuts down
    outs = llm.generate(json.loads(sys.argv[3]), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)
    print("TOKENS", json.dumps([o.outputs[0].token_ids for o in outs]), flush=True)
    llm.shutdown()
"""


@pytest.mark.parametrize("env_key", [False, True])
def test_torchrun_launch_matches_tp1(checkpoint_dirs, tmp_path, env_key):
    """Both ranks launched by torchrun (the multi-node path, here on one host), with the control
    channel's key made by rank 0 or given in the environment."""
    path, prompts = checkpoint_dirs["llama"], PROMPTS[:3]
    want, _ = run(LLMEngine(EngineConfig(model=path, **CPU)), prompts)
    script = tmp_path / "tp_script.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = REPO
    env.pop(AUTHKEY_ENV, None)
    if env_key:
        env[AUTHKEY_ENV] = "a-shared-secret-on-every-rank"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           path, json.dumps(CPU), json.dumps(prompts)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("TOKENS")]
    assert len(lines) == 1, proc.stdout  # only rank 0 gets past LLM(...)
    assert json.loads(lines[0].split(" ", 1)[1]) == want


# ---- two GPUs (NCCL) -------------------------------------------------------------------------
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


GPU = dict(dtype="bfloat16", block_size=16, max_model_len=128, num_kv_blocks=64, max_num_seqs=16)


def assert_near_tp1(path: str, got: list[list[int]], want: list[list[int]], prompts=PROMPTS) -> None:
    """bf16 tokens of TP=2 equal TP=1's up to where HF's top-2 logit gap is a near tie."""
    assert_bf16_near(path, got, want, prompts, MAX_NEW, "TP=2 vs TP=1")


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("nccl_only", [False, True])
def test_tp2_matches_tp1_bf16_on_gpus(checkpoint_dirs, nccl_only):
    path = checkpoint_dirs["qwen3"]
    # few graph sizes: capture (with NCCL inside) and Triton compiles dominate this test's time
    want, _ = run(LLMEngine(EngineConfig(model=path, **GPU)))
    # small all-reduces skip NCCL, in the first engine of a process only (torch's rendezvous count)
    symmetric = not nccl_only and not symmetric_memory_used()
    engine = LLMEngine(EngineConfig(model=path, tensor_parallel_size=2, disable_custom_all_reduce=nccl_only, **GPU))
    assert engine.async_scheduling  # the default on CUDA, TP included
    assert (engine.executor.shard.runner.tp.symmetric is not None) == symmetric
    assert engine.config.disable_custom_all_reduce == (not symmetric)  # reports show what ran
    got, _ = run(engine)
    engine.shutdown()
    assert_near_tp1(path, got, want)


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("fusion", ["barrier", "off"])
def test_tp2_all_reduce_variants_match_tp1_on_gpus(checkpoint_dirs, tmp_path, fusion):
    """The barrier protocol for every fused all-reduce + RMSNorm (the default pushes decode
    batches), and no fusion (symmetric-memory all-reduce, then the norm), each in a fresh
    process (symmetric memory is set up once per process)."""
    path, prompts = checkpoint_dirs["qwen3"], PROMPTS[:3] + [[(7 * i + j) % 256 for j in range(100)] for i in (1, 2)]
    want, _ = run(LLMEngine(EngineConfig(model=path, **GPU)), prompts)
    script = tmp_path / "tp_script.py"
    script.write_text(TORCHRUN_SCRIPT)  # no torchrun here: LLM spawns the worker
    cfg = dict(GPU, all_reduce_norm_fusion=fusion)
    proc = subprocess.run([sys.executable, str(script), path, json.dumps(cfg), json.dumps(prompts)],
                          env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "symmetric-memory all-reduce unavailable" not in proc.stderr
    got = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("TOKENS")).split(" ", 1)[1])
    assert_near_tp1(path, got, want, prompts)


@pytest.mark.gpu
@two_gpus
def test_worker_failure_on_gpus_surfaces(checkpoint_dirs, monkeypatch):
    monkeypatch.setenv(FAIL_ENV, "1:2")
    engine = LLMEngine(EngineConfig(model=checkpoint_dirs["llama"], tensor_parallel_size=2, dtype="bfloat16",
                                    max_model_len=128, num_kv_blocks=64, max_num_seqs=16, dist_timeout_s=120))
    pids = engine.executor.workers.pids
    assert engine.async_scheduling  # a step's failure may surface after the next one launched
    with pytest.raises(RuntimeError, match="rank 1: RuntimeError: injected failure"):
        run(engine)
    assert_gone(pids)
