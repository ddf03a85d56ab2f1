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
import math
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

import msgspec

from vllm_hetero_pd.planner import colocated
from vllm_hetero_pd.planner.calibrate import calibrate, open_loop, random_prompt, successes
from vllm_hetero_pd.planner.catalog import CatalogFile, load_catalog
from vllm_hetero_pd.planner.fit import fit_device
from vllm_hetero_pd.planner.model import load_model
from vllm_hetero_pd.planner.workload import Workload

DEFAULT_POINTS = "128:32:1,512:32:1,256:64:2,1024:16:0.5"


class Point(msgspec.Struct, frozen=True, kw_only=True):
    """One (ISL, OSL, rate) point: per round, the measured medians and those predicted by that
    round's own calibration; ``pooled_*`` compare the median over rounds with a fit to all rounds'
    calibration samples, so slow and quiet periods of a shared host weigh on both sides alike."""

    isl: int
    osl: int
    rate: float
    num_requests: int
    measured_ttft_p50_s: list[float]
    measured_tpot_p50_s: list[float]
    predicted_ttft_p50_s: list[float]
    predicted_tpot_p50_s: list[float]
    pooled_predicted_ttft_p50_s: float
    pooled_predicted_tpot_p50_s: float

    def pooled_errors(self) -> tuple[float, float]:
        """(TTFT, TPOT) error of the pooled prediction against the median over rounds."""
        return (self.pooled_predicted_ttft_p50_s / statistics.median(self.measured_ttft_p50_s) - 1,
                self.pooled_predicted_tpot_p50_s / statistics.median(self.measured_tpot_p50_s) - 1)

    def errors(self) -> list[float]:
        """Relative prediction errors, TTFT and TPOT, every round."""
        return [p / m - 1 for p, m in zip(self.predicted_ttft_p50_s + self.predicted_tpot_p50_s,
                                          self.measured_ttft_p50_s + self.measured_tpot_p50_s)]

    def noise(self) -> list[float]:
        """How far the same measurement moved between rounds (max/min - 1), TTFT and TPOT."""
        return [max(xs) / min(xs) - 1 for xs in (self.measured_ttft_p50_s, self.measured_tpot_p50_s)]


async def measure_point(url: str, isl: int, osl: int, rate: float, num_requests: int, vocab_size: int,
                        seed: int) -> tuple[float, float]:
    """Median client-side TTFT and TPOT under Poisson arrivals at ``rate``."""
    rng = random.Random(seed)
    delays, t = [], 0.0
    for _ in range(num_requests):
        delays.append(t)
        t += rng.expovariate(rate)
    runs = successes(await open_loop(url, [(d, random_prompt(rng, isl, vocab_size), osl) for d in delays]))
    ttfts = [r.ttft_s for r in runs]
    tpots = [(r.chunk_times[-1] - r.chunk_times[0]) / (len(r.chunk_times) - 1) for r in runs
             if len(r.chunk_times) > 1]
    return statistics.median(ttfts), statistics.median(tpots)


def validate(url: str, model_path: str, points: list[tuple[int, int, float]], num_requests: int,
             num_rounds: int, out_dir: Path) -> list[Point]:
    """``num_rounds`` x (calibrate, then measure every point); predictions use the same round's fit.

    Repeating the whole procedure shows how much the host itself moves the numbers: on a shared
    machine that noise floor can exceed the model's error, and the table should say so.
    """
    model = load_model(model_path, weight_dtype="bf16")
    (out_dir / "model.json").write_bytes(msgspec.json.encode(model_path))
    rows: dict[tuple[int, int, float], dict[str, list[float]]] = {p: {} for p in points}
    all_prefill, all_decode = [], []
    for r in range(num_rounds):
        device, report, prefill, decode = calibrate(url, model, "CPU", "CPU-calibrated", 1, [],
                                                    [32, 128, 256, 512, 1024], 5, [1, 2, 4, 8, 16], [64, 512], 64)
        all_prefill += prefill
        all_decode += decode
        (out_dir / f"cpu-calibrated-{r}.yaml").write_bytes(msgspec.yaml.encode(CatalogFile(devices=[device])))
        (out_dir / f"calibration-samples-{r}.json").write_bytes(msgspec.json.encode(
            {"prefill": prefill, "decode": decode, "fit": report}))
        print(f"round {r}: fit RMS error prefill {report.prefill_rms_rel_error:.1%}, "
              f"decode {report.decode_rms_rel_error:.1%}", flush=True)
        for i, (isl, osl, rate) in enumerate(points):
            ttft, tpot = asyncio.run(measure_point(url, isl, osl, rate, num_requests, model.vocab_size,
                                                   seed=100 + i + 1000 * r))
            pred_ttft, pred_tpot = colocated.predict(model, device, 1, Workload(isl=isl, osl=osl, rate=rate),
                                                          rate, 0.5)
            row = rows[(isl, osl, rate)]
            for key, value in (("mt", ttft), ("mp", tpot), ("pt", pred_ttft), ("pp", pred_tpot)):
                row.setdefault(key, []).append(value)
            print(f"  ISL {isl} OSL {osl} rate {rate:g}: TTFT {ttft * 1e3:.1f} ms (predicted {pred_ttft * 1e3:.1f}), "
                  f"TPOT {tpot * 1e3:.2f} ms (predicted {pred_tpot * 1e3:.2f})", flush=True)
    pooled, report = fit_device(load_catalog().device("CPU"), model, 1, all_prefill, all_decode, "CPU-calibrated",
                                f"{url} ({num_rounds} rounds pooled)")
    (out_dir / "cpu-calibrated.yaml").write_bytes(msgspec.yaml.encode(CatalogFile(devices=[pooled])))
    print(f"pooled fit RMS error prefill {report.prefill_rms_rel_error:.1%}, decode {report.decode_rms_rel_error:.1%}")
    out = []
    for (isl, osl, rate), row in rows.items():
        ttft, tpot = colocated.predict(model, pooled, 1, Workload(isl=isl, osl=osl, rate=rate), rate, 0.5)
        out.append(Point(isl=isl, osl=osl, rate=rate, num_requests=num_requests, measured_ttft_p50_s=row["mt"],
                         measured_tpot_p50_s=row["mp"], predicted_ttft_p50_s=row["pt"], predicted_tpot_p50_s=row["pp"],
                         pooled_predicted_ttft_p50_s=ttft, pooled_predicted_tpot_p50_s=tpot))
    return out


