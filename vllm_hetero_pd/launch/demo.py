"""``vllm-hetero-pd demo``: the main job. A heterogeneous prefill/decode pair against a monolithic engine.

It builds the tiny model, records a monolithic engine's greedy output, then serves the same
prompts disaggregated: the prefill (block size 32) exposes its KV in CUDA FLASH_ATTN's byte
layout (vLLM 0.29+ LBNHC, block size 16), the decode (block size 128, CPU_ATTN's packed layout)
READs it over NIXL and translates it. Per prompt it prints whether the output matches, the
request latency, and the transfer and translation time the decode engine measured.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vllm_hetero_pd.launch.cli import add_arguments as add_launch_arguments
from vllm_hetero_pd.launch.cli import pd_specs, resolve_model
from vllm_hetero_pd.launch.cluster import LocalCluster
from vllm_hetero_pd.launch.greedy import reference_completions
from vllm_hetero_pd.launch.request import disaggregated_request
from vllm_hetero_pd.testing.compare import LOGPROB_TOLERANCE, compare, greedy_body, max_logprob_delta, parse_completion
from vllm_hetero_pd.testing.metrics import metric_sum, prompt_tokens_by_source, scrape
from vllm_hetero_pd.testing.prompts import DEFAULT_LENGTHS, make_prompts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_launch_arguments(parser)
    parser.set_defaults(dtype="bfloat16", log_dir=Path("logs/demo"), connector="HeteroNixlConnector",
                        prefill_block_size=32, decode_block_size=128,
                        kv_extra_config={"export_format": "cuda/flash_attn/C/LBNHC", "export_block_size": 16})
    parser.add_argument("--max-tokens", type=int, default=32)


def run(args: argparse.Namespace) -> int:
    model = resolve_model(args.model, args.dtype)
    prompts = make_prompts(model, DEFAULT_LENGTHS)
    print(f"model {model}\nmonolithic reference ({len(prompts)} prompts) ...", flush=True)
    reference = reference_completions(model, prompts, args.log_dir / "monolithic", args.max_tokens)
    print(f"prefill/decode with {args.connector} ...", flush=True)
    with LocalCluster(pd_specs(args, model), args.log_dir / "pd", args.startup_timeout) as cluster:
        prefill, decode = cluster.by_role("prefill")[0], cluster.by_role("decode")[0]
        got, rows = [], []
        for prompt in prompts:
            before, start = connector_seconds(decode.url), time.perf_counter()
            got.append(parse_completion(disaggregated_request(prefill.url, decode.url,
                                                              greedy_body(prompt, args.max_tokens))))
            latency = time.perf_counter() - start
            after = connector_seconds(decode.url)
            rows.append([1000 * latency] + [1000 * (a - b) for a, b in zip(after, before)])
        by_source = prompt_tokens_by_source(decode.url)
    tolerance = LOGPROB_TOLERANCE
    print(f"\n{'#':>2} {'prompt':>6} {'output':>6} {'ids match':>9} {'max |dlogprob|':>14} {'latency ms':>10} "
          f"{'transfer ms':>11} {'translate ms':>12}")
    for i, (prompt, ref, out, (ms, xfer, shim)) in enumerate(zip(prompts, reference, got, rows)):
        print(f"{i:>2} {len(prompt):>6} {len(out.token_ids):>6} {str(ref.token_ids == out.token_ids):>9} "
              f"{max_logprob_delta(ref, out):>14.2e} {ms:>10.0f} {xfer:>11.2f} {shim:>12.2f}")
    print(f"\ndecode prompt tokens by source: {by_source}")
    mismatches = compare(reference, got, tolerance)
    print("RESULT:", "all outputs equal the monolithic engine" if not mismatches else mismatches,
          f"(logprob tolerance {tolerance:g})")
    return 1 if mismatches else 0


def connector_seconds(url: str) -> tuple[float, float]:
    """Cumulative (transfer, translate) seconds the decode's HeteroNixlConnector has reported (0 for
    other connectors)."""
    samples = scrape(url)
    return (metric_sum(samples, "vllm:hetero_pd_transfer_seconds_sum"),
            metric_sum(samples, "vllm:hetero_pd_translate_seconds_sum"))
