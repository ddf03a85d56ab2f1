"""One instance serving both phases, scheduled the way vLLM V1 does it.

vLLM V1's scheduler (``vllm/v1/core/sched/scheduler.py``) fills each step's token budget
(``max_num_batched_tokens``) with the running requests first, one token per decode, and gives
what is left to waiting prompts, chunked to fit. So at a mean of ``B`` running decodes:

* a *mixed* step carries B decodes and a prompt chunk of ``C = budget - B`` tokens; a *decode*
  step carries the B decodes alone;
* prompts need ``rate x ISL`` chunk tokens per second, so a fraction ``x = rate ISL tau / C`` of
  steps are mixed, and the mean step is ``tau = tau_d / (1 - rate ISL (tau_m - tau_d) / C)``;
* decodes advance one token per step: Little's law ``B = rate OSL tau(B)`` fixes B;
* a prompt is served at chunk speed, ``S = max(1, ISL / C) tau_m``: an M/D/1 queue of service S,
  plus half a step for the one in progress on arrival, gives TTFT. Under load decodes take budget
  and mixed steps stretch, so TTFT rises with load, as measured (docs/planner.md).

TPOT is the mean step at the Poisson q-quantile of the others in the batch, as for decode pools.
"""

from __future__ import annotations

import math

import msgspec

from vllm_hetero_pd.planner import perf
from vllm_hetero_pd.planner.catalog import Device
from vllm_hetero_pd.planner.model import ModelSpec
from vllm_hetero_pd.planner.queueing import md1_mean_wait, md1_wait_quantile, poisson_quantile
from vllm_hetero_pd.planner.workload import Slo, Workload


class Schedule(msgspec.Struct, frozen=True):
    """The colocated instance's steady state at one arrival rate (times in seconds)."""

    batch: float  # mean running decodes
    chunk: float  # prompt tokens per mixed step
    decode_step_s: float
    mixed_step_s: float
    mean_step_s: float
    prefill_service_s: float

    @property
    def overloaded(self) -> bool:
        return math.isinf(self.mean_step_s)


class Instance(msgspec.Struct, frozen=True):
    """What the schedule of one (device, TP) needs, computed once per workload."""

    step: perf.StepModel
    budget: int  # vLLM's max_num_batched_tokens
    chunk_compute_s: float  # per prompt token: matmuls + attention at its mean position
    prefill_extra_s: float  # a mixed step's fixed cost beyond a decode step's
    workload: Workload


def instance(model: ModelSpec, device: Device, tp: int, workload: Workload) -> Instance:
    """Step costs of (device, TP) for ``workload``, with vLLM's default token budget."""
    attention = model.prefill_attention_flops(workload.isl) / workload.isl
    chunk = (2 * model.num_active_params / device.peak_flops(model.low_precision)
             + attention / device.attention_flops) / tp
    return Instance(step=perf.step_model(model, device, tp, workload.mean_context),
                    budget=perf.serve_defaults(device, tp).max_num_batched_tokens, chunk_compute_s=chunk,
                    prefill_extra_s=max(device.prefill_overhead_s - device.step_overhead_s, 0.0), workload=workload)


def _steps(inst: Instance, rate: float, batch: float) -> tuple[float, float, float]:
    """(decode step, mixed step, mean step) with ``batch`` decodes running; the mean is inf when
    prompts cannot keep up (the budget left after the decodes is too small)."""
    chunk = inst.budget - batch
    decode = inst.step.time(batch)
    if chunk < 1:
        return decode, math.inf, math.inf
    mixed = inst.step.time(batch, chunk, inst.chunk_compute_s) + inst.prefill_extra_s
    busy = rate * inst.workload.isl * (mixed - decode) / chunk
    return decode, mixed, decode / (1 - busy) if busy < 1 else math.inf


def _at_batch(inst: Instance, rate: float, batch: float) -> Schedule:
    """The full schedule if ``batch`` decodes were running."""
    isl, chunk = inst.workload.isl, inst.budget - batch
    decode, mixed, mean = _steps(inst, rate, batch)
    if math.isinf(mixed):
        return Schedule(batch, 0.0, decode, mixed, mean, math.inf)
    first = inst.step.time(batch, min(isl, chunk), inst.chunk_compute_s) + inst.prefill_extra_s
    return Schedule(batch, chunk, decode, mixed, mean, first * max(1.0, isl / chunk))


