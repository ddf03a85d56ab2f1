"""What the deployment must serve: request shape, arrival rate and latency targets."""

from __future__ import annotations

import msgspec


class WorkloadError(ValueError):
    """A workload or SLO value is out of range; the message names the flag."""


class Workload(msgspec.Struct, frozen=True, kw_only=True):
    """Fixed prompt/output lengths with Poisson arrivals at ``rate`` requests/s."""

    isl: int
    osl: int
    rate: float

    def __post_init__(self) -> None:
        if self.isl < 1 or self.osl < 1:
            raise WorkloadError(f"--isl and --osl must be >= 1, got {self.isl} and {self.osl}")
        if self.rate <= 0:
            raise WorkloadError(f"--rate must be > 0 requests/s, got {self.rate}")

    @property
    def mean_context(self) -> float:
        """Average tokens a running decode holds in KV: the prompt plus half the output."""
        return self.isl + self.osl / 2


class Slo(msgspec.Struct, frozen=True, kw_only=True):
    """p90 latency targets in seconds (``quantile`` = 0.9 unless the user asks otherwise)."""

    ttft_s: float
    tpot_s: float
    quantile: float = 0.9

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.tpot_s <= 0:
            raise WorkloadError(f"--ttft-p90 and --tpot-p90 must be > 0 ms, got "
                                f"{self.ttft_s * 1e3:g} and {self.tpot_s * 1e3:g}")
        if not 0.5 <= self.quantile < 1:
            raise WorkloadError(f"SLO quantile must be in [0.5, 1), got {self.quantile}")
