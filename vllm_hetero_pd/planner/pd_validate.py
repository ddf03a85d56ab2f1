"""Validate the disaggregated model on a real CPU P/D pair: predict, then measure (review finding 8).

The planner drives no engines (docs/architecture.md: it imports nothing else of ours), so the pair
is started with the existing launchers and this command is pointed at it. On a quiet host:

    MODEL=$(vllm-hetero-pd tiny-model)
    vllm-hetero-pd launch --model "$MODEL" --connector HeteroNixlConnector --log-dir /tmp/pd-logs &
    vllm-hetero-pd proxy --port 8000 --prefill http://127.0.0.1:PREFILL_PORT --decode http://127.0.0.1:DECODE_PORT &
    vllm-hetero-pd bench planner-pd --model "$MODEL" --prefill-url http://127.0.0.1:PREFILL_PORT \
        --decode-url http://127.0.0.1:DECODE_PORT --router-url http://127.0.0.1:8000 --out /tmp/pd-validate

(``launch`` prints both URLs once healthy.) Steps:

1. *Calibrate* on runs that are not validated: isolated prefills on the prefill engine and closed
   decode batches on the decode engine fit the CPU device (``calibrate``/``fit``); sequential
   requests through the router at two prompt lengths fit the KV link (latency and GB/s of what the
   router and connector add beyond prefill and the first decode step).
2. *Predict* TTFT and TPOT p50/p90 at each arrival rate (``--load``, fractions of the predicted
   prefill capacity) with the P/D model: M/D/1 prefill + KV hand-off + first decode step, and
   Little's-law decode with Poisson batch fluctuations.
3. *Measure* each rate with Poisson arrivals through the router, and one rate twice: the spread of
   that repeat is the noise floor the model error should be read against.

The load average is printed before and after. Pure parts (link fit, quantiles, prediction, table)
are unit-tested in tests/unit/test_planner_pd_validate.py.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import msgspec
import numpy as np

from vllm_hetero_pd.planner import perf
from vllm_hetero_pd.planner.catalog import Device, Link
from vllm_hetero_pd.planner.model import ModelSpec
from vllm_hetero_pd.planner.workload import Workload

QUANTILES = (0.5, 0.9)


class Latencies(msgspec.Struct, frozen=True):
    """TTFT and TPOT p50/p90 in seconds, measured or predicted."""

    ttft: tuple[float, float]
    tpot: tuple[float, float]


class PointResult(msgspec.Struct, frozen=True, kw_only=True):
    """One arrival rate: what the model said and what the pair did (twice for the repeated point)."""

    isl: int
    osl: int
    rate: float
    predicted: Latencies
    measured: list[Latencies]

    def errors(self) -> list[float]:
        """Relative error of each predicted quantile against the first measurement: TTFT p50, p90, TPOT p50, p90."""
        got = self.measured[0]
        return [p / m - 1 for p, m in zip((*self.predicted.ttft, *self.predicted.tpot), (*got.ttft, *got.tpot))]

    def noise(self) -> list[float] | None:
        """Spread of the repeat (max/min - 1) per quantile, or None when the point ran once."""
        if len(self.measured) < 2:
            return None
        runs = [(*m.ttft, *m.tpot) for m in self.measured]
        return [max(col) / min(col) - 1 for col in zip(*runs)]


def quantiles(values: list[float]) -> tuple[float, float]:
    """NaN where nothing was measured (a 2-token link-calibration request may arrive in one chunk)."""
    return tuple(float(np.quantile(values, q)) if values else math.nan for q in QUANTILES)


def fit_link(model: ModelSpec, prefill: Device, decode: Device, base: Link,
             samples: list[tuple[int, float]]) -> Link:
    """Link latency and GB/s from sequential TTFTs through the router, ``(prompt tokens, TTFT)``:
    what is left after the fitted prefill and one decode step is ``latency + KV bytes / rate``."""
    rows = []
    for tokens, ttft in samples:
        rest = ttft - perf.prefill_s(model, prefill, 1, tokens) - perf.decode_step_s(model, decode, 1, 1, tokens)
        rows.append((model.kv_bytes(tokens, 1), max(rest, 0.0)))
    kv, rest = (np.array(x) for x in zip(*rows))
    slope, latency = np.polyfit(kv, rest, 1) if len(set(kv)) > 1 else (0.0, float(rest.mean()))
    gb_s = 1 / (slope * 1e9) if slope > 1e-15 else base.gb_s * 100  # transfer time too small to see
    return msgspec.structs.replace(base, latency_s=max(float(latency), 0.0), gb_s=float(gb_s),
                                   source=f"fitted: sequential TTFTs through the router at {sorted(kv.tolist())} B")


def latency_at(model: ModelSpec, prefill: Device, decode: Device, link: Link, workload: Workload,
               q: float) -> tuple[float, float]:
    """The P/D model's (TTFT, TPOT) q-quantiles for one prefill and one decode instance at TP1."""
    service = perf.prefill_s(model, prefill, 1, workload.isl)
    kv = perf.kv_transfer_s(model, prefill, 1, perf.endpoint(decode, 1), link, workload.isl)
    batch = perf.decode_batch(model, decode, 1, workload, workload.rate)
    first = perf.decode_step_s(model, decode, 1, 1 + batch, workload.mean_context)
    return (perf.prefill_ttft_s(service, kv + first, workload.rate, q),
            perf.decode_tpot_s(model, decode, 1, workload, workload.rate, q))


def predict(model: ModelSpec, prefill: Device, decode: Device, link: Link, workload: Workload) -> Latencies:
    """The P/D model's TTFT and TPOT p50/p90 for one prefill and one decode instance at TP1."""
    ttft, tpot = zip(*(latency_at(model, prefill, decode, link, workload, q) for q in QUANTILES))
    return Latencies(ttft=ttft, tpot=tpot)


