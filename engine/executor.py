"""Executors run a step on every model shard. `UniprocExecutor` holds the single ModelRunner;
`tensor_parallel_size > 1` selects the multi-process executor (engine/tp_executor.py)."""

from __future__ import annotations

from typing import Protocol

from engine.config import EngineConfig
from engine.model_runner import ModelRunner, PendingSample
from engine.scheduler import SchedulerOutput


class StepResult(Protocol):
    def result(self) -> list[int | None]: ...


class Executor(Protocol):
    """Runs steps on every shard. `execute_model_async` returns once the step is launched; its
    `result()` waits for the sampled ids (one entry per scheduled sequence, None: no sample).

    This is all a caller may use. The device and dtype the shards run are the config's resolved
    `device_type` / `torch_dtype`; the shards themselves (model, KV cache, input buffers) stay
    inside the executor."""

    num_kv_blocks: int  # KV blocks every shard holds (the minimum over the ranks)
    config: EngineConfig  # as the shards run it (the TP executor may fall back from an option)

    def execute_model(self, out: SchedulerOutput) -> list[int | None]: ...

    def execute_model_async(self, out: SchedulerOutput) -> StepResult: ...

    def shutdown(self) -> None: ...


class UniprocExecutor:
    """One shard in this process. `runner` is not part of `Executor`: only code that measures
    the model itself (harness.studies.step_profile, tests) reaches it, on a TP=1 engine."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.runner: ModelRunner = ModelRunner(config)
        self.num_kv_blocks = self.runner.available_kv_blocks()
        self.runner.allocate_kv_cache(self.num_kv_blocks)

    def execute_model(self, out: SchedulerOutput) -> list[int | None]:
        return self.runner.execute_model(out)

    def execute_model_async(self, out: SchedulerOutput) -> PendingSample:
        return self.runner.execute_model_async(out)

    def shutdown(self) -> None:
        pass


def make_executor(config: EngineConfig) -> Executor:
    if config.tensor_parallel_size == 1:
        return UniprocExecutor(config)
    from engine.tp_executor import MultiprocExecutor

    return MultiprocExecutor(config)
