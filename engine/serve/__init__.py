"""OpenAI-compatible HTTP serving for the engine (`python -m engine.serve`, `llmbench-serve`).

engine_client.py EngineClient: the seam (add_request -> token deltas, abort, snapshot, is_alive)
core_client.py   CoreClient: the EngineClient of an API process; engine_core.py the core process
                 (the step loop only); core_messages.py what crosses between them
async_engine.py  AsyncEngine: the in-process EngineClient (the LLMEngine on one loop thread)
launcher.py      --api-server-count N: one core, N API processes on one port, supervised
app.py           create_app(): FastAPI routes; protocol.py request schemas; responses.py bodies
tokenize.py      /tokenize and /detokenize (vLLM's shapes), counted as the generation routes bill
generation.py    one request: SSE or whole JSON, abort on client disconnect, stream interval
output_processor.py  token deltas -> text deltas: detokenization and stop strings (API side)
errors.py        OpenAI error objects; middleware.py body limit, API key, response counts
metrics.py       /metrics (vllm:* and llmbench_*, prometheus_client); chat.py prompts; server.py uvicorn; cli.py main()
"""

from engine.serve.app import create_app
from engine.serve.async_engine import AsyncEngine
from engine.serve.cli import main
from engine.serve.core_client import CoreClient
from engine.serve.engine_client import (
    EngineClient,
    EngineFailed,
    EngineOverloaded,
    RequestRejected,
)
from engine.serve.server import ServerThread, free_port

__all__ = [
    "AsyncEngine",
    "CoreClient",
    "EngineClient",
    "EngineFailed",
    "EngineOverloaded",
    "RequestRejected",
    "ServerThread",
    "create_app",
    "free_port",
    "main",
]
