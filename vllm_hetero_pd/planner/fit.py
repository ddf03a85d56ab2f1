"""Fit a device's efficiency factors and overheads to latencies measured on a running instance.

Pure: samples in, a new ``Device`` out. The model being fitted is the one ``perf`` predicts with:

* prefill ``t(L) = prefill_overhead + FLOPs(L) / (peak x compute_efficiency)`` (prompts long
  enough to be compute-bound, TP 1 so no all-reduce); linear in the two unknowns, so least squares
  with non-negative coefficients;
* decode ``t(B, c) = max(bytes(B, c) / (bandwidth x memory_efficiency), FLOPs(B, c) / achieved
  FLOP/s) + step_overhead + B x per_sequence_overhead``; for each memory efficiency on a grid the
  rest is linear, so we solve the two overheads by least squares and keep the grid point with the
  smallest squared error.
"""

from __future__ import annotations

import itertools
import math
import time

import msgspec
import numpy as np

from vllm_hetero_pd.planner import perf
from vllm_hetero_pd.planner.catalog import Device
from vllm_hetero_pd.planner.model import ModelSpec


class PrefillSample(msgspec.Struct, frozen=True):
    num_tokens: int
    seconds: float


class DecodeSample(msgspec.Struct, frozen=True):
    batch: int
    context: float
    step_seconds: float


class FitReport(msgspec.Struct, frozen=True, kw_only=True):
    """Relative RMS error of the fitted model on the samples it was fitted to."""

    prefill_rms_rel_error: float
    decode_rms_rel_error: float
    num_prefill: int
    num_decode: int


def _nonnegative_lstsq(features: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0 (exact for 2 unknowns: try each active set)."""
    best, best_err = np.zeros(features.shape[1]), math.inf
    cols = range(features.shape[1])
    for k in range(1, features.shape[1] + 1):
        for subset in itertools.combinations(cols, k):
            coef, *_ = np.linalg.lstsq(features[:, subset], target, rcond=None)
            if (coef < 0).any():
                continue
            full = np.zeros(features.shape[1])
            full[list(subset)] = coef
            err = float(np.sum((features @ full - target) ** 2))
            if err < best_err:
                best, best_err = full, err
    return best


def _rms_rel(predicted: np.ndarray, measured: np.ndarray) -> float:
    return float(np.sqrt(np.mean(((predicted - measured) / measured) ** 2)))


def _ideal(device: Device) -> Device:
    """The device at 100 % efficiency and zero overheads: the roofline's raw features."""
    return msgspec.structs.replace(device, bf16_efficiency=1.0, fp8_efficiency=1.0, memory_efficiency=1.0,
                                   prefill_overhead_s=0.0, step_overhead_s=0.0, per_sequence_overhead_s=0.0)


def fit_device(base: Device, model: ModelSpec, tp: int, prefill: list[PrefillSample],
               decode: list[DecodeSample], name: str, where: str) -> tuple[Device, FitReport]:
    """``base`` with efficiencies and overheads fitted; sources say where and when."""
    if len(prefill) < 2 or len(decode) < 3:
        raise ValueError(f"need >= 2 prefill and >= 3 decode samples, got {len(prefill)} and {len(decode)}")
    ideal = _ideal(base)
    # prefill: t = a + k x ideal_compute_time, k = 1 / efficiency (prefill is compute-bound)
    peak = tp * ideal.peak_flops(model.fp8_weights)
    compute = np.array([perf.prefill_flops(model, s.num_tokens) / peak for s in prefill])
    measured_p = np.array([s.seconds for s in prefill])
    overhead_p, k = _nonnegative_lstsq(np.column_stack([np.ones_like(compute), compute]), measured_p)
    overhead_p, k = float(overhead_p), float(k)
    flops_scale = 1 / k if k > 0 else 1.0
    tflops, eff = (base.bf16_tflops * flops_scale, 1.0) if flops_scale > 1 else (base.bf16_tflops, flops_scale)
    fp8_tflops = base.fp8_tflops * flops_scale if flops_scale > 1 else base.fp8_tflops
    fitted = msgspec.structs.replace(base, name=name, bf16_tflops=tflops, fp8_tflops=fp8_tflops,
                                     bf16_efficiency=eff, fp8_efficiency=eff if base.fp8_tflops else eff,
                                     prefill_overhead_s=float(overhead_p))

    measured_d = np.array([s.step_seconds for s in decode])
    batches = np.array([s.batch for s in decode], dtype=float)
    best = (math.inf, 1.0, 0.0, 0.0)
    for mem_eff in np.geomspace(0.02, 1.0, 80):
        trial = msgspec.structs.replace(fitted, memory_efficiency=float(mem_eff), step_overhead_s=0.0,
                                        per_sequence_overhead_s=0.0)
        roof = np.array([perf.decode_step_s(model, trial, tp, s.batch, s.context) for s in decode])
        a, c = _nonnegative_lstsq(np.column_stack([np.ones_like(batches), batches]), measured_d - roof)
        err = float(np.sum(((roof + a + c * batches) - measured_d) ** 2))
        if err < best[0]:
            best = (err, float(mem_eff), float(a), float(c))
    _, mem_eff, step_a, seq_c = best
    fitted = msgspec.structs.replace(fitted, memory_efficiency=mem_eff, step_overhead_s=step_a,
                                     per_sequence_overhead_s=seq_c)
    report = FitReport(
        prefill_rms_rel_error=_rms_rel(np.array([perf.prefill_s(model, fitted, tp, s.num_tokens) for s in prefill]),
                                       measured_p),
        decode_rms_rel_error=_rms_rel(np.array([perf.decode_step_s(model, fitted, tp, s.batch, s.context)
                                                for s in decode]), measured_d),
        num_prefill=len(prefill), num_decode=len(decode))
    stamp = f"calibrated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {where} ({model.name}, TP{tp})"
    fitted_fields = ("bf16_tflops", "fp8_tflops", "bf16_efficiency", "fp8_efficiency", "memory_efficiency",
                     "prefill_overhead_s", "step_overhead_s", "per_sequence_overhead_s")
    sources = {**base.sources, **{f: f"{stamp}: least-squares fit, prefill RMS error "
                                     f"{report.prefill_rms_rel_error:.1%}, decode {report.decode_rms_rel_error:.1%}"
                                  for f in fitted_fields}}
    return msgspec.structs.replace(fitted, sources=sources), report
