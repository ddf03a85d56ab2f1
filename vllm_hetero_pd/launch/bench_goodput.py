"""``vllm-hetero-pd bench goodput``: is P/D worth it on the same cores? (issue 12)

The same two cores serve either one monolithic vLLM engine bound to both, or one prefill and one
decode engine (HeteroNixlConnector) bound to one core each behind our router. Requests mix long
prompts and long answers (default 512-1536 and 128-256 tokens, uniform, seeded) and arrive as a
Poisson stream at each ``--rates`` value. Per rate and setting the bench reports goodput (the
requests/s whose own TTFT and TPOT meet the SLO), the share meeting it, and TTFT and TPOT
p50/p90: means over ``--repeat`` repetitions with their range. Beside each it prints the planner's
prediction for the same setting (``planner/goodput.py``): the colocated model for the 2-core
engine, the P/D model for the pair, from a catalog calibrated on this CPU.

How it runs, in order:

1. The load average is printed (results are marked noisy above 1.5).
2. All three engines start at once (prefix caching off; random token ids, fresh per request), then
   the router in front of the pair. They stay up for the whole run, so every (rate, repetition)
   serves both settings back to back from the same schedule, in alternating order; drift of the
   host then lands on both. An idle engine does not compute (vLLM blocks on its input queue), so
   the idle setting costs the measured one next to nothing.
3. Calibration, on runs that are never scored: the 2-core device from the monolithic engine
   (``calibrate``), the 1-core device and the KV link from the pair
   (``pd_validate.calibrate_pair``), at prompt lengths spanning the mix. Written to
   ``DIR/calibrated.yaml``; ``--catalog FILE`` reuses such a file and skips this step.
4. The sweep, then the tables, the measured crossover (the lowest rate at which P/D's goodput
   beats monolithic's in every repetition) or the finding that there is none and why, and the
   planner's crossover. ``DIR/goodput.{md,json}``; ``DIR/runs.json`` holds every request's timing.

SLO defaults, each twice the unloaded latency of the slower setting's worst request: TTFT 2000 ms
(a 1536-token prompt takes about 1 s to prefill on one core, at about 0.3 s per 512 tokens) and
TPOT 20 ms (a stream's unloaded step is 8-10 ms). ``--quick`` is a pilot: one repetition of 8
requests per rate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shlex
import sys
from pathlib import Path

import msgspec

from vllm_hetero_pd.launch.bench_e2e import NO_PREFIX_CACHE
from vllm_hetero_pd.launch.cluster import LocalCluster
from vllm_hetero_pd.launch.goodput import (
    CONFIGS,
    LABELS,
    Mix,
    Point,
    Request,
    Run,
    crossover,
    expected_s,
    first_win,
    goodput_table,
    latency_table,
    schedule,
    summarize,
    timing,
    verdict,
)
from vllm_hetero_pd.launch.instance import InstanceSpec, hetero_kv_config
from vllm_hetero_pd.launch.router_process import running_router
from vllm_hetero_pd.planner import goodput
from vllm_hetero_pd.planner.calibrate import calibrate, open_loop, random_prompt
from vllm_hetero_pd.planner.catalog import CatalogFile, Device, Link, load_catalog
from vllm_hetero_pd.planner.model import ModelSpec, load_model
from vllm_hetero_pd.planner.pd_validate import calibrate_pair
from vllm_hetero_pd.planner.workload import Workload

NOISY_LOAD = 1.5
DEVICES = ("CPU-2core", "CPU-1core")  # monolithic, P/D: names in the calibrated catalog
PREDICTION_STEPS = 100  # rates at which the planner's own crossover is looked for


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return int(low), int(high or low)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("bench-goodput-out"), help="directory for the results")
    parser.add_argument("--model", default=None, help="model dir (default: the tiny llama-gqa-d32 bf16 test model)")
    parser.add_argument("--rates", default="0.4,0.8,1.2,1.6", help="arrival rates, requests/s")
    parser.add_argument("--requests", type=int, default=None, help="requests per rate and repetition (24; quick 8)")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions of the sweep (3; quick 1)")
    parser.add_argument("--quick", action="store_true", help="pilot: 1 repetition of 8 requests per rate")
    parser.add_argument("--isl", default="512-1536", help="prompt tokens, LOW-HIGH (uniform)")
    parser.add_argument("--osl", default="128-256", help="answer tokens, LOW-HIGH (uniform, EOS ignored)")
    parser.add_argument("--ttft-slo-ms", type=float, default=2000.0, help="per-request TTFT limit")
    parser.add_argument("--tpot-slo-ms", type=float, default=20.0, help="per-request mean TPOT limit")
    parser.add_argument("--cores", default=None, help="the two cores, A,B (default: the first two this process has)")
    parser.add_argument("--catalog", type=Path, default=None,
                        help=f"catalog with devices {' and '.join(DEVICES)} (a previous DIR/calibrated.yaml): "
                             "skips calibration")
    parser.add_argument("--seed", type=int, default=0)


def engine_specs(model: str, cores: tuple[int, int]) -> list[InstanceSpec]:
    """Monolithic on both cores (one engine, TP1, two OpenMP threads), prefill on the first, decode on the second."""
    both = f"{cores[0]},{cores[1]}"  # VLLM_CPU_OMP_THREADS_BIND takes a list like "0,1" or "0-1" per TP rank
    return [InstanceSpec(role="monolithic", model=model, cpu_cores=both, extra_args=NO_PREFIX_CACHE),
            InstanceSpec(role="prefill", model=model, cpu_cores=str(cores[0]), extra_args=NO_PREFIX_CACHE,
                         kv_transfer_config=hetero_kv_config("kv_producer")),
            InstanceSpec(role="decode", model=model, cpu_cores=str(cores[1]), extra_args=NO_PREFIX_CACHE,
                         kv_transfer_config=hetero_kv_config("kv_consumer"))]


def calibrate_devices(model: ModelSpec, mix: Mix, mono_url: str, prefill_url: str, decode_url: str,
                      router_url: str) -> CatalogFile:
    """Both devices and the link, fitted at prompt lengths and decode contexts that span the mix."""
    lengths = sorted({128, 256, mix.isl[0], mix.mean_isl, mix.isl[1]})
    contexts = sorted({mix.isl[0], mix.isl[1]})
    mono, *_ = calibrate(mono_url, model, "CPU", DEVICES[0], 1, [], lengths, 5, [1, 2, 4, 8], contexts, 32)
    pd, link = calibrate_pair(model, prefill_url, decode_url, router_url, DEVICES[1], lengths, contexts)
    return CatalogFile(devices=[mono, pd], links=[link])


def devices(path: Path) -> tuple[Device, Device, Link]:
    """(monolithic device, P/D device, link) of a calibrated catalog file."""
    catalog = load_catalog([path])
    mono, pd = (catalog.device(name) for name in DEVICES)
    return mono, pd, catalog.link(pd, pd)


def predict(model: ModelSpec, catalog: tuple[Device, Device, Link], mix: Mix, rate: float,
            slo: goodput.RequestSlo) -> dict[str, goodput.Predicted]:
    """The planner's prediction for both settings at ``rate``, at the mix's mean lengths."""
    mono, pd, link = catalog
    workload = Workload(isl=mix.mean_isl, osl=mix.mean_osl, rate=rate)
    return {"monolithic": goodput.colocated_point(model, mono, workload, slo),
            "pd": goodput.pd_point(model, pd, pd, link, workload, slo)}


def predicted_crossover(model: ModelSpec, catalog: tuple[Device, Device, Link], mix: Mix, top: float,
                        slo: goodput.RequestSlo) -> float | None:
    """The planner's own crossover on a fine grid up to the highest swept rate."""
    rates = [top * (k + 1) / PREDICTION_STEPS for k in range(PREDICTION_STEPS)]
    points = [predict(model, catalog, mix, rate, slo) for rate in rates]
    return first_win(rates, [p["monolithic"].goodput for p in points], [p["pd"].goodput for p in points])


