"""Per-request sampling: its parameters, checked, and one token drawn per step.

Contract:

* ``SamplingParams(max_tokens, temperature, top_p, stop, seed)`` is validated on construction
  (``InvalidInputError`` naming the field: ``max_tokens`` 1..``MAX_TOKENS``, ``temperature``
  0..2, ``top_p`` in (0, 1], at most ``MAX_STOPS`` stop strings of 1..``MAX_STOP_CHARS``
  characters, ``seed`` a non-negative integer below 2**63 or None). ``temperature`` 0 is greedy
  (argmax; no randomness is drawn).
* ``Sampler`` is one sequence's sampler: its own ``torch.Generator`` (seeded with ``seed``, or
  from the OS when None), so a fixed seed gives the same tokens whatever else shares the batch.
  ``pick(logits)`` takes that sequence's next-token logits (``[V]``, any float dtype) and draws
  exactly one uniform number per sampled step (inverse CDF over the nucleus, computed in fp32),
  so two runs with one seed consume the generator identically.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

from adapters.errors import InvalidInputError

MAX_TOKENS = 4096
MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARS = 64
MAX_TEMPERATURE = 2.0


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) \
                or not 1 <= self.max_tokens <= MAX_TOKENS:
            raise InvalidInputError(f"max_tokens must be an integer in 1..{MAX_TOKENS}", param="max_tokens")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) \
                or not 0 <= t <= MAX_TEMPERATURE:
            raise InvalidInputError(f"temperature must be a number in 0..{MAX_TEMPERATURE:g}", param="temperature")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 < p <= 1:
            raise InvalidInputError("top_p must be a number in (0, 1]", param="top_p")
        if not isinstance(self.stop, tuple) or len(self.stop) > MAX_STOPS:
            raise InvalidInputError(f"stop must be at most {MAX_STOPS} strings", param="stop")
        for i, s in enumerate(self.stop):
            if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS:
                raise InvalidInputError(f"stop[{i}] must be a string of 1 to {MAX_STOP_CHARS} characters",
                                        param=f"stop[{i}]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise InvalidInputError("seed must be a non-negative integer below 2**63", param="seed")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """One sequence's token picker (see the module docstring)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator()  # CPU: the draw is the same on any device
        self.generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))

    def pick(self, logits: torch.Tensor) -> int:
        p = self.params
        if p.greedy:
            return int(torch.argmax(logits))
        x = logits.detach().to("cpu", torch.float32) / p.temperature
        probs = torch.softmax(x, dim=-1)
        u = float(torch.rand((), generator=self.generator))
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            cum = torch.cumsum(sorted_p, dim=-1)
            keep = int(torch.searchsorted(cum, torch.tensor(p.top_p)).item()) + 1  # smallest nucleus >= top_p
            sorted_p, order = sorted_p[:keep], order[:keep]
            cum = torch.cumsum(sorted_p, dim=-1)
            i = int(torch.searchsorted(cum, torch.tensor(u * float(cum[-1]))).item())
            return int(order[min(i, keep - 1)])
        cum = torch.cumsum(probs, dim=-1)
        i = int(torch.searchsorted(cum, torch.tensor(u * float(cum[-1]))).item())
        return min(i, probs.shape[0] - 1)
