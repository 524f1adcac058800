"""`python -m engine.serve` / `llmbench-serve`: the OpenAI-compatible server on uvicorn.

    python -m engine.serve --model tiny --port 8000 [--api-key KEY] [--max-waiting 256]
        [--stream-interval 1] [--api-server-count 1] [--engine-in-process]
        [--max-num-seqs 256 --block-size 16 --tensor-parallel-size 1 ...]

The engine runs in its own process (the engine core: the step loop only); this process does
HTTP, tokenization, detokenization and stop strings. --api-server-count N runs N such API
processes on the one port (launcher.py); --engine-in-process runs the engine on a thread of
the API process instead (one GIL for everything: slower under load, no extra process).
Every EngineConfig field is a flag (engine/config_args.py); `--engine-arg KEY=VALUE` sets one too.

Binds 127.0.0.1 unless --host says otherwise. The API key may also come from LLMBENCH_API_KEY
(so it does not show in `ps`). Invalid options are usage errors (exit 2), naming the value.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from engine.config import EngineConfig
from engine.config_args import add_engine_args, engine_kwargs
from engine.serve.app import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_WAITING,
    create_app,
)
from engine.serve.launcher import run_servers
from engine.serve.server import DEFAULT_HEADER_TIMEOUT_S, LOOPBACK, serve
from engine.serve.tokenizing import CHARS_PER_TOKEN_BOUND


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
    p.add_argument("--max-prompt-chars", type=int, default=None,
                   help="longer prompts get 400 before tokenizing (default: "
                        f"{CHARS_PER_TOKEN_BOUND} x max_model_len)")
    p.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                   help="seconds for a request body to arrive, else 408 and the connection "
                        f"is closed (default {DEFAULT_BODY_TIMEOUT_S:g})")
    p.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT_S,
                   help="seconds for a connection to send its request headers, else it is "
                        f"closed (default {DEFAULT_HEADER_TIMEOUT_S:g})")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--stream-interval", type=int, default=1,
                   help="a stream sends a chunk once this many tokens are pending (and at the "
                        "end); 1: one chunk per engine step (default)")
    p.add_argument("--api-server-count", type=int, default=1,
                   help="API server processes sharing the port and the one engine core (default 1)")
    p.add_argument("--engine-in-process", action="store_true",
                   help="run the engine on a thread of the API process, not in its own process")
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
    if args.api_server_count < 1:
        parser.error(f"--api-server-count must be >= 1, got {args.api_server_count}")
    if args.api_server_count > 1 and args.engine_in_process:
        parser.error("--engine-in-process serves from one process: it cannot be combined with "
                     f"--api-server-count {args.api_server_count}")
    app_kwargs: dict[str, Any] = dict(
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        max_waiting=args.max_waiting,
        max_body_bytes=args.max_body_bytes,
        stream_interval=args.stream_interval,
        max_prompt_chars=args.max_prompt_chars,
        body_timeout_s=args.body_timeout,
        header_timeout_s=args.header_timeout,
    )
    try:
        config = engine_config(args)
        app = create_app(config, engine_in_process=args.engine_in_process,
                         log_level=args.log_level.upper(), **app_kwargs)
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.api_server_count > 1:
        return run_servers(config, app_kwargs, args.host, args.port, args.api_server_count,
                           args.log_level)
    try:
        serve(app, args.host, args.port, args.log_level)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, after shutting down
        pass
    return 0
