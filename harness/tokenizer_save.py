"""`llmbench tokenizer save`: write the tokenizer a model is served with to a directory.

    llmbench tokenizer save --model tiny --out tokenizers/tiny
    guidellm benchmark --target http://127.0.0.1:8000 --processor tokenizers/tiny ...

The presets' byte-level tokenizer exists only in memory, so a tool that counts tokens on its
own side (GuideLLM, vLLM's `bench serve`, `transformers.AutoTokenizer`) cannot find it by the
model's name; the saved directory is what to point them at. For a checkpoint (or --tokenizer)
the directory holds a copy of that tokenizer, with model_max_length set to the engine's limit.
"""

from __future__ import annotations

import argparse

from engine.config import EngineConfig
from engine.tokenizer import save_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmbench tokenizer save", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="preset name or HF checkpoint directory (default: tiny)")
    p.add_argument("--tokenizer", default=None, help="a tokenizer directory or hub name (default: the model's)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="model_max_length written with it (default: the engine's for this model)")
    p.add_argument("--out", required=True, help="directory to write (created if needed)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    kwargs = {} if args.max_model_len is None else {"max_model_len": args.max_model_len}
    try:
        config = EngineConfig(model=args.model, tokenizer=args.tokenizer, **kwargs)
        files = save_tokenizer(config, args.out)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    print(f"saved the tokenizer of {args.model} to {args.out}: {', '.join(sorted(files))}")
    return 0
