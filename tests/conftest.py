"""Shared fixtures. On machines without CUDA, Triton kernels run in the interpreter
(TRITON_INTERPRET must be set before any kernel module is imported)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from checkpoints import ARCHS, build_checkpoint  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoint_dirs(tmp_path_factory) -> dict[str, str]:
    """A small random HF checkpoint per supported architecture, made with save_pretrained."""
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: build_checkpoint(arch, str(root / arch)) for arch in ARCHS}
