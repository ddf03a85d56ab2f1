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
   router and connector add beyond prefill and the first decode step); each engine timed alone and
   while the other works gives the pair's contention (``Contention``): both share one host here,
   which separate GPUs in a planned deployment do not, so only this validation prices it.
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
QUIET_LOAD = 1.5  # above this load average before the run, the figures are marked noisy


class Latencies(msgspec.Struct, frozen=True):
    """TTFT and TPOT p50/p90 in seconds, measured or predicted."""

    ttft: tuple[float, float]
    tpot: tuple[float, float]


class EngineTimes(msgspec.Struct, frozen=True):
    """Means of vLLM's per-request histograms on the prefill engine over one run: where a TTFT
    error comes from (a slower prefill than the model's, or a longer wait for the engine)."""

    prefill_s: float  # vllm:request_prefill_time_seconds (scheduled to first token)
    queue_s: float  # vllm:request_queue_time_seconds (waiting in the engine)


HISTOGRAMS = ("vllm:request_prefill_time_seconds", "vllm:request_queue_time_seconds")


def histogram_totals(text: str) -> dict[str, tuple[float, float]]:
    """``{name: (sum, count)}`` of ``HISTOGRAMS`` in a Prometheus text exposition (summed over labels)."""
    totals = {name: [0.0, 0.0] for name in HISTOGRAMS}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        name = key.split("{", 1)[0]
        for suffix, slot in (("_sum", 0), ("_count", 1)):
            base = name.removesuffix(suffix)
            if name.endswith(suffix) and base in totals:
                totals[base][slot] += float(value.split()[0])
    return {name: (total, count) for name, (total, count) in totals.items()}


