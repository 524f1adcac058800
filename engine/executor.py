"""Executors run a step on every model shard. `UniprocExecutor` holds the single ModelRunner;
`tensor_parallel_size > 1` selects the multi-process executor (engine/tp_executor.py)."""

from __future__ import annotations

from typing import Protocol

from engine.config import EngineConfig
from engine.model_runner import ModelRunner, PendingSample
from engine.scheduler import SchedulerOutput


class Executor(Protocol):
    num_kv_blocks: int

    def execute_model(self, out: SchedulerOutput) -> list[int | None]: ...

    def shutdown(self) -> None: ...


class UniprocExecutor:
    def __init__(self, config: EngineConfig):
        self.runner = ModelRunner(config)
        self.num_kv_blocks = self.runner.available_kv_blocks()
        self.runner.allocate_kv_cache(self.num_kv_blocks)

    def execute_model(self, out: SchedulerOutput) -> list[int | None]:
        return self.runner.execute_model(out)

    def execute_model_async(self, out: SchedulerOutput) -> PendingSample:
        return self.runner.execute_model_async(out)

    def shutdown(self) -> None:
        pass


class ReadySample:
    """A step result that is already on the host (executors without async launch)."""

    def __init__(self, ids: list[int | None]):
        self.ids = ids

    def result(self) -> list[int | None]:
        return self.ids


def launch_step(executor: Executor, out: SchedulerOutput) -> PendingSample | ReadySample:
    launch = getattr(executor, "execute_model_async", None)
    return launch(out) if launch is not None else ReadySample(executor.execute_model(out))


def make_executor(config: EngineConfig) -> Executor:
    if config.tensor_parallel_size == 1:
        return UniprocExecutor(config)
    from engine.tp_executor import MultiprocExecutor

    return MultiprocExecutor(config)
