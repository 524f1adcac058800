"""NVML telemetry sampler: without NVML (this CPU machine) and with a fake pynvml module.

Run: .venv/bin/python -m pytest tests/test_telemetry.py -q
"""

from __future__ import annotations

import sys
import time
import types
from types import SimpleNamespace

import pytest

from harness.metrics import telemetry_stats
from harness.report import telemetry_frame
from harness.telemetry import TelemetrySampler, load_nvml, nvml_device_names


class FakeNVMLError(Exception):
    pass


def fake_pynvml(num_gpus: int = 2, energy_supported: bool = True, init_error: bool = False) -> types.ModuleType:
    """A pynvml stand-in: each GPU's energy counter grows by 1000 mJ per reading."""
    state = {"init": 0, "shutdown": 0, "energy_mj": [10_000] * num_gpus}
    mod = types.ModuleType("pynvml")

    def init():
        if init_error:
            raise FakeNVMLError("Driver Not Loaded")
        state["init"] += 1

    def energy(handle):
        if not energy_supported:
            raise FakeNVMLError("Not Supported")
        state["energy_mj"][handle] += 1000
        return state["energy_mj"][handle]

    mod.__dict__.update(
        state=state, NVMLError=FakeNVMLError, NVML_CLOCK_SM=1, nvmlInit=init,
        nvmlShutdown=lambda: state.__setitem__("shutdown", state["shutdown"] + 1),
        nvmlDeviceGetCount=lambda: num_gpus, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: f"Fake GPU {h}".encode(),
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=60 + h, memory=30),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=(h + 1) * 2**30, total=80 * 2**30),
        nvmlDeviceGetPowerUsage=lambda h: 250_000,  # mW
        nvmlDeviceGetClockInfo=lambda h, clock: 1980 if clock == 1 else 0,
        nvmlDeviceGetTotalEnergyConsumption=energy,
    )
    return mod


def test_without_pynvml_records_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with TelemetrySampler(interval_s=0.01) as sampler:
        time.sleep(0.03)
    assert sampler.available is False and "pynvml not importable" in sampler.unavailable_reason
    assert sampler.samples == []
    assert sampler.status()["nvml_available"] is False and nvml_device_names() is None


def test_nvml_init_failure_records_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(init_error=True))
    with TelemetrySampler() as sampler:
        pass
    assert sampler.samples == [] and "nvmlInit failed: Driver Not Loaded" in sampler.unavailable_reason
    stats = telemetry_stats(telemetry_frame(sampler.samples), output_tokens=100)
    assert stats["gpu_energy_j"] is None and stats["gpu_util_mean_pct"] is None


def test_this_machine_never_fakes_values():
    module, reason = load_nvml()
    if module is not None:
        module.nvmlShutdown()
        pytest.skip("NVML works here; the no-NVML path is covered with monkeypatch above")
    with TelemetrySampler(interval_s=0.01) as sampler:
        time.sleep(0.02)
    assert sampler.samples == [] and sampler.unavailable_reason == reason


def test_fake_nvml_sampling(monkeypatch):
    fake = fake_pynvml(num_gpus=2)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    t0 = time.perf_counter()
    with TelemetrySampler(gpu_indices=[1, 0], interval_s=0.01, t0=t0) as sampler:
        time.sleep(0.05)
    samples = sampler.samples
    assert sampler.available and fake.state["init"] == 1 and fake.state["shutdown"] == 1
    per_gpu = {i: [s for s in samples if s.gpu_index == i] for i in (0, 1)}
    assert all(len(v) >= 2 for v in per_gpu.values())  # at least the start and stop readings
    s = per_gpu[1][0]
    assert (s.gpu_util_pct, s.mem_util_pct, s.mem_used_bytes) == (61.0, 30.0, 2.0 * 2**30)
    assert (s.power_w, s.sm_clock_mhz) == (250.0, 1980.0)  # mW -> W
    assert per_gpu[1][0].energy_j == 11.0  # 11,000 mJ -> J
    for rows in per_gpu.values():
        times = [r.t_s for r in rows]
        assert times == sorted(times) and 0 <= times[0] and times[-1] <= time.perf_counter() - t0
    # Counter grows 1 J per reading, so the delta is (readings - 1) J per GPU.
    stats = telemetry_stats(telemetry_frame(samples), output_tokens=10)
    expected_j = sum(len(v) - 1 for v in per_gpu.values())
    assert stats["gpu_energy_j"] == pytest.approx(expected_j)
    assert stats["joules_per_output_token"] == pytest.approx(expected_j / 10)
    assert stats["gpu_power_mean_w"] == pytest.approx(250.0)


def test_fake_nvml_unsupported_energy_is_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(num_gpus=1, energy_supported=False))
    with TelemetrySampler(interval_s=0.01) as sampler:
        pass
    assert sampler.samples and all(s.energy_j is None and s.power_w == 250.0 for s in sampler.samples)


def test_fake_nvml_names_and_bad_index(monkeypatch):
    fake = fake_pynvml(num_gpus=2)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert nvml_device_names() == ["Fake GPU 0", "Fake GPU 1"]
    with pytest.raises(ValueError, match=r"gpu_indices \[2\] out of range: NVML sees 2 GPU\(s\)"):
        TelemetrySampler(gpu_indices=[0, 2]).start()
    assert fake.state["init"] == fake.state["shutdown"]  # no NVML handle leaked


@pytest.mark.parametrize("kwargs", [{"interval_s": 0}, {"gpu_indices": []}, {"gpu_indices": [-1]}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="must be"):
        TelemetrySampler(**kwargs)
