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
    `result()` waits for the sampled ids (one entry per scheduled sequence, None: no sample)."""

    num_kv_blocks: int
    config: EngineConfig  # as the shards run it (the TP executor may fall back from an option)

    def execute_model(self, out: SchedulerOutput) -> list[int | None]: ...

    def execute_model_async(self, out: SchedulerOutput) -> StepResult: ...

    def shutdown(self) -> None: ...


class UniprocExecutor:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.runner = ModelRunner(config)
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
