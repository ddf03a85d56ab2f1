"""The workload of ``bench dynamic``: one seeded arrival schedule whose shape changes phase.

Each phase is a Poisson arrival process at ``rate`` over ``duration_s``, and each request in it
draws its prompt length and ``max_tokens`` uniformly from the phase's ranges. Phases follow one
another: the second starts when the first's duration is over, so every arrival of a phase comes
before every arrival of the next. Prompts are random token ids (``planner.calibrate.random_prompt``,
the calibration's own prompts), fresh for every request, so no request can hit another's prefix in
the cache. The schedule depends only on the phases, the vocabulary size and the seed: every
configuration of the bench replays the same requests at the same offsets.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import msgspec

from vllm_hetero_pd.planner.calibrate import random_prompt


class Phase(msgspec.Struct, frozen=True, kw_only=True):
    """A stretch of the run with one arrival rate and one request shape (ranges inclusive)."""

    name: str
    rate: float  # requests/s
    duration_s: float
    prompt_tokens: tuple[int, int]
    max_tokens: tuple[int, int]

    def __post_init__(self) -> None:
        if not self.rate > 0 or not self.duration_s > 0:
            raise ValueError(f"phase {self.name}: rate and duration_s must be > 0, got {self.rate} and "
                             f"{self.duration_s}")
        for field, (low, high) in (("prompt_tokens", self.prompt_tokens), ("max_tokens", self.max_tokens)):
            if not 1 <= low <= high:
                raise ValueError(f"phase {self.name}: {field} must be a range 1 <= low <= high, got {low}-{high}")


class ScheduledRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One request of the schedule: when it arrives (seconds from the start) and what it asks for."""

    index: int
    phase: str
    at_s: float
    prompt: list[int]
    max_tokens: int


def schedule(phases: Sequence[Phase], vocab_size: int, seed: int) -> list[ScheduledRequest]:
    """Every request of the run in arrival order, the same for the same arguments."""
    rng = random.Random(seed)
    requests: list[ScheduledRequest] = []
    start_s = 0.0
    for phase in phases:
        offset_s = rng.expovariate(phase.rate)
        while offset_s < phase.duration_s:
            requests.append(ScheduledRequest(index=len(requests), phase=phase.name, at_s=start_s + offset_s,
                                             prompt=random_prompt(rng, rng.randint(*phase.prompt_tokens), vocab_size),
                                             max_tokens=rng.randint(*phase.max_tokens)))
            offset_s += rng.expovariate(phase.rate)
        start_s += phase.duration_s
    return requests


def phase_starts(phases: Sequence[Phase]) -> list[float]:
    """Offset (s) at which each phase begins: where the report and the plot draw phase boundaries."""
    starts, start_s = [], 0.0
    for phase in phases:
        starts.append(start_s)
        start_s += phase.duration_s
    return starts
