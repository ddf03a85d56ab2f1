"""The colocated model against a published benchmark table: NVIDIA NIM, Llama-3.3-70B FP8, 2x H100 TP2.

Run: ``python -m vllm_hetero_pd.planner.published``. The table (docs.nvidia.com/nim/benchmarking/
llm/1.0.0/performance, NIM 1.8.0, AIPerf) reports mean TTFT and ITL at fixed concurrency. A
closed loop of ``c`` clients is turned into an arrival rate by Little's law, ``rate x E2E(rate)
= c`` with ``E2E = TTFT + (OSL - 1) ITL``, and the model's means are compared at that rate.

Two device inputs are compared: the shipped H100 (MLE's FP8 matmul efficiency 70.9 %), and one
whose FP8 efficiency is fitted to a *different* run of the same table, 500 in / 2000 out at
concurrency 1 (TTFT 47.77 ms), so no validated point is used to fit. Llama-3.3-70B has Llama-3.1-
70B's geometry, so the preset stands in for it.
"""

from __future__ import annotations

import argparse
import sys

import msgspec

from vllm_hetero_pd.planner import colocated, perf
from vllm_hetero_pd.planner.catalog import Device, load_catalog
from vllm_hetero_pd.planner.model import ModelSpec, load_model
from vllm_hetero_pd.planner.workload import Workload

SOURCE = ("docs.nvidia.com/nim/benchmarking/llm/1.0.0/performance (NIM 1.8.0, Llama-3.3-70b-instruct, "
          "2x H100 80G, fp8 TP2)")
TP = 2
VALIDATED = Workload(isl=5000, osl=500, rate=1)
PUBLISHED = {1: (0.40677, 0.01858), 5: (0.5467, 0.02183), 25: (0.68869, 0.03875), 50: (0.83451, 0.05973)}
CALIBRATION = (Workload(isl=500, osl=2000, rate=1), 1, 0.04777)  # shape, concurrency, mean TTFT (s)


class Row(msgspec.Struct, frozen=True, kw_only=True):
    """One concurrency: published and predicted means, and the arrival rate Little's law gives."""

    concurrency: int
    rate: float
    ttft_s: float
    itl_s: float
    published_ttft_s: float
    published_itl_s: float

    @property
    def errors(self) -> tuple[float, float]:
        return self.ttft_s / self.published_ttft_s - 1, self.itl_s / self.published_itl_s - 1


def closed_loop(model: ModelSpec, device: Device, workload: Workload, concurrency: int) -> tuple[float, float, float]:
    """(rate, mean TTFT, mean ITL) of ``concurrency`` clients that each send their next request when
    the last one ends: the rate with ``rate x E2E(rate) = concurrency`` (E2E grows with the rate)."""
    inst = colocated.instance(model, device, TP, workload)

    def e2e(rate: float) -> float:
        ttft, itl = colocated.latency(inst, rate, None)
        return ttft + (workload.osl - 1) * itl

    rate = perf.bisect(lambda r: r * e2e(r) < concurrency, 0.0, concurrency / e2e(0.0))
    return (rate, *colocated.latency(inst, rate, None))


def calibrated(model: ModelSpec, device: Device) -> Device:
    """``device`` with its FP8 matmul and attention efficiencies scaled so the calibration run's TTFT matches."""
    workload, concurrency, ttft = CALIBRATION

    def scaled(k: float) -> Device:
        return msgspec.structs.replace(device, fp8_efficiency=device.fp8_efficiency * k,
                                       attention_efficiency=device.attention_efficiency * k)

    k = perf.bisect(lambda k: closed_loop(model, scaled(k), workload, concurrency)[1] > ttft, 0.05,
                    1.0 / device.fp8_efficiency)
    return msgspec.structs.replace(scaled(k), sources={
        **device.sources, "fp8_efficiency": f"fitted to {SOURCE}, 500/2000 at concurrency 1 (TTFT 47.77 ms)"})


def compare(device: Device, model: ModelSpec) -> list[Row]:
    """Model vs the published 5000/500 rows."""
    rows = []
    for c, (ttft, itl) in PUBLISHED.items():
        rate, p_ttft, p_itl = closed_loop(model, device, VALIDATED, c)
        rows.append(Row(concurrency=c, rate=rate, ttft_s=p_ttft, itl_s=p_itl, published_ttft_s=ttft,
                        published_itl_s=itl))
    return rows


def table(label: str, rows: list[Row]) -> str:
    lines = [f"| {label} | concurrency | rate (req/s) | TTFT published / predicted (ms) | error | "
             "ITL published / predicted (ms) | error |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        e_ttft, e_itl = r.errors
        lines.append(f"| | {r.concurrency} | {r.rate:.2f} | {r.published_ttft_s * 1e3:.0f} / {r.ttft_s * 1e3:.0f} | "
                     f"{e_ttft:+.0%} | {r.published_itl_s * 1e3:.1f} / {r.itl_s * 1e3:.1f} | {e_itl:+.0%} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options: the table and the model inputs are fixed so the numbers are reproducible."""


def run(args: argparse.Namespace) -> int:
    model = load_model("llama-3.1-70b", weight_dtype="fp8")
    shipped = load_catalog().device("H100")
    fitted = calibrated(model, shipped)
    print(f"{SOURCE}; ISL {VALIDATED.isl} / OSL {VALIDATED.osl}; vLLM V1 colocated model, means\n")
    print(table("shipped H100 (FP8 eff. 0.709)", compare(shipped, model)))
    print()
    print(table(f"H100, FP8 eff. {fitted.fp8_efficiency:.3f} fitted on 500/2000 c=1", compare(fitted, model)))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_hetero_pd.planner.published",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
