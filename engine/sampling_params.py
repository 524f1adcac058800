"""Per-request sampling settings, validated on construction (vLLM's names and meanings)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_k: int = -1  # -1 (or 0): whole vocabulary
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    detokenize: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        _require(self.temperature >= 0.0, "temperature", self.temperature, "must be >= 0")
        _require(self.top_k == -1 or self.top_k >= 1, "top_k", self.top_k, "must be -1 (disabled) or >= 1")
        _require(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "must be in (0, 1]")
        _require(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", self.max_tokens, "must be an integer >= 1")
        _require(
            isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
            "min_tokens", self.min_tokens, f"must be in [0, max_tokens={self.max_tokens}]",
        )
        _require(self.seed is None or isinstance(self.seed, int), "seed", self.seed, "must be an integer or None")
        _require(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "must be non-empty strings")
        _require(
            all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids", self.stop_token_ids, "must be non-negative integers",
        )


def _require(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name}={value!r} {rule}")
