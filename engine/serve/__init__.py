"""OpenAI-compatible HTTP serving for the engine (`python -m engine.serve`, `llmbench-serve`).

async_engine.py  AsyncEngine: the LLMEngine on one loop thread, asyncio streams per request
app.py           create_app(): FastAPI routes; protocol.py request schemas; responses.py bodies
generation.py    one request: SSE or whole JSON, abort on client disconnect
errors.py        OpenAI error objects; middleware.py body limit, API key, response counts
metrics.py       /metrics (Prometheus text); chat.py prompts; server.py uvicorn; cli.py main()
"""

from engine.serve.app import create_app
from engine.serve.async_engine import AsyncEngine, EngineFailed, EngineOverloaded, RequestRejected
from engine.serve.cli import main
from engine.serve.server import ServerThread, free_port

__all__ = [
    "AsyncEngine",
    "EngineFailed",
    "EngineOverloaded",
    "RequestRejected",
    "ServerThread",
    "create_app",
    "free_port",
    "main",
]