def measure(url: str, config: str, rate: float, repeat: int, requests: list[Request],
            prompts: list[list[int]]) -> Run:
    """One open-loop run; a failed request is kept as its error (a miss), not raised."""
    answers = asyncio.run(open_loop(url, [(r.offset_s, p, r.osl) for r, p in zip(requests, prompts)]))
    timings = [timing(a, r.osl) for r, a in zip(requests, answers) if not isinstance(a, BaseException)]
    errors = [repr(a)[:300] for a in answers if isinstance(a, BaseException)]
    return Run(config=config, rate=rate, repeat=repeat, timings=timings, errors=errors)


def sweep(urls: dict[str, str], mix: Mix, rates: list[float], count: int, repeat: int, vocab: int, seed: int,
          slo: goodput.RequestSlo, out: Path) -> list[Run]:
    """Every (repetition, rate) serves one schedule to both settings, in alternating order."""
    runs: list[Run] = []
    for rep in range(repeat):
        for i, rate in enumerate(rates):
            run_seed = seed + 1000 * rep + i
            requests = schedule(mix, rate, count, run_seed)
            rng = random.Random(run_seed)
            prompts = [random_prompt(rng, r.isl, vocab) for r in requests]
            for config in CONFIGS if (rep + i) % 2 == 0 else CONFIGS[::-1]:
                run = measure(urls[config], config, rate, rep, requests, prompts)
                runs.append(run)
                (out / "runs.json").write_bytes(msgspec.json.encode(runs))
                ttft_p50, _, tpot_p50, _ = run.latencies()
                print(f"repetition {rep + 1}/{repeat} rate {rate:g} {LABELS[config]}: SLO met "
                      f"{run.attainment(slo):.0%}, TTFT p50 {ttft_p50 * 1e3:.0f} ms, TPOT p50 {tpot_p50 * 1e3:.1f} ms, "
                      f"failed {len(run.errors)}", flush=True)
    return runs


