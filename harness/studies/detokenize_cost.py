"""What detokenization costs a user of `LLM.generate`: B streams of P prompt + O output tokens
(ignore_eos), run with the default incremental detokenization and with `detokenize=False`, in
turns (off, on, then on, off, ...), in one process (the same engine, its warm-up done once).

    llmbench studies detokenize-cost --model qwen3-0.6b --streams 256 --prompt-len 128 --output-len 512

Throughput = output tokens / wall time of the whole `generate` call, prefill included. The
figure of interest is the ratio (on / off); the goal is >= 0.95 at 256 streams.
"""

from __future__ import annotations

import argparse
import statistics
import time

from engine import LLM, SamplingParams
from engine.config_args import add_engine_args, engine_kwargs
from harness.studies import write_result


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llmbench studies detokenize-cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2, help="on/off pairs timed")
    ap.add_argument("--json", help="write the results here")
    add_engine_args(ap.add_argument_group("engine (EngineConfig fields)"))
    return ap


def timed_generate(llm: LLM, prompts: list[list[int]], output_len: int, detokenize: bool) -> tuple[float, int, int]:
    """(output tok/s, output tokens, characters of text). Presets have dummy weights and a byte
    tokenizer: most sampled ids then decode to nothing, so the text is short, but every id still
    goes through the detokenizer."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=detokenize)
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return tokens / elapsed, tokens, sum(len(o.outputs[0].text) for o in outputs)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if min(args.streams, args.prompt_len, args.output_len, args.rounds) < 1:
        ap.error("--streams, --prompt-len, --output-len and --rounds must be >= 1")
    try:
        kwargs = engine_kwargs(args)
    except ValueError as e:
        ap.error(str(e))
    llm = LLM(**kwargs)
    vocab = llm.engine.config.model_config.vocab_size
    prompts = [[(31 * i + 7 * j) % vocab for j in range(args.prompt_len)] for i in range(args.streams)]
    llm.engine.warm_up()
    timed_generate(llm, prompts[:8], 8, True)  # the first generate's one-off costs stay out
    rows = {True: [], False: []}
    for round_no in range(args.rounds):
        for detokenize in (False, True) if round_no % 2 == 0 else (True, False):  # no order bias
            tok_s, tokens, chars = timed_generate(llm, prompts, args.output_len, detokenize)
            rows[detokenize].append(tok_s)
            print(f"detokenize {'on ' if detokenize else 'off'}: {tokens} tokens, {chars} characters, "
                  f"{tok_s:,.0f} tok/s", flush=True)
    on, off = statistics.median(rows[True]), statistics.median(rows[False])
    result = {"model": llm.engine.config.model, "streams": args.streams, "prompt_len": args.prompt_len,
              "output_len": args.output_len, "tok_s_on": rows[True], "tok_s_off": rows[False],
              "median_on": on, "median_off": off, "ratio_on_off": on / off}
    print(f"LLM.generate, {args.streams} streams: detokenize on / off = {on:,.0f} / {off:,.0f} tok/s "
          f"= {on / off:.3f}")
    llm.shutdown()
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
