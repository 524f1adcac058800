"""Fixtures shared by the server tests."""

from __future__ import annotations

import pytest

from engine import EngineConfig, LLMEngine


@pytest.fixture(scope="module")
def engine(request):
    """A tiny in-process engine per test module, with the module's MAX_MODEL_LEN (default 2048)."""
    eng = LLMEngine(EngineConfig(model="tiny", max_model_len=getattr(request.module, "MAX_MODEL_LEN", 2048)))
    yield eng
    eng.shutdown()
