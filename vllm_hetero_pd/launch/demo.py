"""``vllm-hetero-pd demo``: the main job. A cross-release prefill/decode pair against a monolithic engine.

The prefill runs vLLM 0.32 (layout era C) with block size 128; the decode runs vLLM 0.28 (era B,
the era vllm-gaudi pins) from ``.venv-028`` with block size 32. The two releases meet by
``KVFormat`` alone: the decode READs the prefill's blocks over NIXL and translates them. The
demo records the greedy output of a monolithic engine **of the decode's release**, serves the
same prompts (1-900 tokens, both block sizes plus and minus one) disaggregated, and prints per
prompt whether the output matches, the request latency, and the transfer and translation time
the decode measured; then which release, format and data path each side negotiated.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from vllm_hetero_pd.launch.cli import add_arguments as add_launch_arguments
from vllm_hetero_pd.launch.cli import pd_specs, resolve_model
from vllm_hetero_pd.launch.cluster import LocalCluster
from vllm_hetero_pd.launch.greedy import reference_completions
from vllm_hetero_pd.launch.request import disaggregated_request
from vllm_hetero_pd.testing.compare import LOGPROB_TOLERANCE, compare, greedy_body, max_logprob_delta, parse_completion
from vllm_hetero_pd.testing.metrics import metric_sum, prompt_tokens_by_source, scrape
from vllm_hetero_pd.testing.prompts import EDGE_LENGTHS, make_prompts

VENV_028 = Path(".venv-028/bin/python")
# What each side's connector and engine log about itself (see connector/worker.py, receiver.py).
NEGOTIATED = (re.compile(r"V1 LLM engine \(v[^ ]+"), re.compile(r"native format .*"),
              re.compile(r"handshake with prefill .*"), re.compile(r"staging pool .*"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_launch_arguments(parser)
    parser.set_defaults(dtype="bfloat16", log_dir=Path("logs/demo"), connector="HeteroNixlConnector",
                        prefill_block_size=128, decode_block_size=32, decode_python=str(VENV_028))
    parser.add_argument("--max-tokens", type=int, default=32)


def run(args: argparse.Namespace) -> int:
    for role in ("prefill", "decode"):
        python = getattr(args, f"{role}_python")
        if python and not Path(python).exists():
            print(f"the {role}'s environment {python} does not exist: run `make setup-028` (vLLM 0.28), or pass "
                  f"--{role}-python", file=sys.stderr)
            return 2
    model = resolve_model(args.model, args.dtype)
    prompts = make_prompts(model, EDGE_LENGTHS)
    print(f"model {model}\nmonolithic reference on the decode's release ({len(prompts)} prompts) ...", flush=True)
    reference = reference_completions(model, prompts, args.log_dir / "monolithic", args.max_tokens,
                                      python=args.decode_python, block_size=args.decode_block_size)
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
        negotiated = {inst.name: negotiated_lines(inst.log_path) for inst in (prefill, decode)}
    print(f"\n{'#':>2} {'prompt':>6} {'output':>6} {'ids match':>9} {'max |dlogprob|':>14} {'latency ms':>10} "
          f"{'transfer ms':>11} {'translate ms':>12}")
    for i, (prompt, ref, out, (ms, xfer, shim)) in enumerate(zip(prompts, reference, got, rows)):
        print(f"{i:>2} {len(prompt):>6} {len(out.token_ids):>6} {str(ref.token_ids == out.token_ids):>9} "
              f"{max_logprob_delta(ref, out):>14.2e} {ms:>10.0f} {xfer:>11.2f} {shim:>12.2f}")
    for name, lines in negotiated.items():
        print(f"\n{name}:\n  " + "\n  ".join(lines or ["(nothing logged)"]))
    print(f"\ndecode prompt tokens by source: {by_source}")
    mismatches = compare(reference, got, LOGPROB_TOLERANCE)
    print("RESULT:", "all outputs equal the monolithic engine of the decode's release" if not mismatches
          else mismatches, f"(logprob tolerance {LOGPROB_TOLERANCE:g})")
    return 1 if mismatches else 0


def negotiated_lines(log_path: Path) -> list[str]:
    """The first line of each kind in ``NEGOTIATED`` that an instance logged: release, format, path."""
    text = log_path.read_text(errors="replace")
    return [m.group(0) for pattern in NEGOTIATED if (m := pattern.search(text))]


def connector_seconds(url: str) -> tuple[float, float]:
    """Cumulative (transfer, translate) seconds the decode's HeteroNixlConnector has reported (0 for
    other connectors)."""
    samples = scrape(url)
    return (metric_sum(samples, "vllm:hetero_pd_transfer_seconds_sum"),
            metric_sum(samples, "vllm:hetero_pd_translate_seconds_sum"))