def schedule(inst: Instance, rate: float) -> Schedule:
    """Steady state at ``rate``: least fixed point of ``B = rate OSL tau(B)``. Below it
    ``rate OSL tau(b) > b``; doubling b finds a point past it, then bisection. Overloaded when no
    b under the budget gets there (decodes would crowd prompts out of the budget)."""
    c = rate * inst.workload.osl

    def below(b: float) -> bool:
        return c * _steps(inst, rate, b)[2] > b

    hi = 1.0
    while below(hi):
        if hi >= inst.budget:
            return _at_batch(inst, rate, math.inf)
        hi *= 2
    return _at_batch(inst, rate, perf.bisect(below, hi / 2 if hi > 1 else 0.0, hi, steps=32))


def _latency(inst: Instance, rate: float, state: Schedule, q: float | None) -> tuple[float, float]:
    if state.overloaded or rate * state.prefill_service_s >= 1:
        return math.inf, math.inf
    service = state.prefill_service_s
    wait = md1_mean_wait(rate, service) if q is None else md1_wait_quantile(rate, service, q)
    ttft = wait + service + state.mean_step_s / 2
    if q is None:
        return ttft, state.mean_step_s
    return ttft, _steps(inst, rate, 1 + poisson_quantile(state.batch, q))[2]


def latency(inst: Instance, rate: float, q: float | None) -> tuple[float, float]:
    """(TTFT, TPOT) q-quantiles at ``rate``, or their means for ``q=None`` (what benchmark
    tables publish); inf when overloaded."""
    return _latency(inst, rate, schedule(inst, rate), q)


def predict(model: ModelSpec, device: Device, tp: int, workload: Workload, rate: float,
            q: float | None) -> tuple[float, float]:
    """(TTFT, TPOT) q-quantiles (means for None) of (device, TP) serving ``workload`` at ``rate``."""
    return latency(instance(model, device, tp, workload), rate, q)


def capacity(model: ModelSpec, device: Device, tp: int, workload: Workload, slo: Slo) -> perf.Capacity:
    """Largest rate at which TTFT, TPOT, KV memory and ``max_num_seqs`` all hold."""
    problem = perf.fit_problem(model, device, tp, workload.isl + workload.osl)
    if problem:
        return perf.Capacity(device=device.name, tp=tp, rate=0.0, binding="memory", reason=problem)
    inst = instance(model, device, tp, workload)
    ttft0, tpot0 = latency(inst, 1e-9, slo.quantile)
    if ttft0 > slo.ttft_s or tpot0 > slo.tpot_s:
        which, floor, target = (("TTFT", ttft0, slo.ttft_s) if ttft0 > slo.ttft_s else ("TPOT", tpot0, slo.tpot_s))
        return perf.Capacity(device=device.name, tp=tp, rate=0.0, binding=which, floor_s=floor,
                             reason=f"{which} floor {floor * 1e3:.1f} ms on {perf.label(device, tp)} "
                                    f"(colocated) > SLO {target * 1e3:.1f} ms")
    seqs = min(int(perf.max_sequences(model, device, tp, workload.mean_context)),
               perf.serve_defaults(device, tp).max_num_seqs)

    def why_not(rate: float) -> str:
        state = schedule(inst, rate)
        ttft, tpot = _latency(inst, rate, state, slo.quantile)
        if ttft > slo.ttft_s:
            return "TTFT"
        if tpot > slo.tpot_s:
            return "TPOT"
        return "KV memory" if poisson_quantile(state.batch, slo.quantile) > seqs else ""

    upper = 1 / inst.step.time(0)  # a prompt needs at least one step
    rate = perf.bisect(lambda r: not why_not(r), 0.0, upper, steps=40)
    return perf.Capacity(device=device.name, tp=tp, rate=rate, binding=why_not(rate * 1.001) or "TTFT",
                         max_num_seqs=seqs)
