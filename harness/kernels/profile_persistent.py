"""Where the persistent decode kernel's time goes (engine/kernels/persistent_decode.py, GPU): one
sequence (or `--seqs` of them) with `--context` cached tokens, the kernel's own per-step clock (`times=`: when each
program's work of a step ended and when it passed the barrier after it), and the whole kernel
timed in CUDA graphs, for the plan choose_plan makes and for variants of it.

    llmbench kernels profile-persistent [--model qwen3-0.6b] [--context 640] [--seqs 1] [--plan num_warps=8 ...]

Per step kind (qkv, attention, o, gate_up, down), medians over the layers: work = the last
program's end of work minus the first program's exit from the barrier before; barrier = the
first exit minus the last arrival. Each variant's final hidden state is compared with the chosen
plan's (relative error). reports/PERF.md rows 52-53 have the H200's figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import fields, replace

import torch

from engine.config import EngineConfig, parse_value
from engine.graph_shapes import GraphShape
from engine.kernels.persistent_decode import (
    STEPS_PER_LAYER,
    PersistentPlan,
    alloc_scratch,
    persistent_decode,
)
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSequence, SchedulerOutput
from harness.kernels.bench_sample import graph_us

STEP_NAMES = ("qkv", "attention", "o", "gate_up", "down")
FLAGS = ("attention_prefetch", "fused_o", "cooperative")  # PersistentPlan's on/off fields
assert len(STEP_NAMES) == STEPS_PER_LAYER


def decode_step(config: EngineConfig, contexts: list[int], rows: int | None = None, seed: int = 5):
    """A runner whose KV cache holds a prefill of contexts[i] random tokens for each sequence i
    (blocks of its own), and the model inputs (ids, positions, caches, metadata, backend) of the
    decode step that gives each one more token, padded to `rows` sequence rows (default: none)."""
    runner = ModelRunner(config)
    blocks = [-(-(c + 1) // config.block_size) for c in contexts]
    if config.num_kv_blocks and config.num_kv_blocks < sum(blocks) + 3:
        raise ValueError(f"num_kv_blocks={config.num_kv_blocks} cannot hold {contexts} tokens (+1 each) after "
                         "the 3 blocks left free")
    runner.allocate_kv_cache(config.num_kv_blocks or sum(blocks) + 3)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 250, (c,), generator=gen).tolist() for c in contexts]
    tables = [list(range(3 + sum(blocks[:i]), 3 + sum(blocks[:i + 1]))) for i in range(len(contexts))]

    def scheduled(tokens, start, i):
        return ScheduledSequence(request_id=f"r{i}", token_ids=tokens, start_pos=start, block_table=tables[i],
                                 sample=True, sampling_params=SamplingParams(), num_output_tokens=0, seq_no=i)

    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            out = SchedulerOutput([scheduled(prompt, 0, i)], num_prefill_tokens=len(prompt), num_decode_tokens=0)
            runner.model(*_model_inputs(runner, out, None))
    n = rows or len(contexts)
    out = SchedulerOutput([scheduled([7], c, i) for i, c in enumerate(contexts)], num_prefill_tokens=0,
                          num_decode_tokens=len(contexts))
    return runner, _model_inputs(runner, out, GraphShape(n, n, True))


def _model_inputs(runner: ModelRunner, out: SchedulerOutput, pad: GraphShape | None):
    got = runner.prepare_inputs(out, pad)
    return got.input_ids, got.positions, runner.kv_caches, got.meta, runner.backend


def step_breakdown(times: torch.Tensor) -> list[tuple[str, float, float]]:
    """times [programs, steps, 2] ns (a step's work ended, its barrier passed) -> per step kind
    (name, median work µs, median barrier µs) over the steps after the first and before the
    last (the first has no barrier before it, the last none after it)."""
    t = times.double().cpu() / 1000.0
    arrive = t[:, :, 0].max(0).values  # the last program done with step s
    leave = t[:, :, 1].min(0).values  # the first program out of barrier s
    work: dict[str, list[float]] = {n: [] for n in STEP_NAMES}
    wait: dict[str, list[float]] = {n: [] for n in STEP_NAMES}
    for s in range(1, t.shape[1] - 1):
        name = STEP_NAMES[s % STEPS_PER_LAYER]
        work[name].append((arrive[s] - leave[s - 1]).item())
        wait[name].append((leave[s] - arrive[s]).item())
    return [(n, statistics.median(work[n]), statistics.median(wait[n])) for n in STEP_NAMES if work[n]]


def parse_plan(base: PersistentPlan, items: list[str]) -> PersistentPlan:
    """`base` with KEY=VALUE fields replaced (PersistentPlan's int fields)."""
    names = {f.name for f in fields(PersistentPlan)}
    changes = {}
    for item in items:
        key, sep, value = item.partition("=")
        parsed = parse_value(value) if sep else None
        least = 0 if key in FLAGS else 1
        if key not in names or not isinstance(parsed, int) or isinstance(parsed, bool) or parsed < least:
            raise ValueError(f"--plan takes FIELD=INT (>= 1; 0 or 1 for {', '.join(FLAGS)}) with FIELD one of "
                             f"{sorted(names)}, got {item!r}")
        changes[key] = parsed
    return replace(base, **changes)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llmbench kernels profile-persistent", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen3-0.6b", help="a preset or checkpoint (default: qwen3-0.6b)")
    ap.add_argument("--context", type=int, default=640, help="cached tokens of each sequence (default: 640)")
    ap.add_argument("--seqs", type=int, default=1, help="sequences in the decode step, 1-16 (default: 1)")
    ap.add_argument("--plan", action="append", default=[], metavar="FIELD=INT",
                    help="a variant of the chosen plan to time too, e.g. num_warps=8,qkv_stages=4 (repeatable)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile-persistent needs a CUDA device (its barriers and clock do not run in the interpreter)")
    if args.context < 1 or not 1 <= args.seqs <= 16:
        sys.exit(f"profile-persistent: --context must be >= 1 and --seqs in [1, 16], got {args.context}, {args.seqs}")
    config = EngineConfig(model=args.model, device="cuda", enforce_eager=True, max_model_len=max(256, 2 * args.context),
                          max_num_seqs=max(4, args.seqs), persistent_decode=True)
    runner, (ids, positions, caches, meta, _) = decode_step(config, [args.context] * args.seqs)
    model = runner.model.model
    with torch.inference_mode():
        h = model.embed_tokens(ids)
        model.forward_persistent(h, positions, caches, meta)
        state = model._persistent[args.seqs]
        try:
            plans = {"chosen": state.plan} | {p: parse_plan(state.plan, p.split(",")) for p in args.plan}
        except ValueError as e:
            sys.exit(f"profile-persistent: {e}")
        ref = None
        for name, plan in plans.items():
            scratch = alloc_scratch(state.shape, plan, h.dtype, h.device)

            def run(times=None, plan=plan, scratch=scratch):
                return persistent_decode(h, positions, meta.slot_mapping, meta.seq_lens, meta.block_tables, caches,
                                         model.rotary.cos, model.rotary.sin, state.tables, state.shape, plan, scratch,
                                         model.layers[0].self_attn.scale, times=times)

            final = model.norm(*run())[0].float()  # the hidden state the LM head would read
            ref = final if ref is None else ref
            us = graph_us(run)
            times = torch.zeros(plan.programs, state.shape.num_layers * STEPS_PER_LAYER, 2, dtype=torch.int64,
                                device=h.device)
            run(times)
            torch.cuda.synchronize()
            steps = "  ".join(f"{n} {w:.2f}/{b:.2f}" for n, w, b in step_breakdown(times))
            err = ((final - ref).norm() / ref.norm()).item()
            print(f"{name}: {us:.1f} us a launch | work/barrier us: {steps} | rel. error vs chosen {err:.1e}\n"
                  f"  {plan}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
