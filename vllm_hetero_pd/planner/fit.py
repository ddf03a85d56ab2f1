"""Fit a device's efficiency factors and overheads to latencies measured on a running instance.

Pure: samples in, a new ``Device`` out. The model being fitted is the one ``perf`` predicts with:

* prefill ``t(L) = prefill_overhead + matmul FLOPs / (peak x efficiency) + attention FLOPs /
  (BF16 peak x attention_efficiency)`` (prompts long enough to be compute-bound, TP 1 so no
  all-reduce); linear in the three unknowns, so least squares with non-negative coefficients;
* decode ``t(B, c) = max(bytes(B, c) / (bandwidth x memory_efficiency), FLOPs(B, c) / achieved
  FLOP/s) + step_overhead + B x per_sequence_overhead``; for each memory efficiency on a grid the
  rest is linear, so we solve the two overheads by least squares and keep the grid point with the
  smallest error. All fits minimise relative error, so short and long latencies count alike.
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
    return msgspec.structs.replace(device, bf16_efficiency=1.0, fp8_efficiency=1.0, attention_efficiency=1.0,
                                   memory_efficiency=1.0, prefill_overhead_s=0.0, step_overhead_s=0.0,
                                   per_sequence_overhead_s=0.0)


def _relative(features: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Non-negative least squares on relative error (as DistServe fits its latency model)."""
    return _nonnegative_lstsq(features / target[:, None], np.ones_like(target))


def _fit_prefill(base: Device, model: ModelSpec, tp: int, prefill: list[PrefillSample]) -> Device:
    """``t(L) = overhead + matmul FLOPs / matmul rate + attention FLOPs / attention rate``."""
    ideal = _ideal(base)
    matmul = np.array([perf.prefill_matmul_flops(model, s.num_tokens) for s in prefill]) / (
        tp * ideal.peak_flops(model.low_precision))
    attention = np.array([model.prefill_attention_flops(s.num_tokens) for s in prefill]) / (
        tp * ideal.attention_flops)
    measured = np.array([s.seconds for s in prefill])
    overhead, k_matmul, k_attention = (float(x) for x in _relative(
        np.column_stack([np.ones_like(matmul), matmul, attention]), measured))
    # efficiency = 1 / k; a device faster than its datasheet peak gets its peak raised instead
    scale = 1 / k_matmul if k_matmul > 0 else 1.0
    peak_scale, eff = (scale, 1.0) if scale > 1 else (1.0, scale)
    bf16_tflops = base.bf16_tflops * peak_scale
    attention_eff = min(1.0, base.bf16_tflops / (bf16_tflops * k_attention)) if k_attention > 0 else 1.0
    return msgspec.structs.replace(base, bf16_tflops=bf16_tflops, fp8_tflops=base.fp8_tflops * peak_scale,
                                   bf16_efficiency=eff, fp8_efficiency=eff, attention_efficiency=attention_eff,
                                   prefill_overhead_s=overhead)


def _fit_decode(device: Device, model: ModelSpec, tp: int, decode: list[DecodeSample]) -> Device:
    """Grid over memory efficiency; overheads by relative least squares at each grid point."""
    measured = np.array([s.step_seconds for s in decode])
    batches = np.array([s.batch for s in decode], dtype=float)
    best = (math.inf, device)
    for mem_eff in np.geomspace(0.01, 1.0, 100):
        trial = msgspec.structs.replace(device, memory_efficiency=float(mem_eff), step_overhead_s=0.0,
                                        per_sequence_overhead_s=0.0)
        roof = np.array([perf.decode_step_s(model, trial, tp, s.batch, s.context) for s in decode])
        rest = measured - roof
        if (rest < 0).all():
            continue  # the roofline alone is slower than every measurement: efficiency too low
        a, c = _relative(np.column_stack([np.ones_like(batches), batches]), np.maximum(rest, 1e-9))
        predicted = roof + a + c * batches
        err = float(np.sum(((predicted - measured) / measured) ** 2))
        if err < best[0]:
            best = (err, msgspec.structs.replace(trial, step_overhead_s=float(a), per_sequence_overhead_s=float(c)))
    return best[1]


def fit_device(base: Device, model: ModelSpec, tp: int, prefill: list[PrefillSample],
               decode: list[DecodeSample], name: str, where: str) -> tuple[Device, FitReport]:
    """``base`` with efficiencies and overheads fitted; sources say where and when."""
    if len(prefill) < 3 or len(decode) < 3:
        raise ValueError(f"need >= 3 prefill and >= 3 decode samples, got {len(prefill)} and {len(decode)}")
    fitted = _fit_decode(_fit_prefill(msgspec.structs.replace(base, name=name), model, tp, prefill),
                         model, tp, decode)
    measured_p = np.array([s.seconds for s in prefill])
    measured_d = np.array([s.step_seconds for s in decode])
    report = FitReport(
        prefill_rms_rel_error=_rms_rel(np.array([perf.prefill_s(model, fitted, tp, s.num_tokens) for s in prefill]),
                                       measured_p),
        decode_rms_rel_error=_rms_rel(np.array([perf.decode_step_s(model, fitted, tp, s.batch, s.context)
                                                for s in decode]), measured_d),
        num_prefill=len(prefill), num_decode=len(decode))
    stamp = f"calibrated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {where} ({model.name}, TP{tp})"
    fitted_fields = ("bf16_tflops", "fp8_tflops", "bf16_efficiency", "fp8_efficiency", "attention_efficiency",
                     "memory_efficiency", "prefill_overhead_s", "step_overhead_s", "per_sequence_overhead_s")
    sources = {**base.sources, **{f: f"{stamp}: least-squares fit on relative error, prefill RMS error "
                                     f"{report.prefill_rms_rel_error:.1%}, decode {report.decode_rms_rel_error:.1%}"
                                  for f in fitted_fields}}
    return msgspec.structs.replace(fitted, sources=sources), report
