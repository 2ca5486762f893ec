"""How to pick tokens: SamplingParams and the errors of settings that cannot work. Without torch, so that the command
line shows its defaults (cli.py) without importing it."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass

from .errors import LlavaError

MAX_LOGPROBS = 20


class GenerationError(LlavaError, ValueError):
    """Generation settings that cannot work. `param`: the SamplingParams field at fault, where one is (the command
    line names its flag by it)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy (argmax); the other knobs then only shape the distribution."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output
    seed: int | None = None
    stop: typing.Sequence[str] = ()  # stop when the output contains one of these; it is not included in the text
    logprobs: int | None = None  # None: none; k >= 0: each token's log-probability and the k most likely ones

    def validate(self) -> "SamplingParams":
        def number(name: str, integer: bool = False) -> float:
            value = getattr(self, name)
            kinds = (int,) if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
                fail(name, f"must be {'an integer' if integer else 'a finite number'}, got {value!r}")
            return value

        def fail(name: str, problem: str) -> typing.NoReturn:
            raise GenerationError(f"{name} {problem}", param=name)

        if number("max_new_tokens", integer=True) < 1:
            fail("max_new_tokens", f"must be a positive integer, got {self.max_new_tokens!r}")
        if number("temperature") < 0:
            fail("temperature", f"must be >= 0 (0 is greedy), got {self.temperature}")
        if number("top_k", integer=True) < 0:
            fail("top_k", f"must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < number("top_p") <= 1:
            fail("top_p", f"must be in (0, 1], got {self.top_p}")
        if number("repetition_penalty") <= 0:
            fail("repetition_penalty", f"must be > 0 (1 turns it off), got {self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -2**63 <= self.seed < 2**64):
            fail("seed", f"must be an integer from -2**63 to 2**64 - 1, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise GenerationError("stop strings must be non-empty strings", param="stop")
        if self.logprobs is not None and not 0 <= number("logprobs", integer=True) <= MAX_LOGPROBS:
            fail("logprobs", f"must be from 0 to {MAX_LOGPROBS}, got {self.logprobs}")
        return self