def table(points: list[Point]) -> str:
    """Markdown error table: per point, measured and predicted medians per round, error, noise."""
    def ms(xs: list[float]) -> str:
        return " / ".join("inf" if math.isinf(x) else f"{x * 1e3:.1f}" for x in xs)

    def pct(xs: list[float]) -> str:
        return " / ".join("inf" if math.isinf(x) else f"{x:+.0%}" for x in xs)

    lines = ["| ISL | OSL | rate | TTFT p50 measured (ms) | predicted | error | TPOT p50 measured (ms) | predicted | "
             "error | round-to-round spread TTFT, TPOT | pooled error TTFT, TPOT |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        n = len(p.measured_ttft_p50_s)
        errs = p.errors()
        lines.append(f"| {p.isl} | {p.osl} | {p.rate:g} | {ms(p.measured_ttft_p50_s)} | {ms(p.predicted_ttft_p50_s)} | "
                     f"{pct(errs[:n])} | {ms(p.measured_tpot_p50_s)} | {ms(p.predicted_tpot_p50_s)} | "
                     f"{pct(errs[n:])} | {pct(p.noise())} | {pct(list(p.pooled_errors()))} |")
    return "\n".join(lines)


def repredict(out_dir: Path) -> list[Point]:
    """Predictions for a finished run's measurements and fitted catalogs with the current model,
    so a model change can be checked against the same data without re-measuring."""
    points = msgspec.json.decode((out_dir / "validation.json").read_bytes(), type=list[Point])
    model = load_model(msgspec.json.decode((out_dir / "model.json").read_bytes()), weight_dtype="bf16")
    rounds = [load_catalog([out_dir / f"cpu-calibrated-{r}.yaml"]).device("CPU-calibrated")
              for r in range(len(points[0].measured_ttft_p50_s))]
    pooled = load_catalog([out_dir / "cpu-calibrated.yaml"]).device("CPU-calibrated")
    out = []
    for p in points:
        workload = Workload(isl=p.isl, osl=p.osl, rate=p.rate)
        per_round = [colocated.predict(model, d, 1, workload, p.rate, 0.5) for d in rounds]
        ttft, tpot = colocated.predict(model, pooled, 1, workload, p.rate, 0.5)
        out.append(msgspec.structs.replace(p, predicted_ttft_p50_s=[x for x, _ in per_round],
                                           predicted_tpot_p50_s=[y for _, y in per_round],
                                           pooled_predicted_ttft_p50_s=ttft, pooled_predicted_tpot_p50_s=tpot))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="use this running server instead of starting one")
    parser.add_argument("--model", help="model dir served at --url (default: the tiny model)")
    parser.add_argument("--points", default=DEFAULT_POINTS, help="ISL:OSL:RATE list")
    parser.add_argument("--requests", type=int, default=30, help="requests per point")
    parser.add_argument("--rounds", type=int, default=3, help="calibrate+measure repetitions (shows host noise)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the fitted catalog and results")
    parser.add_argument("--repredict", type=Path, metavar="DIR",
                        help="no measuring: re-run the current model on a finished run's data in DIR")


def run(args: argparse.Namespace) -> int:
    points = [(int(a), int(b), float(c)) for a, b, c in (p.split(":") for p in args.points.split(","))]
    out_dir = args.repredict or args.out or Path(tempfile.mkdtemp(prefix="planner-validate-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.repredict:
        results = repredict(out_dir)
    elif args.url:
        results = validate(args.url, args.model, points, args.requests, args.rounds, out_dir)
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
            results = validate(cluster.instances[0].url, str(model_dir), points, args.requests, args.rounds,
                                   out_dir)
    if not args.repredict:
        (out_dir / "validation.json").write_bytes(msgspec.json.encode(results))
    print(table(results))
    finite = [abs(e) for p in results for e in p.errors() if not math.isinf(e)]
    pooled = [abs(e) for p in results for e in p.pooled_errors() if not math.isinf(e)]
    noise = [e for p in results for e in p.noise()]
    print(f"median |error| per round {statistics.median(finite):.0%} ({len(finite)} finite predictions), pooled "
          f"{statistics.median(pooled):.0%}; median round-to-round spread {statistics.median(noise):.0%}; "
          f"results in {out_dir}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_hetero_pd.planner.validate",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
