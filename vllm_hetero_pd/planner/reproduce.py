"""Reproduction table for docs/planner.md: $/Mtok of fixed P:D pairings vs the published ratios.

Run: ``python -m vllm_hetero_pd.planner.reproduce [--rate R] [--tpot-ms T]``. Llama-3.1-70B FP8
weights and KV, shipped catalog, each configuration restricted to its device types (all TP
degrees and counts searched), at a rate high enough that rounding instance counts up barely
matters. Prints a Markdown table with ratios against H100:H100 in the same run.
"""

from __future__ import annotations

import argparse
import sys

from vllm_hetero_pd.planner.catalog import Catalog, load_catalog
from vllm_hetero_pd.planner.model import ModelSpec, load_model
from vllm_hetero_pd.planner.search import Plan, SearchSpace, search
from vllm_hetero_pd.planner.workload import Slo, Workload

CONFIGS = {  # label -> (prefill devices, decode devices, colocated devices)
    "H100:H100": (("H100",), ("H100",), ()),
    "B200:B200": (("B200",), ("B200",), ()),
    "B200:Gaudi3": (("B200",), ("Gaudi3",), ()),
    "B200:MI300X": (("B200",), ("MI300X",), ()),
    "colocated H100": ((), (), ("H100",)),
    "best NVIDIA-only (disagg.)": (("A100", "L40S", "H100", "H200", "B200"),) * 2 + ((),),
    "best AMD-only (disagg.)": (("MI300X", "MI325X", "MI355X"),) * 2 + ((),),
    "best Intel-only (disagg.)": (("Gaudi2", "Gaudi3"),) * 2 + ((),),
    "best of all (planner)": (("A100", "L40S", "H100", "H200", "B200", "MI300X", "MI325X", "MI355X", "Gaudi2",
                               "Gaudi3"),) * 3,
}
SHAPES = ((4096, 512, 2.0), (512, 4096, 1.0))  # ISL, OSL, TTFT SLO (s)


def best_plans(catalog: Catalog, model: ModelSpec, workload: Workload, slo: Slo) -> dict[str, Plan | None]:
    """The cheapest plan of every configuration in ``CONFIGS`` under ``catalog``'s prices."""
    return {label: search(model, catalog, workload, slo,
                          SearchSpace(prefill_devices=p, decode_devices=d, colocated_devices=c)).best
            for label, (p, d, c) in CONFIGS.items()}


def _cells(plan: Plan | None, base: Plan | None) -> list[str]:
    if plan is None or base is None:
        return ["infeasible", "", ""]
    return [plan.describe(), f"{plan.cost_per_mtok:.3f} ({plan.cost_per_mtok_all:.3f})",
            f"{base.cost_per_mtok / plan.cost_per_mtok:.2f}x"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=50.0, help="requests/s (high, so rounding is small)")
    parser.add_argument("--tpot-ms", type=float, default=50.0, help="TPOT p90 SLO in ms")


def run(args: argparse.Namespace) -> int:
    rental = load_catalog()
    model = load_model("llama-3.1-70b", weight_dtype="fp8")
    print(f"Llama-3.1-70B FP8, {args.rate:g} req/s, TPOT p90 <= {args.tpot_ms:g} ms, TTFT p90 <= 2 s (4096 in) / "
          "1 s (512 in); $/Mtok = $ per million output tokens (input + output in brackets); "
          "x = H100:H100 $/Mtok / this $/Mtok in the same cost mode")
    for isl, osl, ttft_s in SHAPES:
        workload = Workload(isl=isl, osl=osl, rate=args.rate)
        slo = Slo(ttft_s=ttft_s, tpot_s=args.tpot_ms / 1e3)
        modes = [best_plans(c, model, workload, slo) for c in (rental, rental.owned())]
        print(f"\nISL {isl} / OSL {osl}\n")
        print("| configuration | rental plan | $/Mtok | x | TCO plan | $/Mtok | x |")
        print("|---|---|---|---|---|---|---|")
        for label in CONFIGS:
            cells = [c for plans in modes for c in _cells(plans[label], plans["H100:H100"])]
            print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_hetero_pd.planner.reproduce",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
