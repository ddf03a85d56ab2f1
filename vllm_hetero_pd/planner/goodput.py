"""Predicted goodput: the share of requests meeting a per-request TTFT and TPOT SLO, times the rate.

The latency models give quantiles: ``colocated.predict`` for one engine serving both phases,
``pd_validate.latency_at`` for one prefill and one decode engine. A metric's attainment is the
largest q whose q-quantile is within its limit (the quantiles rise with q, so bisection finds it).
A request must meet both: the two attainments are multiplied, as if TTFT and TPOT were
independent. For P/D they come from different engines; in one colocated engine a long prefill
delays both, so the product is a lower bound there. An overloaded engine's quantiles are infinite
and its predicted attainment is 0 (the steady state of a finite run still lets early requests
through, so a measured run past capacity scores above the prediction).

Only fixed lengths are modelled (docs/planner.md, Limits): a mix of lengths is predicted at its
mean ISL and OSL.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from vllm_hetero_pd.planner import colocated, perf
from vllm_hetero_pd.planner.catalog import Device, Link
from vllm_hetero_pd.planner.model import ModelSpec
from vllm_hetero_pd.planner.pd_validate import QUANTILES, latency_at
from vllm_hetero_pd.planner.workload import Workload, WorkloadError

MAX_QUANTILE = 0.9999  # attainment resolution; the Poisson quantile never returns at q = 1


class RequestSlo(msgspec.Struct, frozen=True, kw_only=True):
    """A request meets the SLO when its own TTFT and its own mean TPOT are both within these."""

    ttft_s: float
    tpot_s: float

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.tpot_s <= 0:
            raise WorkloadError(f"--ttft-slo-ms and --tpot-slo-ms must be > 0, got "
                                f"{self.ttft_s * 1e3:g} and {self.tpot_s * 1e3:g}")


class Predicted(msgspec.Struct, frozen=True, kw_only=True):
    """The model's view of one setting at one rate: p50/p90 latencies (s) and SLO attainment."""

    rate: float
    ttft_s: tuple[float, float]
    tpot_s: tuple[float, float]
    attainment: float

    @property
    def goodput(self) -> float:
        """Requests/s meeting the SLO."""
        return self.rate * self.attainment


Latency = Callable[[float], tuple[float, float]]  # q -> (TTFT, TPOT) q-quantiles


def attainment(quantile: Callable[[float], float], limit_s: float) -> float:
    """Share of requests within ``limit_s``: the largest q whose q-quantile is within it."""
    if quantile(MAX_QUANTILE) <= limit_s:
        return MAX_QUANTILE
    return perf.bisect(lambda q: quantile(q) <= limit_s, 0.0, MAX_QUANTILE, steps=30)


def predicted(rate: float, latency: Latency, slo: RequestSlo) -> Predicted:
    """Quantiles and joint attainment (product of TTFT's and TPOT's) from one latency model."""
    ttft, tpot = zip(*(latency(q) for q in QUANTILES))
    share = attainment(lambda q: latency(q)[0], slo.ttft_s) * attainment(lambda q: latency(q)[1], slo.tpot_s)
    return Predicted(rate=rate, ttft_s=ttft, tpot_s=tpot, attainment=share)


def colocated_point(model: ModelSpec, device: Device, workload: Workload, slo: RequestSlo) -> Predicted:
    """One engine on ``device`` (TP1) serving prefill and decode at ``workload.rate``."""
    return predicted(workload.rate, lambda q: colocated.predict(model, device, 1, workload, workload.rate, q), slo)


def pd_point(model: ModelSpec, prefill: Device, decode: Device, link: Link, workload: Workload,
             slo: RequestSlo) -> Predicted:
    """One prefill and one decode engine (TP1) joined by ``link`` at ``workload.rate``."""
    return predicted(workload.rate, lambda q: latency_at(model, prefill, decode, link, workload, q), slo)
