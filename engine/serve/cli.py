"""`python -m engine.serve` / `llmbench-serve`: the OpenAI-compatible server on uvicorn.

    python -m engine.serve --model tiny --port 8000 [--api-key KEY] [--max-waiting 256]
        [--max-num-seqs 256 --block-size 16 --tensor-parallel-size 1 ...]

Every EngineConfig field is a flag (engine/config_args.py); `--engine-arg KEY=VALUE` sets one too.

Binds 127.0.0.1 unless --host says otherwise. The API key may also come from LLMBENCH_API_KEY
(so it does not show in `ps`). Invalid options are usage errors (exit 2), naming the value.
"""

from __future__ import annotations

import argparse
import logging
import os

from engine.config import EngineConfig
from engine.config_args import add_engine_args, engine_kwargs
from engine.serve.app import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_WAITING, create_app
from engine.serve.server import LOOPBACK, serve


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmbench serve", description="OpenAI-compatible server for the llmbench engine."
    )
    p.add_argument(
        "--model",
        default="tiny",
        help="preset name or local HF checkpoint directory (default: tiny)",
    )
    p.add_argument(
        "--served-model-name", default=None, help="name clients send as 'model' (default: --model)"
    )
    p.add_argument(
        "--host", default=LOOPBACK, help="bind address (default: 127.0.0.1, loopback only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("LLMBENCH_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $LLMBENCH_API_KEY, else none)",
    )
    p.add_argument(
        "--max-waiting",
        type=int,
        default=DEFAULT_MAX_WAITING,
        help="accepted requests with no token yet before new ones get 429",
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="larger bodies get 413"
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    # every EngineConfig field but --model (above) as a flag; --no-prefix-caching and
    # --no-chunked-prefill stay as aliases
    add_engine_args(p.add_argument_group("engine"), skip=("model",))
    return p


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(model=args.model, **engine_kwargs(args))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.port < 65536:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    try:
        config = engine_config(args)
        app = create_app(
            config,
            args.served_model_name,
            api_key=args.api_key,
            max_waiting=args.max_waiting,
            max_body_bytes=args.max_body_bytes,
        )
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    serve(app, args.host, args.port, args.log_level)
    return 0