def engine_times(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> EngineTimes:
    """Per-request means of what the engine recorded between two scrapes (NaN when nothing was)."""
    def mean(name: str) -> float:
        total, count = (a - b for a, b in zip(after[name], before[name]))
        return total / count if count else math.nan

    return EngineTimes(prefill_s=mean(HISTOGRAMS[0]), queue_s=mean(HISTOGRAMS[1]))


def _scrape(url: str) -> dict[str, tuple[float, float]]:
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as resp:
        return histogram_totals(resp.read().decode())


class PointResult(msgspec.Struct, frozen=True, kw_only=True):
    """One arrival rate: what the model said and what the pair did (once, or twice to show the noise)."""

    isl: int
    osl: int
    rate: float
    predicted: Latencies
    measured: list[Latencies]
    service_s: float = math.nan  # the model's prefill service time at this rate (contention included)
    engine: list[EngineTimes] = []  # the prefill engine's own means over each measured run

    def mean(self) -> Latencies:
        """Each quantile's mean over the measured runs: what the prediction is compared with."""
        def avg(field: str) -> tuple[float, float]:
            return tuple(statistics.fmean(c) for c in zip(*(getattr(m, field) for m in self.measured)))

        return Latencies(ttft=avg("ttft"), tpot=avg("tpot"))

    def errors(self) -> list[float]:
        """Relative error of each predicted quantile against the mean of the measurements:
        TTFT p50, p90, TPOT p50, p90."""
        got = self.mean()
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


def prefill_service_s(model: ModelSpec, prefill: Device, decode: Device, workload: Workload,
                      contention: Contention = NO_CONTENTION) -> float:
    """The prefill's service time at the workload's rate: alone, slowed by ``contention.prefill``
    for the share of time the decode holds a stream (a Poisson batch is empty with probability
    e^-B)."""
    batch = perf.decode_batch(model, decode, 1, workload, workload.rate)
    decode_busy = 1 - math.exp(-batch) if math.isfinite(batch) else 1.0
    return perf.prefill_s(model, prefill, 1, workload.isl) * (1 + (contention.prefill - 1) * decode_busy)


def latency_at(model: ModelSpec, prefill: Device, decode: Device, link: Link, workload: Workload,
               q: float, contention: Contention = NO_CONTENTION) -> tuple[float, float]:
    """The P/D model's (TTFT, TPOT) q-quantiles for one prefill and one decode instance at TP1.

    Each engine runs at its contended speed for the share of time the other one is busy: the
    prefill as ``prefill_service_s`` says, the decode for the prefill's utilisation.
    """
    rate = workload.rate
    service = prefill_service_s(model, prefill, decode, workload, contention)
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
    """Markdown: per rate, predicted / measured (the mean of the runs) TTFT and TPOT p50 and p90, error,
    and the spread of the runs."""
    def ms(x: float) -> str:
        return "inf" if math.isinf(x) else f"{x * 1e3:.1f}"

    lines = ["| ISL | OSL | rate | TTFT p50 pred / meas (ms) | p90 | TPOT p50 pred / meas (ms) | p90 | "
             "error TTFT p50, p90, TPOT p50, p90 | repeat spread |", "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        m = p.mean()
        cells = [f"{ms(a)} / {ms(b)}" for a, b in zip((*p.predicted.ttft, *p.predicted.tpot), (*m.ttft, *m.tpot))]
        noise = p.noise()
        lines.append(f"| {p.isl} | {p.osl} | {p.rate:.3g} | " + " | ".join(cells) + " | "
                     + ", ".join(f"{e:+.0%}" for e in p.errors()) + " | "
                     + (", ".join(f"{n:.0%}" for n in noise) if noise else "-") + " |")
    return "\n".join(lines)


def engine_table(points: list[PointResult]) -> str:
    """Markdown: per rate, the prefill engine's mean prefill time (model / each run) and mean wait."""
    lines = ["| rate | prefill in the engine, model / runs (ms) | wait in the engine, runs (ms) |", "|---|---|---|"]
    for p in points:
        runs = ", ".join(f"{e.prefill_s * 1e3:.1f}" for e in p.engine)
        waits = ", ".join(f"{e.queue_s * 1e3:.1f}" for e in p.engine)
        lines.append(f"| {p.rate:.3g} | {p.service_s * 1e3:.1f} / {runs} | {waits} |")
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
            failed = [t.exception() for t in tasks if t.done() and not t.cancelled() and t.exception()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if failed:
                raise RuntimeError(f"background load on {url} failed: {failed[0]}")


async def measure_contention(prefill_url: str, decode_url: str, isl: int, vocab: int) -> Contention:
    """Each engine's time at the workload's prompt length, alone and while the other works: the
    prefill while the decode streams 2 answers, the decode (batches 1 and 2) while the prefill
    runs prompts back to back. The alone runs are taken in the same sitting, so both see one host."""
    from vllm_hetero_pd.planner.calibrate import measure_decode, measure_prefill

    def prefill(seed: int) -> Awaitable[list[PrefillSample]]:  # fresh prompts each: no prefix-cache hits
        return measure_prefill(prefill_url, [isl], 7, vocab, seed=seed)

    def decode(seed: int) -> Awaitable[list[DecodeSample]]:
        return measure_decode(decode_url, [1, 2], [isl], 32, vocab, repeats=3, seed=seed)

    pre_alone, dec_alone = await prefill(11), await decode(12)
    pre_busy = await _while_busy(decode_url, 16, 256, 2, vocab, prefill(13))
    dec_busy = await _while_busy(prefill_url, isl, 1, 1, vocab, decode(14))
    decode_ratio = statistics.fmean(b.step_seconds / a.step_seconds for a, b in zip(dec_alone, dec_busy))
    return Contention(prefill=pre_busy[0].seconds / pre_alone[0].seconds, decode=decode_ratio)


def calibrate_pair(model: ModelSpec, prefill_url: str, decode_url: str, router_url: str,
                   name: str = "CPU-calibrated", lengths: Sequence[int] = (32, 128, 256, 512),
                   contexts: Sequence[int] = (64, 256), repeats: int = 5) -> tuple[Device, Link]:
    """Fit the CPU device (prefill terms on the prefill engine at ``lengths``, decode terms on the
    decode engine at ``contexts``) and the link, on calibration runs only: give lengths and contexts
    that span the workload, since the fit extrapolates the attention terms poorly. Medians of
    ``repeats`` prefills per length resist the stalls a shared host adds to single requests."""
    from vllm_hetero_pd.planner.calibrate import measure_decode, measure_prefill
    from vllm_hetero_pd.planner.catalog import load_catalog
    from vllm_hetero_pd.planner.fit import fit_device

    catalog = load_catalog()
    base = catalog.device("CPU")
    pre_samples = asyncio.run(measure_prefill(prefill_url, list(lengths), repeats, model.vocab_size))
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
    parser.add_argument("--isl", type=int, default=2048,
                        help="prompt tokens; long enough that the engines' forward passes, which the model "
                             "prices, outweigh the per-request work of the front-end processes, which it does not")
    parser.add_argument("--osl", type=int, default=32)
    parser.add_argument("--load", default="0.2,0.4,0.6",
                        help="arrival rates as fractions of predicted prefill capacity")
    parser.add_argument("--requests", type=int, default=120, help="requests per rate")
    parser.add_argument("--repeat", default="all",
                        help="'all' (every rate measured twice) or the index into --load of the one rate measured "
                             "twice: the spread of the two runs is the noise floor, and errors are against their mean")
    parser.add_argument("--out", type=Path, default=None)


def run(args: argparse.Namespace) -> int:
    from vllm_hetero_pd.planner.model import load_model

    out = args.out or Path(tempfile.mkdtemp(prefix="planner-pd-validate-"))
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    noisy = (f" -- NOISY: load average {load_before:.2f} above {QUIET_LOAD} before the run, rerun on a quiet host"
             if load_before > QUIET_LOAD else "")
    print(f"load average before: {load_before:.2f}{noisy}", flush=True)
    model = load_model(args.model, weight_dtype="bf16")
    isl = args.isl
    device, link = calibrate_pair(model, args.prefill_url, args.decode_url, args.router_url,  # spanning the ISL
                                  lengths=sorted({max(16, isl // k) for k in (8, 4, 2, 1)}), contexts=sorted({64, isl}),
                                  repeats=7)
    contention = asyncio.run(measure_contention(args.prefill_url, args.decode_url, isl, model.vocab_size))
    print(f"contention: a prefill takes {contention.prefill:.2f}x its time alone while the decode streams, "
          f"a decode step {contention.decode:.2f}x while the prefill computes", flush=True)
    capacity = 1 / perf.prefill_s(model, device, 1, isl)
    points = []
    for i, frac in enumerate(float(x) for x in args.load.split(",")):
        workload = Workload(isl=isl, osl=args.osl, rate=frac * capacity)
        measured, engine = [], []
        for r in range(2 if args.repeat in ("all", str(i)) else 1):
            before = _scrape(args.prefill_url)
            measured.append(asyncio.run(_measure(args.router_url, workload, args.requests, model.vocab_size,
                                                 1000 * i + r)))
            engine.append(engine_times(before, _scrape(args.prefill_url)))
        points.append(PointResult(isl=isl, osl=args.osl, rate=workload.rate,
                                  predicted=predict(model, device, device, link, workload, contention),
                                  measured=measured, engine=engine,
                                  service_s=prefill_service_s(model, device, device, workload, contention)))
        print(table(points[-1:]).splitlines()[-1], flush=True)
    print(engine_table(points))
    isolated = [msgspec.structs.replace(p, predicted=predict(model, device, device, link,
                                                             Workload(isl=p.isl, osl=p.osl, rate=p.rate)))
                for p in points]
    (out / "pd-validation.json").write_bytes(msgspec.json.encode(
        {"points": points, "without_contention": isolated, "device": device, "link": link, "contention": contention}))
    print(table(points))
    print(f"median |error| {median_error(points):.0%} (without the contention term: {median_error(isolated):.0%}); "
          f"load average before {load_before:.2f}, after {os.getloadavg()[0]:.2f}{noisy}; results in {out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_hetero_pd.planner.pd_validate",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
