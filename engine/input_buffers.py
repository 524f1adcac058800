"""Persistent step inputs: pinned host staging with numpy views, and device tensors that CUDA
graphs read. Each step writes into the numpy views and copies only the used prefix over, so
nothing is allocated per step (nano-vllm #175 / vLLM's CpuGpuBuffer)."""

from __future__ import annotations

import torch


class StagedTensor:
    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        on_gpu = device.type == "cuda"
        self.cpu = torch.zeros(shape, dtype=dtype, pin_memory=on_gpu)
        self.np = self.cpu.numpy()
        self.gpu = torch.zeros(shape, dtype=dtype, device=device) if on_gpu else self.cpu

    def copy(self, n: int, width: int | None = None) -> torch.Tensor:
        """Copy the first n rows (and first `width` columns) to the device; return that view."""
        src = self.cpu[:n] if width is None else self.cpu[:n, :width]
        dst = self.gpu[:n] if width is None else self.gpu[:n, :width]
        if dst.data_ptr() != src.data_ptr():
            dst.copy_(src, non_blocking=True)
        return dst


class InputBuffers:
    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, device: torch.device):
        i32, i64 = torch.int32, torch.int64
        self.input_ids = StagedTensor((max_tokens,), i64, device)
        self.positions = StagedTensor((max_tokens,), i64, device)
        self.slot_mapping = StagedTensor((max_tokens,), i64, device)
        self.query_start_loc = StagedTensor((max_seqs + 1,), i32, device)
        self.seq_lens = StagedTensor((max_seqs,), i32, device)
        self.block_tables = StagedTensor((max_seqs, max_blocks), i32, device)
        self.logits_indices = StagedTensor((max_seqs,), i64, device)
        self.decode_order = StagedTensor((max_seqs,), i32, device)
