"""Search-time benchmark: 10 accelerator types x TP {1,2,4,8} x up to 64 instances per pool entry.

Run: ``python -m vllm_hetero_pd.planner.bench`` (or via ``vllm-hetero-pd bench`` once wired).
For each scenario it times ``prepare`` (per-instance capacities) and ``solve`` (the exact joint
search), and, as the baseline measured in the same run, a DistServe-style per-phase choice: the
option with the best capacity per $ in each phase, replicated ceil(rate / capacity) times,
ignoring inventory. Reported: median wall times, the median process CPU time of prepare + solve
(which a shared host does not inflate), the baseline's time, and the cost ratio baseline / exact
(>= 1 means the exact search found a plan at least as cheap).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import msgspec

from vllm_hetero_pd.planner.catalog import load_catalog
from vllm_hetero_pd.planner.model import load_model
from vllm_hetero_pd.planner.search import MAX_ENTRIES, SearchSpace, prepare, solve
from vllm_hetero_pd.planner.workload import Slo, Workload

ACCELERATORS = ("A100", "L40S", "H100", "H200", "B200", "MI300X", "MI325X", "MI355X", "Gaudi2", "Gaudi3")
SCENARIOS = {
    f"{shape} @{rate:g} req/s": (Workload(isl=isl, osl=osl, rate=rate), Slo(ttft_s=ttft_s, tpot_s=0.05))
    for shape, isl, osl, ttft_s in (("4096/512", 4096, 512, 2.0), ("512/4096", 512, 4096, 1.0))
    for rate in (5.0, 40.0)
}
INVENTORY = {"A100": 64, "L40S": 64, "H100": 32, "H200": 16, "B200": 16, "MI300X": 32, "MI325X": 8,
             "MI355X": 8, "Gaudi2": 64, "Gaudi3": 32}


class Row(msgspec.Struct, frozen=True, kw_only=True):
    scenario: str
    inventory: bool
    prepare_ms: float
    solve_ms: float
    total_ms: float
    total_cpu_ms: float  # process CPU time: what the search costs when the host is shared
    baseline_ms: float
    cost_per_hour: float
    baseline_cost_per_hour: float
    baseline_within_inventory: bool


def _median_ms(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def _cpu_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append((time.process_time() - start) * 1e3)
    return statistics.median(times)


def _per_phase_baseline(prepared, workload: Workload) -> tuple[float, bool]:
    """DistServe Alg. 1 with cost: best capacity per $ in each phase, replicated by ceil()."""
    def best(options, rates):
        scored = [(o.price_per_hour / r, i) for i, (o, r) in enumerate(zip(options, rates)) if r > 0]
        return min(scored)[1] if scored else None

    decode_rates = prepared.decode.numeric.rates
    d = best(prepared.decode.options, decode_rates)
    if d is None:
        return math.inf, False
    pre_rates = prepared.prefill_rates[prepared.decode_endpoint[d]]
    p = best(prepared.prefill.options, pre_rates)
    if p is None:
        return math.inf, False
    dec, pre = prepared.decode.options[d], prepared.prefill.options[p]
    n_dec, n_pre = math.ceil(workload.rate / decode_rates[d]), math.ceil(workload.rate / pre_rates[p])
    used = {dec.device: n_dec * dec.tp}
    used[pre.device] = used.get(pre.device, 0) + n_pre * pre.tp
    inventory = prepared.space.inventory
    ok = inventory is None or all(n <= inventory.get(dev, 0) for dev, n in used.items())
    return n_dec * dec.price_per_hour + n_pre * pre.price_per_hour, ok


def measure(repeats: int) -> list[Row]:
    catalog = load_catalog()
    model = load_model("llama-3.1-70b", weight_dtype="fp8")
    return [_row(name, workload, slo, inventory, catalog, model, repeats)
            for name, (workload, slo) in SCENARIOS.items() for inventory in (None, INVENTORY)]


def _row(name: str, workload: Workload, slo: Slo, inventory, catalog, model, repeats: int) -> Row:
    """Time one scenario: prepare, solve, both under process CPU time, and the per-phase baseline."""
    space = SearchSpace(prefill_devices=ACCELERATORS, decode_devices=ACCELERATORS,
                        colocated_devices=ACCELERATORS, max_instances=64, inventory=inventory)
    prepare_ms, prepared = _median_ms(lambda: prepare(model, catalog, workload, slo, space), repeats)
    solve_ms, result = _median_ms(lambda: solve(prepared, workload), repeats)
    cpu_ms = _cpu_ms(lambda: solve(prepare(model, catalog, workload, slo, space), workload), repeats)
    baseline_ms, (base_cost, base_ok) = _median_ms(lambda: _per_phase_baseline(prepared, workload), repeats)
    return Row(scenario=name, inventory=inventory is not None, prepare_ms=prepare_ms, solve_ms=solve_ms,
               total_ms=prepare_ms + solve_ms, total_cpu_ms=cpu_ms, baseline_ms=baseline_ms,
               cost_per_hour=result.best.cost_per_hour if result.best else math.inf,
               baseline_cost_per_hour=base_cost, baseline_within_inventory=base_ok)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per scenario (median reported)")
    parser.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    before = os.getloadavg()
    rows = measure(args.repeats)
    after = os.getloadavg()
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(rows), indent=2).decode())
        return 0
    print(f"planner search time: {len(ACCELERATORS)} device types x TP {{1,2,4,8}} x <= 64 instances per entry, "
          f"<= {MAX_ENTRIES} entries "
          f"per pool, Llama-3.1-70B FP8 (median of {args.repeats}); load average before "
          f"{before[0]:.2f}, after {after[0]:.2f}")
    print(f"{'scenario':24} {'inventory':9} {'prepare':>9} {'solve':>9} {'total':>9} {'CPU':>9} "
          f"{'baseline':>9} {'$/h exact':>10} {'$/h base':>9} {'base/exact':>10}")
    for r in rows:
        flag = "" if r.baseline_within_inventory else " (over inventory)"
        print(f"{r.scenario:24} {'yes' if r.inventory else 'no':9} {r.prepare_ms:8.1f}ms {r.solve_ms:8.1f}ms "
              f"{r.total_ms:8.1f}ms {r.total_cpu_ms:8.1f}ms {r.baseline_ms:8.3f}ms {r.cost_per_hour:10.2f} "
              f"{r.baseline_cost_per_hour:9.2f} "
              f"{r.baseline_cost_per_hour / r.cost_per_hour:9.2f}x{flag}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_hetero_pd.planner.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
