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
from collections.abc import Awaitable, Sequence
from pathlib import Path

import msgspec
import numpy as np

from vllm_hetero_pd.planner import perf
from vllm_hetero_pd.planner.catalog import Device, Link
from vllm_hetero_pd.planner.fit import DecodeSample, PrefillSample
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


class Contention(msgspec.Struct, frozen=True):
    """How much each engine slows while the other works, measured on calibration runs.

    Why: on one host the two engines share memory bandwidth, the last-level cache and the cores
    that their front-end processes (tokenising, scheduling, streaming) run on. Timing one engine
    at a time, as the device fit does, leaves that out, and under load it is most of the error.
    """

    prefill: float = 1.0  # a prefill's time while the decode streams, over its time alone
    decode: float = 1.0  # a decode step's time while the prefill computes, over its time alone


NO_CONTENTION = Contention()


def latency_at(model: ModelSpec, prefill: Device, decode: Device, link: Link, workload: Workload,
               q: float, contention: Contention = NO_CONTENTION) -> tuple[float, float]:
    """The P/D model's (TTFT, TPOT) q-quantiles for one prefill and one decode instance at TP1.

    Each engine runs at its contended speed for the share of time the other one is busy: the
    decode is busy while it holds a stream (a Poisson batch is empty with probability e^-B), the
    prefill for its utilisation.
    """
    rate = workload.rate
    alone = perf.decode_batch(model, decode, 1, workload, rate)
    decode_busy = 1 - math.exp(-alone) if math.isfinite(alone) else 1.0
    service = perf.prefill_s(model, prefill, 1, workload.isl) * (1 + (contention.prefill - 1) * decode_busy)
    slowdown = 1 + (contention.decode - 1) * min(1.0, rate * service)
    kv = perf.kv_transfer_s(model, prefill, 1, perf.endpoint(decode, 1), link, workload.isl)
    batch = perf.decode_batch(model, decode, 1, workload, rate, slowdown)
    first = perf.decode_step_s(model, decode, 1, 1 + batch, workload.mean_context) * slowdown
    return (perf.prefill_ttft_s(service, kv + first, rate, q),
            perf.decode_tpot_s(model, decode, 1, workload, rate, q, slowdown))


def predict(model: ModelSpec, prefill: Device, decode: Device, link: Link, workload: Workload,
            contention: Contention = NO_CONTENTION) -> Latencies:
    """The P/D model's TTFT and TPOT p50/p90 for one prefill and one decode instance at TP1."""
    ttft, tpot = zip(*(latency_at(model, prefill, decode, link, workload, q, contention) for q in QUANTILES))
    return Latencies(ttft=ttft, tpot=tpot)


def arrivals(rate: float, count: int, seed: int) -> list[float]:
    """Poisson arrival times (seconds from the start)."""
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(count):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def median_error(points: list[PointResult]) -> float:
    """Median |relative error| over every finite predicted quantile of every point."""
    return statistics.median(abs(e) for p in points for e in p.errors() if math.isfinite(e))


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


async def _while_busy(url: str, prompt_tokens: int, max_tokens: int, clients: int, vocab: int, work):
    """Await ``work`` while ``clients`` closed-loop clients keep ``url`` busy with completions of
    ``prompt_tokens`` in and ``max_tokens`` out; a background client that fails fails the run."""
    import aiohttp

    from vllm_hetero_pd.planner.calibrate import HTTP_TIMEOUT, complete, random_prompt, served_model

    rng = random.Random(7)
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
        model = await served_model(session, url)

        async def client() -> None:
            while True:
                await complete(session, url, model, random_prompt(rng, prompt_tokens, vocab), max_tokens)

        tasks = [asyncio.create_task(client()) for _ in range(clients)]
        await asyncio.sleep(0.5)  # the background work has started
        try:
            return await work
        finally:
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception():
                    raise RuntimeError(f"background load on {url} failed: {task.exception()}")
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def measure_contention(prefill_url: str, decode_url: str, isl: int, vocab: int) -> Contention:
    """Each engine's time at the workload's prompt length, alone and while the other works: the
    prefill while the decode streams 2 answers, the decode (batches 1 and 2) while the prefill
    runs prompts back to back. The alone runs are taken in the same sitting, so both see one host."""
    from vllm_hetero_pd.planner.calibrate import measure_decode, measure_prefill

    def prefill() -> Awaitable[list[PrefillSample]]:
        return measure_prefill(prefill_url, [isl], 5, vocab, seed=11)

    def decode() -> Awaitable[list[DecodeSample]]:
        return measure_decode(decode_url, [1, 2], [isl], 32, vocab, seed=12)

    pre_alone, dec_alone = await prefill(), await decode()
    pre_busy = await _while_busy(decode_url, 16, 256, 2, vocab, prefill())
    dec_busy = await _while_busy(prefill_url, isl, 1, 1, vocab, decode())
    decode_ratio = statistics.fmean(b.step_seconds / a.step_seconds for a, b in zip(dec_alone, dec_busy))
    return Contention(prefill=pre_busy[0].seconds / pre_alone[0].seconds, decode=decode_ratio)


def calibrate_pair(model: ModelSpec, prefill_url: str, decode_url: str, router_url: str, isl: int,
                   name: str = "CPU-calibrated", lengths: Sequence[int] = (32, 128, 256, 512),
                   contexts: Sequence[int] = (64, 256)) -> tuple[Device, Link, Contention]:
    """Fit the CPU device (prefill terms on the prefill engine at ``lengths``, decode terms on the
    decode engine at ``contexts``), the link, and the engines' contention at ``isl``, on
    calibration runs only: give lengths and contexts that span the workload, since the fit
    extrapolates the attention terms poorly."""
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
    contention = asyncio.run(measure_contention(prefill_url, decode_url, isl, model.vocab_size))
    return device, fit_link(model, device, device, catalog.link(base, base), link_samples), contention


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
    device, link, contention = calibrate_pair(model, args.prefill_url, args.decode_url, args.router_url, args.isl)
    print(f"contention: a prefill takes {contention.prefill:.2f}x its time alone while the decode streams, "
          f"a decode step {contention.decode:.2f}x while the prefill computes", flush=True)
    capacity = 1 / perf.prefill_s(model, device, 1, args.isl)
    points = []
    for i, frac in enumerate(float(x) for x in args.load.split(",")):
        workload = Workload(isl=args.isl, osl=args.osl, rate=frac * capacity)
        measured = [asyncio.run(_measure(args.router_url, workload, args.requests, model.vocab_size, 1000 * i + r))
                    for r in range(2 if i == args.repeat else 1)]
        points.append(PointResult(isl=args.isl, osl=args.osl, rate=workload.rate,
                                  predicted=predict(model, device, device, link, workload, contention),
                                  measured=measured))
        print(table(points[-1:]).splitlines()[-1], flush=True)
    isolated = [msgspec.structs.replace(p, predicted=predict(model, device, device, link,
                                                             Workload(isl=p.isl, osl=p.osl, rate=p.rate)))
                for p in points]
    (out / "pd-validation.json").write_bytes(msgspec.json.encode(
        {"points": points, "without_contention": isolated, "device": device, "link": link, "contention": contention}))
    print(table(points))
    print(f"median |error| {median_error(points):.0%} (without the contention term: {median_error(isolated):.0%}); "
          f"load average after: {os.getloadavg()[0]:.2f}; results in {out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_hetero_pd.planner.pd_validate",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