def report(header: list[str], points: list[Point], slo: goodput.RequestSlo, predicted_rate: float | None,
           top: float) -> str:
    """The markdown the docs hold: header lines, both tables, the measured and predicted answers."""
    measured = crossover(points)
    planner = (f"the planner predicts P/D beats monolithic from {predicted_rate:.2f} req/s"
               if predicted_rate is not None
               else f"the planner predicts P/D does not beat monolithic up to {top:g} req/s")
    found = f"{measured:g} req/s" if measured is not None else "none in the sweep"
    return "\n".join([*header, "", goodput_table(points), "", latency_table(points), "",
                      f"Measured crossover: {found}; {planner}.", "", verdict(points, slo), ""])


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """What one invocation measures, checked before any engine starts."""

    mix: Mix
    slo: goodput.RequestSlo
    rates: list[float]
    requests: int
    repeat: int
    cores: tuple[int, int]


def settings(args: argparse.Namespace) -> Settings:
    """The flags as a Settings; ValueError (with the flag's name) for anything the run could not use."""
    rates = _floats(args.rates)
    requests = args.requests if args.requests is not None else (8 if args.quick else 24)
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    if not rates or min(rates) <= 0 or requests < 1 or repeat < 1:
        raise ValueError("--rates must be positive and --requests, --repeat >= 1")
    cores = tuple(int(c) for c in args.cores.split(",")) if args.cores else tuple(sorted(os.sched_getaffinity(0))[:2])
    if len(cores) != 2 or cores[0] == cores[1]:
        raise ValueError(f"--cores: the bench needs two distinct cores, got {cores}")
    if args.catalog is not None:
        devices(args.catalog)  # a catalog without both devices fails now, not after the sweep
    return Settings(mix=Mix(isl=_range(args.isl), osl=_range(args.osl)), rates=rates, requests=requests,
                    slo=goodput.RequestSlo(ttft_s=args.ttft_slo_ms / 1e3, tpot_s=args.tpot_slo_ms / 1e3),
                    repeat=repeat, cores=cores)


def header(setup: Settings, load_before: float, load_after: float, catalog_path: Path) -> list[str]:
    """The command and the conditions a table was measured under."""
    noisy = " (noisy)" if load_before > NOISY_LOAD else ""
    mix, slo = setup.mix, setup.slo
    return [f"`{shlex.join(['vllm-hetero-pd', *sys.argv[1:]])}`",
            f"Load average {load_before:.2f} before, {load_after:.2f} after{noisy}; {setup.repeat} repetition(s) "
            f"of {setup.requests} requests per rate; prompts {mix.isl[0]}-{mix.isl[1]}, answers {mix.osl[0]}-"
            f"{mix.osl[1]} tokens; SLO TTFT {slo.ttft_s * 1e3:g} ms and TPOT {slo.tpot_s * 1e3:g} ms per request; "
            f"cores {setup.cores[0]},{setup.cores[1]}; catalog {catalog_path}. Cells: measured mean (range over "
            "repetitions) / predicted."]


def run(args: argparse.Namespace) -> int:
    load_before = os.getloadavg()[0]
    print(f"load average before: {load_before:.2f}" + (" (noisy)" if load_before > NOISY_LOAD else ""), flush=True)
    try:
        setup = settings(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    minutes = expected_s(setup.rates, setup.requests, setup.repeat, args.catalog is None) / 60
    print(f"expected duration about {minutes:.0f} min", flush=True)
    if args.model is None:
        from vllm_hetero_pd.testing.tiny_model import build_tiny_model
        args.model = str(build_tiny_model("llama-gqa-d32", "bfloat16"))
    model = load_model(args.model, weight_dtype="bf16")
    args.out.mkdir(parents=True, exist_ok=True)
    catalog_path = args.catalog or args.out / "calibrated.yaml"
    with LocalCluster(engine_specs(args.model, setup.cores), args.out / "logs") as cluster:
        mono, prefill, decode = cluster.instances
        with running_router([prefill.url], [decode.url], args.out / "logs" / "router.log") as router:
            if args.catalog is None:
                fitted = calibrate_devices(model, setup.mix, mono.url, prefill.url, decode.url, router)
                catalog_path.write_bytes(msgspec.yaml.encode(fitted))
            runs = sweep({"monolithic": mono.url, "pd": router}, setup.mix, setup.rates, setup.requests, setup.repeat,
                         model.vocab_size, args.seed, setup.slo, args.out)
    load_after = os.getloadavg()[0]
    catalog = devices(catalog_path)
    predictions = {(config, rate): got for rate in setup.rates
                   for config, got in predict(model, catalog, setup.mix, rate, setup.slo).items()}
    points = summarize(runs, setup.slo, predictions)
    top = max(setup.rates)
    text = report(header(setup, load_before, load_after, catalog_path), points, setup.slo,
                  predicted_crossover(model, catalog, setup.mix, top, setup.slo), top)
    print(text)
    (args.out / "goodput.md").write_text(text)
    (args.out / "goodput.json").write_bytes(msgspec.json.encode(
        {"points": points, "crossover_rate": crossover(points), "load_before": load_before, "load_after": load_after,
         "noisy": load_before > NOISY_LOAD, "settings": setup, "catalog": str(catalog_path)}))
    return 0
