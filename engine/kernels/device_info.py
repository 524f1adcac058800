"""Facts about the device a kernel launches on that launch-shape choices depend on."""

from __future__ import annotations

import functools

import torch

# What the Triton interpreter on the CPU is told: an H100/H200's count, so the CPU tests choose
# the launch shapes the GPU would
CPU_SMS = 132


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (CPU_SMS on the CPU)."""
    if device.type != "cuda":
        return CPU_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sms(index: int) -> int:
    """Cached: the count never changes, and launch-shape choices ask on every eager launch."""
    return torch.cuda.get_device_properties(index).multi_processor_count
