"""Calibration validation: fit the CPU device on a live tiny-model engine, then predict and measure.

Run: ``python -m vllm_hetero_pd.planner.validate`` (starts one vLLM CPU engine, ~45 s) or pass
``--url`` to use a server that is already running. Steps: (1) ``calibrate`` measures prefill and
decode latencies and fits the device; (2) for each (ISL, OSL, rate) point, Poisson arrivals of
random-token prompts are sent and the client-side TTFT and TPOT medians recorded; (3) the
colocated model in ``perf`` predicts the same medians with the fitted device. The error table
is the point; it is a benchmark, not a test, because it needs a live engine and minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

import aiohttp
import msgspec

from vllm_hetero_pd.planner import perf
from vllm_hetero_pd.planner.calibrate import _TIMEOUT, calibrate, complete, random_prompt, served_model
from vllm_hetero_pd.planner.catalog import CatalogFile
from vllm_hetero_pd.planner.model import load_model
from vllm_hetero_pd.planner.workload import Workload

DEFAULT_POINTS = "128:32:1,512:32:1,256:64:2,1024:16:0.5"


class Point(msgspec.Struct, frozen=True, kw_only=True):
    isl: int
    osl: int
    rate: float
    num_requests: int
    measured_ttft_p50_s: float
    measured_tpot_p50_s: float
    predicted_ttft_p50_s: float
    predicted_tpot_p50_s: float

    @property
    def ttft_error(self) -> float:
        return self.predicted_ttft_p50_s / self.measured_ttft_p50_s - 1

    @property
    def tpot_error(self) -> float:
        return self.predicted_tpot_p50_s / self.measured_tpot_p50_s - 1


async def measure_point(url: str, isl: int, osl: int, rate: float, num_requests: int, vocab_size: int,
                        seed: int) -> tuple[float, float]:
    """Median client-side TTFT and TPOT under Poisson arrivals at ``rate``."""
    rng = random.Random(seed)
    async with aiohttp.ClientSession(timeout=_TIMEOUT) as session:
        model = await served_model(session, url)

        async def one(delay: float):
            await asyncio.sleep(delay)
            return await complete(session, url, model, random_prompt(rng, isl, vocab_size), osl)

        delays, t = [], 0.0
        for _ in range(num_requests):
            delays.append(t)
            t += rng.expovariate(rate)
        runs = await asyncio.gather(*(one(d) for d in delays))
    ttfts = [r.ttft_s for r in runs]
    tpots = [(r.chunk_times[-1] - r.chunk_times[0]) / (len(r.chunk_times) - 1) for r in runs
             if len(r.chunk_times) > 1]
    return statistics.median(ttfts), statistics.median(tpots)


def validate(url: str, model_path: str, points: list[tuple[int, int, float]], num_requests: int,
             out_dir: Path) -> list[Point]:
    model = load_model(model_path, weight_dtype="bf16")
    device, report, prefill, decode = calibrate(url, model, "CPU", "CPU-calibrated", 1, [],
                                                [32, 128, 256, 512, 1024], 5, [1, 2, 4, 8, 16], [64, 512], 64)
    (out_dir / "cpu-calibrated.yaml").write_bytes(msgspec.yaml.encode(CatalogFile(devices=[device])))
    (out_dir / "calibration-samples.json").write_bytes(msgspec.json.encode({"prefill": prefill, "decode": decode,
                                                                            "fit": report}))
    print(f"fit RMS error: prefill {report.prefill_rms_rel_error:.1%}, decode {report.decode_rms_rel_error:.1%}",
          flush=True)
    results = []
    for i, (isl, osl, rate) in enumerate(points):
        ttft, tpot = asyncio.run(measure_point(url, isl, osl, rate, num_requests, model.vocab_size, seed=100 + i))
        workload = Workload(isl=isl, osl=osl, rate=rate)
        pred_ttft, pred_tpot = perf.colocated_latency(model, device, 1, workload, rate, 0.5)
        results.append(Point(isl=isl, osl=osl, rate=rate, num_requests=num_requests, measured_ttft_p50_s=ttft,
                             measured_tpot_p50_s=tpot, predicted_ttft_p50_s=pred_ttft,
                             predicted_tpot_p50_s=pred_tpot))
        print(_row(results[-1]), flush=True)
    return results


def _row(p: Point) -> str:
    return (f"ISL {p.isl:5d} OSL {p.osl:4d} rate {p.rate:4.1f}/s | TTFT p50 measured {p.measured_ttft_p50_s * 1e3:7.1f} ms "
            f"predicted {p.predicted_ttft_p50_s * 1e3:7.1f} ms ({p.ttft_error:+.0%}) | TPOT p50 measured "
            f"{p.measured_tpot_p50_s * 1e3:6.1f} ms predicted {p.predicted_tpot_p50_s * 1e3:6.1f} ms ({p.tpot_error:+.0%})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="use this running server instead of starting one")
    parser.add_argument("--model", help="model dir served at --url (default: the tiny model)")
    parser.add_argument("--points", default=DEFAULT_POINTS, help="ISL:OSL:RATE list")
    parser.add_argument("--requests", type=int, default=30, help="requests per point")
    parser.add_argument("--out", type=Path, default=None, help="directory for the fitted catalog and results")


def run(args: argparse.Namespace) -> int:
    points = [(int(a), int(b), float(c)) for a, b, c in (p.split(":") for p in args.points.split(","))]
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="planner-validate-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.url:
        results = validate(args.url, args.model, points, args.requests, out_dir)
    else:
        from vllm_hetero_pd.launch.cluster import LocalCluster
        from vllm_hetero_pd.launch.instance import InstanceSpec
        from vllm_hetero_pd.testing.tiny_model import build_tiny_model

        model_dir = build_tiny_model()
        spec = InstanceSpec(role="monolithic", model=str(model_dir), kv_cache_space_gib=1)
        with LocalCluster([spec], out_dir / "logs") as cluster:
            engine_cores = {sorted(os.sched_getaffinity(0))[0]}  # LocalCluster pins instance 0 there
            client_cores = set(os.sched_getaffinity(0)) - engine_cores
            if client_cores:  # keep the load generator off the engine's core
                os.sched_setaffinity(0, client_cores)
            results = validate(cluster.instances[0].url, str(model_dir), points, args.requests, out_dir)
    (out_dir / "validation.json").write_bytes(msgspec.json.encode(results))
    errors = [abs(e) for p in results for e in (p.ttft_error, p.tpot_error)]
    print(f"mean |error| {statistics.mean(errors):.1%}, max {max(errors):.1%}; results in {out_dir}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_hetero_pd.planner.validate",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
