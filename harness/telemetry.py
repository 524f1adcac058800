"""GPU telemetry: an NVML sampler on a background thread.

    with TelemetrySampler(gpu_indices=[0], interval_s=0.1, t0=run_start) as sampler:
        ...run the workload...
    sampler.samples   -> list[TelemetrySample]   (empty when NVML is unavailable)
    sampler.status()  -> dict for the run config: nvml available?, why not, indices, interval

Each sample reads utilization.gpu, utilization.memory, memory used, power, SM clock and the
total-energy counter (mJ -> J) of every listed GPU. ``t_s`` is ``time.perf_counter() - t0``; pass
the replay's run-start perf_counter as ``t0`` so samples line up with request timestamps
(default: the moment start() is called). One sample is taken at start and one at stop, so the
energy delta spans the whole window.

gpu_indices are NVML indices, which ignore CUDA_VISIBLE_DEVICES (NVML sees every GPU).

Without NVML (pynvml not importable, or nvmlInit fails as on a CPU machine) the sampler records
nothing and says why in ``unavailable_reason``: values are never faked, and the metrics then
report None. A field a GPU does not support (e.g. the energy counter on old cards) is None.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from harness.records import TelemetrySample


def load_nvml() -> tuple[ModuleType | None, str | None]:
    """Import pynvml and initialise NVML: (module, None), or (None, why it is unavailable)."""
    try:
        import pynvml
    except ImportError as e:
        return None, f"pynvml not importable: {e}"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError subclasses, but also OSError from a missing libnvidia-ml
        return None, f"nvmlInit failed: {e}"
    return pynvml, None


def nvml_device_names() -> list[str] | None:
    """Names of every GPU NVML sees, or None without NVML (used for report hardware info)."""
    nvml, _ = load_nvml()
    if nvml is None:
        return None
    try:
        names = [nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(i))
                 for i in range(nvml.nvmlDeviceGetCount())]
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    finally:
        nvml.nvmlShutdown()


class TelemetrySampler:
    def __init__(self, gpu_indices: Sequence[int] = (0,), interval_s: float = 0.1, t0: float | None = None):
        if not 0.01 <= interval_s <= 10:
            raise ValueError(f"interval_s must be in [0.01, 10] seconds, got {interval_s}")
        if not gpu_indices or any(i < 0 for i in gpu_indices):
            raise ValueError(f"gpu_indices must be a non-empty list of ints >= 0, got {list(gpu_indices)}")
        self.gpu_indices = list(gpu_indices)
        self.interval_s = interval_s
        self.t0 = t0
        self.available: bool | None = None  # None until start()
        self.unavailable_reason: str | None = None
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._samples: list[TelemetrySample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> TelemetrySampler:
        if self._thread is not None:
            raise RuntimeError("TelemetrySampler already started")
        self._nvml, self.unavailable_reason = load_nvml()
        self.available = self._nvml is not None
        if self.t0 is None:
            self.t0 = time.perf_counter()
        if not self.available:
            return self
        self._handles = self._open_handles()
        self._sample_all()
        self._thread = threading.Thread(target=self._run, name="nvml-telemetry", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._sample_all()  # closing reading: the energy delta covers the whole window
        self._nvml.nvmlShutdown()

    def __enter__(self) -> TelemetrySampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def samples(self) -> list[TelemetrySample]:
        with self._lock:
            return list(self._samples)

    def status(self) -> dict[str, Any]:
        """What to record in the run config next to the samples."""
        return {"nvml_available": self.available, "unavailable_reason": self.unavailable_reason,
                "gpu_indices": self.gpu_indices, "interval_s": self.interval_s,
                "num_samples": len(self.samples)}

    # --- sampling -----------------------------------------------------------------------

    def _open_handles(self) -> list[Any]:
        count = self._nvml.nvmlDeviceGetCount()
        bad = [i for i in self.gpu_indices if i >= count]
        if bad:
            self._nvml.nvmlShutdown()
            raise ValueError(f"gpu_indices {bad} out of range: NVML sees {count} GPU(s), indices 0..{count - 1}")
        return [self._nvml.nvmlDeviceGetHandleByIndex(i) for i in self.gpu_indices]

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample_all()

    def _sample_all(self) -> None:
        readings = [self._read(index, handle) for index, handle in zip(self.gpu_indices, self._handles, strict=True)]
        with self._lock:
            self._samples.extend(readings)

    def _try(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except self._nvml.NVMLError:  # unsupported on this GPU: leave the field None
            return None

    def _read(self, index: int, handle: Any) -> TelemetrySample:
        nvml, t_s = self._nvml, time.perf_counter() - self.t0
        util = self._try(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
        mem = self._try(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        power_mw = self._try(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        sm_mhz = self._try(lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM))
        energy_mj = self._try(lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        return TelemetrySample(
            t_s=t_s, gpu_index=index,
            gpu_util_pct=None if util is None else float(util.gpu),
            mem_util_pct=None if util is None else float(util.memory),
            mem_used_bytes=None if mem is None else float(mem.used),
            power_w=None if power_mw is None else power_mw / 1000.0,
            sm_clock_mhz=None if sm_mhz is None else float(sm_mhz),
            energy_j=None if energy_mj is None else energy_mj / 1000.0,
        )
