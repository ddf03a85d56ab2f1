"""``vllm-hetero-pd bench <name>``: every benchmark behind one subcommand.

Each benchmark lives next to the code it measures and reports ratios against a baseline it
measures in the same run (memcpy, a direct backend call, raw NIXL, upstream NixlConnector).
"""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS: dict[str, tuple[str, str]] = {
    "shim": ("vllm_hetero_pd.shim.bench", "format translation GB/s per format pair vs torch copy"),
    "router": ("vllm_hetero_pd.router.bench", "router overhead vs calling the backends directly"),
    "planner": ("vllm_hetero_pd.planner.bench", "planner search time on a large catalog"),
    "planner-nim": ("vllm_hetero_pd.planner.published", "planner model vs published NIM, ML.ENERGY, dstack tables"),
    "planner-pd": ("vllm_hetero_pd.planner.pd_validate", "planner P/D model vs a real CPU prefill+decode pair"),
    "e2e": ("vllm_hetero_pd.launch.bench_e2e", "TTFT/TPOT: monolithic vs upstream NixlConnector vs ours"),
    "goodput": ("vllm_hetero_pd.launch.bench_goodput", "goodput per arrival rate on the same 2 cores: monolithic "
                                                       "vs P/D 1+1, measured beside the planner's prediction"),
    "prefix": ("vllm_hetero_pd.launch.bench_routing", "multi-turn chat on 2 prefills: prefix hits, "
                                                      "prefill tokens and TTFT per prefill policy"),
    "decode-capacity": ("vllm_hetero_pd.launch.bench_routing", "a small-KV decode next to a large one: long "
                                                               "requests and preemptions per decode policy"),
    "local-prefill": ("vllm_hetero_pd.launch.bench_routing", "short uncached prompts prefilled by the decode vs "
                                                             "always remote, per min_disagg_tokens"),
    "soak": ("vllm_hetero_pd.launch.bench_soak", "a random mix of client requests through the router, a decode "
                                                 "restarted mid-run: requests lost, KV blocks left"),
    "dynamic": ("vllm_hetero_pd.launch.bench_dynamic", "3 kv_both instances, a prefill-heavy then decode-heavy "
                                                       "workload: goodput of 2P:1D, 1P:2D and the ratio controller"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    argv = sys.argv[1:]
    chosen = argv[argv.index("bench") + 1] if "bench" in argv[:-1] else None
    for name, (module, help_text) in BENCHMARKS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(sp)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(BENCHMARKS[args.benchmark][0]).run(args) or 0)
