"""Reproduction table for docs/planner.md: $/Mtok of fixed P:D pairings vs the published ratios.

Run: ``python -m vllm_hetero_pd.planner.reproduce [--rate R] [--tpot-ms T]``. Llama-3.1-70B FP8
weights and KV, shipped catalog, each configuration restricted to its device types (all TP
degrees and counts searched), at a rate high enough that rounding instance counts up barely
matters. Prints a Markdown table with ratios against H100:H100 in the same run.
"""

from __future__ import annotations

import argparse
import sys

from vllm_hetero_pd.planner.catalog import load_catalog
from vllm_hetero_pd.planner.model import load_model
from vllm_hetero_pd.planner.search import SearchSpace, search
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=50.0, help="requests/s (high, so rounding is small)")
    parser.add_argument("--tpot-ms", type=float, default=50.0, help="TPOT p90 SLO in ms")


def run(args: argparse.Namespace) -> int:
    catalog = load_catalog()
    model = load_model("llama-3.1-70b", weight_dtype="fp8")
    rows: dict[str, list[str]] = {label: [] for label in CONFIGS}
    for isl, osl, ttft_s in SHAPES:
        workload = Workload(isl=isl, osl=osl, rate=args.rate)
        slo = Slo(ttft_s=ttft_s, tpot_s=args.tpot_ms / 1e3)
        costs = {}
        for label, (p, d, c) in CONFIGS.items():
            best = search(model, catalog, workload, slo, SearchSpace(prefill_devices=p, decode_devices=d,
                                                                     colocated_devices=c)).best
            costs[label] = best
        base = costs["H100:H100"].cost_per_mtok
        for label, plan in costs.items():
            if plan is None:
                rows[label] += ["infeasible", "", ""]
            else:
                rows[label] += [plan.describe(), f"{plan.cost_per_mtok:.3f}", f"{base / plan.cost_per_mtok:.2f}x"]
    print(f"Llama-3.1-70B FP8, {args.rate:g} req/s, TPOT p90 <= {args.tpot_ms:g} ms, TTFT p90 <= 2 s (4096 in) / "
          "1 s (512 in); $/Mtok = $ per million output tokens; 'vs H100:H100' = H100:H100 $/Mtok / this $/Mtok\n")
    print("| configuration | plan (4096/512) | $/Mtok | vs H100:H100 | plan (512/4096) | $/Mtok | vs H100:H100 |")
    print("|---|---|---|---|---|---|---|")
    for label, cells in rows.items():
        print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_hetero_pd.planner.reproduce",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
