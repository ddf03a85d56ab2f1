"""Reproduction table for docs/planner.md: $/Mtok of fixed P:D pairings vs the published ratios.

Run: ``python -m vllm_hetero_pd.planner.reproduce [--rate R] [--tpot-ms T]``. Llama-3.1-70B FP8
weights and KV, shipped catalog, each configuration restricted to its device types (all TP
degrees and counts searched), at a rate high enough that rounding instance counts up barely
matters. Prints a Markdown table with ratios against H100:H100 in the same run.
"""

from __future__ import annotations

import argparse
import sys

import msgspec

from vllm_hetero_pd.planner import sensitivity
from vllm_hetero_pd.planner.catalog import Catalog, load_catalog
from vllm_hetero_pd.planner.model import ModelSpec, load_model
from vllm_hetero_pd.planner.perf import TP_DEGREES
from vllm_hetero_pd.planner.search import Plan, SearchSpace, search
from vllm_hetero_pd.planner.workload import Slo, Workload

NVIDIA = ("A100", "L40S", "H100", "H200", "B200")
AMD = ("MI300X", "MI325X", "MI355X")
INTEL = ("Gaudi2", "Gaudi3")


class Config(msgspec.Struct, frozen=True):
    """One row: the devices each role may use, and the TP degrees searched."""

    prefill: tuple[str, ...]
    decode: tuple[str, ...]
    colocated: tuple[str, ...] = ()
    tp: tuple[int, ...] = TP_DEGREES

    def space(self) -> SearchSpace:
        return SearchSpace(prefill_devices=self.prefill, decode_devices=self.decode, colocated_devices=self.colocated,
                           tp_degrees=self.tp)


CONFIGS = {
    "H100:H100": Config(("H100",), ("H100",)),
    "H100:H100, TP8 only": Config(("H100",), ("H100",), tp=(8,)),
    "B200:B200": Config(("B200",), ("B200",)),
    "B200:Gaudi3": Config(("B200",), ("Gaudi3",)),
    "B200:MI300X": Config(("B200",), ("MI300X",)),
    "colocated H100": Config((), (), ("H100",)),
    "best NVIDIA-only (disagg.)": Config(NVIDIA, NVIDIA),
    "best AMD-only (disagg.)": Config(AMD, AMD),
    "best Intel-only (disagg.)": Config(INTEL, INTEL),
    "best of all (planner)": Config(NVIDIA + AMD + INTEL, NVIDIA + AMD + INTEL, NVIDIA + AMD + INTEL),
}
SINGLE_VENDOR = ("best NVIDIA-only (disagg.)", "best AMD-only (disagg.)", "best Intel-only (disagg.)")
CLAIMS = (  # (claim, published, numerator config, denominator configs: the cheapest of them)
    ("B200:Gaudi3 vs H100:H100", "~3x (4096/512), up to 4x (512/4096) [secondary]", "B200:Gaudi3", ("H100:H100",)),
    ("B200:Gaudi3 vs H100:H100 TP8", "", "B200:Gaudi3", ("H100:H100, TP8 only",)),
    ("B200:Gaudi3 vs best single vendor", "1.7x (Gimlet blog)", "B200:Gaudi3", SINGLE_VENDOR),
    ("B200:B200 vs H100:H100", "~2.5x decode-heavy [secondary]", "B200:B200", ("H100:H100",)),
)
SHAPES = ((4096, 512, 2.0), (512, 4096, 1.0))  # ISL, OSL, TTFT SLO (s)


def _devices(labels) -> set[str]:
    return {d for label in labels for c in [CONFIGS[label]] for d in (*c.prefill, *c.decode, *c.colocated)}


def best_plans(catalog: Catalog, model: ModelSpec, workload: Workload, slo: Slo,
               labels=tuple(CONFIGS)) -> dict[str, Plan | None]:
    """The cheapest plan of each configuration in ``labels`` under ``catalog``'s prices."""
    return {label: search(model, catalog, workload, slo, CONFIGS[label].space()).best for label in labels}


def claim_ratio(catalog: Catalog, model: ModelSpec, workload: Workload, slo: Slo, numerator: str,
                denominators: tuple[str, ...], tco: bool) -> float:
    """$/Mtok of the cheapest denominator config / the numerator's (higher: the numerator is cheaper)."""
    priced = catalog.owned() if tco else catalog
    plans = best_plans(priced, model, workload, slo, (numerator, *denominators))
    return min(plans[d].cost_per_hour for d in denominators) / plans[numerator].cost_per_hour


def claim_band(catalog: Catalog, model: ModelSpec, workload: Workload, slo: Slo, numerator: str,
               denominators: tuple[str, ...], tco: bool) -> sensitivity.Band:
    """``claim_ratio`` and its band over the unmeasured inputs of every device the claim involves."""
    return sensitivity.band(lambda c: claim_ratio(c, model, workload, slo, numerator, denominators, tco), catalog,
                            _devices((numerator, *denominators)), tco)


def _cells(plan: Plan | None, base: Plan | None) -> list[str]:
    if plan is None or base is None:
        return ["infeasible", "", ""]
    return [plan.describe(), f"{plan.cost_per_mtok:.3f} ({plan.cost_per_mtok_all:.3f})",
            f"{base.cost_per_mtok / plan.cost_per_mtok:.2f}x"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=50.0, help="requests/s (high, so rounding is small)")
    parser.add_argument("--tpot-ms", type=float, default=50.0, help="TPOT p90 SLO in ms")
    parser.add_argument("--bands", action="store_true",
                        help="also sweep every [inferred]/[assumption] input for the claims' ratio bands (minutes)")


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
        if args.bands:
            print(f"\nISL {isl} / OSL {osl}: ratios with their sensitivity bands (sensitivity.py)\n")
            print("| claim | published | rental | TCO |")
            print("|---|---|---|---|")
            for claim, published, num, dens in CLAIMS:
                cells = [claim_band(rental, model, workload, slo, num, dens, tco).describe() for tco in (False, True)]
                print(f"| {claim} | {published} | " + " | ".join(cells) + " |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_hetero_pd.planner.reproduce",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