def arrivals(rate: float, count: int, seed: int) -> list[float]:
    """Poisson arrival times (seconds from the start)."""
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(count):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def table(points: list[PointResult]) -> str:
    """Markdown: per rate, predicted / measured TTFT and TPOT p50 and p90, error, and the repeat's spread."""
    def ms(x: float) -> str:
        return "inf" if math.isinf(x) else f"{x * 1e3:.1f}"

    lines = ["| ISL | OSL | rate | TTFT p50 pred / meas (ms) | p90 | TPOT p50 pred / meas (ms) | p90 | "
             "error TTFT p50, p90, TPOT p50, p90 | repeat spread |", "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        m = p.measured[0]
        cells = [f"{ms(a)} / {ms(b)}" for a, b in zip((*p.predicted.ttft, *p.predicted.tpot), (*m.ttft, *m.tpot))]
        noise = p.noise()
        lines.append(f"| {p.isl} | {p.osl} | {p.rate:.3g} | " + " | ".join(cells) + " | "
                     + ", ".join(f"{e:+.0%}" for e in p.errors()) + " | "
                     + (", ".join(f"{n:.0%}" for n in noise) if noise else "-") + " |")
    return "\n".join(lines)


async def _measure(url: str, workload: Workload, count: int, vocab: int, seed: int) -> Latencies:
    from vllm_hetero_pd.planner.calibrate import open_loop, random_prompt, successes

    rng = random.Random(seed)
    delays = arrivals(workload.rate, count, seed)
    runs = successes(await open_loop(url, [(d, random_prompt(rng, workload.isl, vocab), workload.osl) for d in delays]))
    tpots = [(r.chunk_times[-1] - r.chunk_times[0]) / (len(r.chunk_times) - 1) for r in runs if len(r.chunk_times) > 1]
    return Latencies(ttft=quantiles([r.ttft_s for r in runs]), tpot=quantiles(tpots))


def calibrate_pair(model: ModelSpec, prefill_url: str, decode_url: str, router_url: str,
                   name: str = "CPU-calibrated", lengths: Sequence[int] = (32, 128, 256, 512),
                   contexts: Sequence[int] = (64, 256)) -> tuple[Device, Link]:
    """Fit the CPU device (prefill terms on the prefill engine at ``lengths``, decode terms on the
    decode engine at ``contexts``) and the link, on calibration runs only: give lengths and contexts
    that span the workload, since the fit extrapolates the attention terms poorly."""
    from vllm_hetero_pd.planner.calibrate import measure_decode, measure_prefill
    from vllm_hetero_pd.planner.catalog import load_catalog
    from vllm_hetero_pd.planner.fit import fit_device

    catalog = load_catalog()
    base = catalog.device("CPU")
    pre_samples = asyncio.run(measure_prefill(prefill_url, list(lengths), 5, model.vocab_size))
    dec_samples = asyncio.run(measure_decode(decode_url, [1, 2, 4, 8], list(contexts), 32, model.vocab_size))
    device, _ = fit_device(base, model, 1, pre_samples, dec_samples, name, f"{prefill_url} + {decode_url}")
    link_samples = []
    for tokens in (64, 512):
        for seed in range(3):  # sequential requests: no queueing
            got = asyncio.run(_measure(router_url, Workload(isl=tokens, osl=2, rate=1e-3), 1, model.vocab_size, seed))
            link_samples.append((tokens, got.ttft[0]))
    return device, fit_link(model, device, device, catalog.link(base, base), link_samples)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the served model directory (vllm-hetero-pd tiny-model)")
    parser.add_argument("--prefill-url", required=True)
    parser.add_argument("--decode-url", required=True)
    parser.add_argument("--router-url", required=True, help="the router in front of exactly these two")
    parser.add_argument("--isl", type=int, default=256)
    parser.add_argument("--osl", type=int, default=32)
    parser.add_argument("--load", default="0.2,0.4,0.6",
                        help="arrival rates as fractions of predicted prefill capacity")
    parser.add_argument("--requests", type=int, default=60, help="requests per rate")
    parser.add_argument("--repeat", type=int, default=1, help="index into --load of the point measured twice")
    parser.add_argument("--out", type=Path, default=None)


def run(args: argparse.Namespace) -> int:
    from vllm_hetero_pd.planner.model import load_model

    out = args.out or Path(tempfile.mkdtemp(prefix="planner-pd-validate-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    model = load_model(args.model, weight_dtype="bf16")
    device, link = calibrate_pair(model, args.prefill_url, args.decode_url, args.router_url)
    capacity = 1 / perf.prefill_s(model, device, 1, args.isl)
    points = []
    for i, frac in enumerate(float(x) for x in args.load.split(",")):
        workload = Workload(isl=args.isl, osl=args.osl, rate=frac * capacity)
        measured = [asyncio.run(_measure(args.router_url, workload, args.requests, model.vocab_size, 1000 * i + r))
                    for r in range(2 if i == args.repeat else 1)]
        points.append(PointResult(isl=args.isl, osl=args.osl, rate=workload.rate,
                                  predicted=predict(model, device, device, link, workload), measured=measured))
        print(table(points[-1:]).splitlines()[-1], flush=True)
    (out / "pd-validation.json").write_bytes(msgspec.json.encode({"points": points, "device": device, "link": link}))
    print(table(points))
    errors = [abs(e) for p in points for e in p.errors() if not math.isinf(e)]
    print(f"median |error| {statistics.median(errors):.0%}; load average after: {os.getloadavg()[0]:.2f}; "
          f"results in {out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_hetero_pd.planner.pd_validate",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
