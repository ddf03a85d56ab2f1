"""``vllm-hetero-pd demo``: the main job. A local prefill/decode pair against a monolithic engine.

It builds the tiny model, records a monolithic engine's greedy output, then serves the same
prompts disaggregated (prefill on one engine, KV over NIXL, decode on another) and prints, per
prompt, whether the output matches and how long the request took.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vllm_hetero_pd.launch.cli import add_arguments as add_launch_arguments
from vllm_hetero_pd.launch.cli import pd_specs, resolve_model
from vllm_hetero_pd.launch.cluster import LocalCluster
from vllm_hetero_pd.launch.request import disaggregated_request
from vllm_hetero_pd.testing.compare import (TOLERANCE, compare, greedy_body, max_logprob_delta, parse_completion,
                                            reference_completions)
from vllm_hetero_pd.testing.metrics import prompt_tokens_by_source
from vllm_hetero_pd.testing.prompts import DEFAULT_LENGTHS, make_prompts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_launch_arguments(parser)
    parser.set_defaults(dtype="float32", log_dir=Path("logs/demo"))
    parser.add_argument("--max-tokens", type=int, default=32)


def run(args: argparse.Namespace) -> int:
    model = resolve_model(args.model, args.dtype)
    prompts = make_prompts(model, DEFAULT_LENGTHS)
    print(f"model {model}\nmonolithic reference ({len(prompts)} prompts) ...", flush=True)
    reference = reference_completions(model, prompts, args.log_dir / "monolithic", args.max_tokens)
    print(f"prefill/decode with {args.connector} ...", flush=True)
    with LocalCluster(pd_specs(args, model), args.log_dir / "pd", args.startup_timeout) as cluster:
        prefill, decode = cluster.by_role("prefill")[0], cluster.by_role("decode")[0]
        got, millis = [], []
        for prompt in prompts:
            start = time.perf_counter()
            got.append(parse_completion(disaggregated_request(prefill.url, decode.url,
                                                              greedy_body(prompt, args.max_tokens))))
            millis.append(1000 * (time.perf_counter() - start))
        by_source = prompt_tokens_by_source(decode.url)
    tolerance = TOLERANCE[args.dtype]
    print(f"\n{'#':>2} {'prompt':>6} {'output':>6} {'ids match':>9} {'max |dlogprob|':>14} {'latency ms':>10}")
    for i, (prompt, ref, out, ms) in enumerate(zip(prompts, reference, got, millis)):
        print(f"{i:>2} {len(prompt):>6} {len(out.token_ids):>6} {str(ref.token_ids == out.token_ids):>9} "
              f"{max_logprob_delta(ref, out):>14.2e} {ms:>10.0f}")
    print(f"\ndecode prompt tokens by source: {by_source}")
    mismatches = compare(reference, got, tolerance)
    print("RESULT:", "all outputs equal the monolithic engine" if not mismatches else mismatches,
          f"(logprob tolerance {tolerance:g})")
    return 1 if mismatches else 0
