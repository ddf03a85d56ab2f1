"""Real-engine experiments of the kv_aware router (issue 13), one per ``vllm-hetero-pd bench`` name.

* ``prefix``: 2 prefills + 1 decode (HeteroNixlConnector, prefix caching on, KV events over ZMQ),
  multi-turn chat conversations whose turns extend the earlier turns, over a few shared system
  prompts (>= 100 requests). The same workload runs through the router once per prefill policy
  (``round_robin``, ``least_work``, ``kv_aware`` once per ``prefix_weight`` x
  ``min_disagg_tokens``), with the engines' prefix caches reset in between (vLLM's
  ``/reset_prefix_cache``, dev mode). Per policy: the prefills' prefix cache hit rate, prompt
  tokens computed on every instance, the decode's share apart (``vllm:prefix_cache_*``,
  ``vllm:prompt_tokens_by_source`` deltas), TTFT p50/p90 (client side, streamed), and every
  answer compared with a monolithic engine's (greedy; the conversation history is the monolithic
  answers, so every policy sends the same prompts). Each turn's conversations arrive in a seeded
  random order, the same for every policy.
* ``decode-capacity``: 1 prefill + 2 decodes, decode 0 with a small KV space
  (``--num-gpu-blocks-override``, with a ``--max-model-len`` small enough for vLLM to accept it);
  long and short prompts at once. Per decode policy (``least_work``, ``kv_aware``), from each
  decode's own metrics: requests, long requests (``vllm:request_prompt_tokens`` histogram) and
  preemptions (``vllm:num_preemptions_total``).
* ``local-prefill``: 1 prefill + 1 decode, short uncached prompts alternating with long ones, sent
  open-loop at a fixed interval (a closed loop would send the next long prompt sooner whenever
  the short ones answer faster, and so charge the long ones for it). Per
  ``min_disagg_tokens`` (0 = always remote, then each ``--thresholds`` value): TTFT p50 of the short
  and the long prompts, and how many were prefilled locally: a threshold worth setting lowers the
  short prompts' TTFT without raising the long ones'.

Results go to ``--out`` (``<name>.json`` and ``<name>.md``), with the machine's load average at
start and end: on a shared host the numbers are only indicative.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgspec

from vllm_hetero_pd.launch.cluster import LocalCluster
from vllm_hetero_pd.launch.instance import InstanceSpec, hetero_kv_config
from vllm_hetero_pd.launch.router_process import running_router
from vllm_hetero_pd.ports import free_port
from vllm_hetero_pd.router.config import (
    DEFAULT_MIN_DISAGG_TOKENS,
    Policy,
    PoolConfig,
    RouterConfig,
    ScoringConfig,
    parse_instance,
)
from vllm_hetero_pd.testing.metrics import metric_sum, scrape
from vllm_hetero_pd.testing.tiny_model import sample_text

POLICIES = ("round_robin", "least_work", "kv_aware")
BLOCK_SIZE = 32  # vLLM CPU_ATTN needs a multiple of 32
T = TypeVar("T")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model dir (default: the tiny llama-gqa-d32 test model)")
    parser.add_argument("--out", type=Path, default=Path("bench-routing-out"))
    parser.add_argument("--conversations", type=int, default=12, help="prefix: conversations (x turns = requests)")
    parser.add_argument("--turns", type=int, default=9, help="prefix: turns per conversation")
    parser.add_argument("--system-prompts", type=int, default=3, help="prefix: shared system prompts")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                        help="prefix: send each turn's conversations in a seeded random order (default) or in order")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--policies", nargs="*", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--repeat", type=int, default=3,
                        help="prefix: rounds of every policy on the same engines, each round in a rotated order")
    parser.add_argument("--prefix-weights", type=float, nargs="*", default=[ScoringConfig().prefix_weight],
                        help="prefix: one kv_aware run per scoring.prefix_weight (default: the router's default)")
    parser.add_argument("--min-disagg-tokens", type=int, nargs="*", default=[DEFAULT_MIN_DISAGG_TOKENS],
                        help="prefix: one kv_aware run per min_disagg_tokens, x each prefix weight (default: the "
                        "router's default)")
    parser.add_argument("--small-kv-blocks", type=int, default=96,
                        help=f"decode-capacity: KV blocks of the small decode (x{BLOCK_SIZE} tokens; the default "
                        "holds one long request, not two)")
    parser.add_argument("--small-max-model-len", type=int, default=2304,
                        help="decode-capacity: the small decode's --max-model-len; vLLM refuses a KV space smaller "
                        "than one request of this length (default: a long request, 2214 prompt + 64 output tokens "
                        "with the tiny model's tokenizer, rounded up to blocks)")
    parser.add_argument("--thresholds", type=int, nargs="*", default=[32, 64, 128, 256],
                        help="local-prefill: min_disagg_tokens values to compare with 0")
    parser.add_argument("--interval-ms", type=float, default=300.0,
                        help="local-prefill: one request every this many ms, short and long alternating (an open "
                        "loop: every threshold sees the same arrivals)")


def run(args: argparse.Namespace) -> int:
    if args.model is None:
        from vllm_hetero_pd.testing.tiny_model import build_tiny_model
        args.model = str(build_tiny_model("llama-gqa-d32", "float32"))
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.benchmark
    load_before = os.getloadavg()
    result = {"prefix": run_prefix, "decode-capacity": run_decode_capacity,
              "local-prefill": run_local_prefill}[name](args)
    result["load_average"] = {"start": load_before, "end": os.getloadavg()}
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    table = result.pop("table")
    (args.out / f"{name}.md").write_text(table + "\n")
    print(table)
    print(f"load average start {load_before}, end {result['load_average']['end']}")
    return 0 if result.get("outputs_equal", True) else 1


# ---------------------------------------------------------------------------------------------- engines

def events_args(port: int, replay_port: int) -> list[str]:
    """vLLM flags for a ZMQ KV event publisher on ``port`` with a replay socket on ``replay_port``."""
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{port}",
              "replay_endpoint": f"tcp://*:{replay_port}"}
    return ["--kv-events-config", json.dumps(config)]


def engine_specs(model: str, num_prefill: int, num_decode: int, decode_extra: list[list[str]] | None = None
                 ) -> tuple[list[InstanceSpec], list[str]]:
    """Specs with prefix caching and KV events on, and the router's instance arguments for them."""
    specs, router_args = [], []
    for role, count in (("prefill", num_prefill), ("decode", num_decode)):
        for i in range(count):
            port, replay = free_port(), free_port()
            extra = ["--enable-prefix-caching", *events_args(port, replay)]
            if role == "decode" and decode_extra:
                extra += decode_extra[i]
            kv_role = "kv_producer" if role == "prefill" else "kv_consumer"
            specs.append(InstanceSpec(role=role, model=model, block_size=BLOCK_SIZE,
                                      kv_transfer_config=hetero_kv_config(kv_role), extra_args=extra,
                                      env={"VLLM_SERVER_DEV_MODE": "1"}))
            router_args.append(f"kv_events=tcp://127.0.0.1:{port},kv_events_replay=tcp://127.0.0.1:{replay}")
    return specs, router_args


def instance_args(cluster: LocalCluster, router_args: list[str]) -> tuple[list[str], list[str]]:
    urls = [f"{inst.url},{extra}" for inst, extra in zip(cluster.instances, router_args)]
    num_prefill = len(cluster.by_role("prefill"))
    return urls[:num_prefill], urls[num_prefill:]


def rounds_order(items: list[T], num_rounds: int) -> list[list[T]]:
    """The items of each round, rotated by one per round, so none always runs first (on the
    coldest caches) or last."""
    return [items[r % len(items):] + items[:r % len(items)] for r in range(num_rounds)]


def reset_caches(cluster: LocalCluster) -> bool:
    """Empty every instance's prefix cache (vLLM dev mode); False when one refused (blocks still held)."""
    done = True
    for inst in cluster.instances:
        request = urllib.request.Request(inst.url + "/reset_prefix_cache", data=b"", method="POST")
        done &= json.loads(urllib.request.urlopen(request, timeout=30).read() or b"{}").get("success", True)
    return done


def counters(urls: list[str]) -> dict[str, float]:
    totals = {"queries": 0.0, "hits": 0.0, "computed": 0.0}
    for url in urls:
        s = scrape(url)
        totals["queries"] += metric_sum(s, "vllm:prefix_cache_queries_total")
        totals["hits"] += metric_sum(s, "vllm:prefix_cache_hits_total")
        totals["computed"] += metric_sum(s, "vllm:prompt_tokens_by_source_total", source="local_compute")
    return totals


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


# ---------------------------------------------------------------------------------------------- client

async def stream_chat(session: aiohttp.ClientSession, url: str, body: dict[str, Any], path: str) -> tuple[str, float]:
    """(answer text, TTFT seconds) of one streamed request."""
    start = time.perf_counter()
    ttft = None
    text = []
    async with session.post(url + path, json={**body, "stream": True}) as response:
        if response.status != 200:
            raise RuntimeError(f"{url}{path} answered HTTP {response.status}: {(await response.read())[:300]!r}")
        async for line in response.content:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            for choice in msgspec.json.decode(line[6:]).get("choices") or ():
                piece = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                if piece:
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    text.append(piece)
    return "".join(text), ttft if ttft is not None else time.perf_counter() - start


async def run_bodies(url: str, bodies: list[dict[str, Any]], concurrency: int,
                     path: str = "/v1/chat/completions", interval_s: float | None = None) -> list[tuple[str, float]]:
    """Stream every body: at most ``concurrency`` at once (a closed loop), or with ``interval_s`` body
    ``i`` sent at ``i * interval_s`` whatever the others are doing (an open loop, so two settings
    compared see the same arrivals even when one answers faster)."""
    semaphore = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def one(i, body):
            if interval_s is not None:
                await asyncio.sleep(i * interval_s)
                return await stream_chat(session, url, body, path)
            async with semaphore:
                return await stream_chat(session, url, body, path)
        return list(await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies))))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


# ---------------------------------------------------------------------------------------------- prefix

def conversation_turns(args: argparse.Namespace) -> list[list[dict[str, str]]]:
    """Per turn index, the user messages of each conversation (assistant turns come from answers)."""
    systems = [sample_text(160, 900 + s) for s in range(args.system_prompts)]
    return [[{"system": systems[c % len(systems)], "user": sample_text(30, 1000 + 97 * c + t)}
             for c in range(args.conversations)] for t in range(args.turns)]


def prefix_bodies(turns, answers: dict[tuple[int, int], str], max_tokens: int) -> list[list[dict[str, Any]]]:
    """The chat bodies turn by turn; turn t of conversation c carries c's earlier turns and answers."""
    out = []
    for t, row in enumerate(turns):
        bodies = []
        for c, turn in enumerate(row):
            messages = [{"role": "system", "content": turn["system"]}]
            for earlier in range(t):
                messages += [{"role": "user", "content": turns[earlier][c]["user"]},
                             {"role": "assistant", "content": answers[(c, earlier)]}]
            messages.append({"role": "user", "content": turn["user"]})
            bodies.append({"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0})
        out.append(bodies)
    return out


def run_prefix(args: argparse.Namespace) -> dict[str, Any]:
    turns = conversation_turns(args)
    answers: dict[tuple[int, int], str] = {}
    work = args.out / "prefix"
    mono = InstanceSpec(role="monolithic", model=args.model, block_size=BLOCK_SIZE)
    with LocalCluster([mono], work / "monolithic") as cluster:
        url = cluster.instances[0].url
        for t in range(len(turns)):  # each turn needs the previous turn's answers
            bodies = prefix_bodies(turns[:t + 1], answers, args.max_tokens)[t]
            for c, (text, _) in enumerate(asyncio.run(run_bodies(url, _named(bodies, args.model), 1))):
                answers[(c, t)] = text
    turn_bodies = prefix_bodies(turns, answers, args.max_tokens)
    specs, router_args = engine_specs(args.model, 2, 1)
    rows = []
    variants = prefix_variants(args)
    with LocalCluster(specs, work / "engines") as cluster:
        instances = instance_args(cluster, router_args)
        for number, order in enumerate(rounds_order(variants, args.repeat), 1):
            for variant in order:
                tag = f"{variant.policy}-{variant.prefix_weight}-{variant.min_disagg_tokens}-round{number}"
                row = prefix_round(args, cluster, instances, turn_bodies, answers, variant, tag)
                rows.append({**row, "round": number})
    return {"rows": rows, "outputs_equal": all(r["mismatches"] == 0 for r in rows),
            "table": "\n".join(prefix_table(rows))}


def prefix_round(args: argparse.Namespace, cluster: LocalCluster, instances: tuple[list[str], list[str]],
                 turn_bodies: list[list[dict[str, Any]]], answers: dict[tuple[int, int], str],
                 variant: PrefixVariant, tag: str) -> dict[str, Any]:
    """One variant over the whole workload from empty caches: the engines' counters, TTFTs, mismatches.

    Tokens computed count the decode too: a local prefill moves that work there, it does not remove it."""
    work = args.out / "prefix"
    prefill_urls = [i.url for i in cluster.by_role("prefill")]
    decode_urls = [i.url for i in cluster.by_role("decode")]
    reset_caches(cluster)
    before, before_decode = counters(prefill_urls), counters(decode_urls)
    config = work / f"router-{tag}.yaml"
    config.write_bytes(msgspec.yaml.encode(prefix_router_config(*instances, variant, args.model)))
    with running_router([], [], work / f"router-{tag}.log", ("--config", str(config))) as router:
        ttfts, mismatches = [], 0
        for t, bodies in enumerate(turn_bodies):
            order = arrival_order(len(bodies), t, args.shuffle)
            sent = _named([bodies[c] for c in order], args.model)
            for c, (text, ttft) in zip(order, asyncio.run(run_bodies(router, sent, args.concurrency))):
                ttfts.append(ttft)
                mismatches += text != answers[(c, t)]
        routed = scrape(router)
    d = delta(counters(prefill_urls), before)
    on_decode = delta(counters(decode_urls), before_decode)["computed"]
    return {"policy": variant.label, "requests": len(ttfts), "hit_rate": d["hits"] / max(d["queries"], 1),
            "prefill_tokens_computed": d["computed"] + on_decode, "decode_tokens_computed": on_decode,
            "local_prefills": metric_sum(routed, "hetero_pd_router_local_prefill_total"),
            "ttft_p50_ms": 1e3 * percentile(ttfts, 50), "ttft_p90_ms": 1e3 * percentile(ttfts, 90),
            "ttft_mean_ms": 1e3 * statistics.fmean(ttfts), "ttfts_ms": [1e3 * t for t in ttfts],
            "mismatches": mismatches, "router_expected_hit_tokens": metric_sum(
                routed, "hetero_pd_router_prefix_hit_tokens_total", role="prefill"),
            "prefills": prefill_calls(routed, prefill_urls)}


def arrival_order(num_conversations: int, turn: int, shuffle: bool) -> list[int]:
    """The order in which a turn's conversations are sent: shuffled (seeded by the turn, so every
    policy sees the same order), as real sessions arrive; in order, a plain rotation such as
    round_robin's keeps conversation ``c`` on prefill ``c mod 2`` by accident."""
    order = list(range(num_conversations))
    if shuffle:
        random.Random(turn).shuffle(order)
    return order


def prefill_calls(routed: dict, prefill_urls: list[str]) -> list[dict[str, float]]:
    """Per prefill, from the router's own histogram: how many prefill calls it got and their mean
    duration, which shows how evenly a policy spread the work (TTFT minus this is the decode's part)."""
    out = []
    for url in prefill_urls:
        count = metric_sum(routed, "hetero_pd_router_prefill_seconds_count", instance=url)
        total = metric_sum(routed, "hetero_pd_router_prefill_seconds_sum", instance=url)
        out.append({"calls": count, "mean_ms": 1e3 * total / count if count else 0.0})
    return out


def prefix_table(rows: list[dict[str, Any]]) -> list[str]:
    """Per policy: every round's figures as "median (min-max)", then kv_aware against least_work per round."""
    def spread(values: list[float], digits: int) -> str:
        return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    policies = list(dict.fromkeys(r["policy"] for r in rows))
    by = {p: [r for r in rows if r["policy"] == p] for p in policies}
    lines = [f"{len(by[policies[0]])} round(s); each cell is the median (min-max) over rounds.", "",
             "| prefill policy | requests | prefix hit rate (prefills) | prompt tokens computed (all instances) "
             "| of them on the decode (local prefills) | TTFT p50 ms | TTFT p90 ms | TTFT mean ms "
             "| prefill calls per instance (mean ms) | outputs != monolithic |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in policies:
        rs = by[p]
        calls = " / ".join(f"{statistics.median(r['prefills'][i]['calls'] for r in rs):.0f} "
                           f"({statistics.median(r['prefills'][i]['mean_ms'] for r in rs):.0f})"
                           for i in range(len(rs[0]["prefills"])))
        lines.append(f"| {p} | {rs[0]['requests']} | {spread([r['hit_rate'] for r in rs], 3)} | "
                     f"{spread([r['prefill_tokens_computed'] for r in rs], 0)} | "
                     f"{spread([r['decode_tokens_computed'] for r in rs], 0)} "
                     f"({statistics.median(r['local_prefills'] for r in rs):.0f}) | "
                     f"{spread([r['ttft_p50_ms'] for r in rs], 1)} | {spread([r['ttft_p90_ms'] for r in rs], 1)} | "
                     f"{spread([r['ttft_mean_ms'] for r in rs], 1)} | {calls} | {sum(r['mismatches'] for r in rs)} |")
    least = {r["round"]: r for r in by.get("least_work", [])}
    for p in policies:
        if not p.startswith("kv_aware") or not least:
            continue
        tokens = [r["prefill_tokens_computed"] / max(least[r["round"]]["prefill_tokens_computed"], 1) for r in by[p]]
        ttft = [r["ttft_p50_ms"] / least[r["round"]]["ttft_p50_ms"] for r in by[p]]
        lines.append(f"\n{p} / least_work, per round: prefill tokens computed {', '.join(f'{x:.3f}' for x in tokens)} "
                     f"(goal <= 0.70); TTFT p50 {', '.join(f'{x:.2f}' for x in ttft)} (goal < 1)")
    return lines


class PrefixVariant(msgspec.Struct, frozen=True):
    """One row of ``bench prefix``: a prefill policy, and kv_aware's two knobs that this workload moves
    (None: a plain policy, which uses neither)."""

    policy: str
    prefix_weight: float | None = None
    min_disagg_tokens: int | None = None

    @property
    def label(self) -> str:
        if self.prefix_weight is None:
            return self.policy
        local = f", min_disagg_tokens {self.min_disagg_tokens}" if self.min_disagg_tokens else ""
        return f"{self.policy} (prefix_weight {self.prefix_weight:g}{local})"


def prefix_variants(args: argparse.Namespace) -> list[PrefixVariant]:
    """The prefill policies to compare, kv_aware once per prefix weight and local-prefill threshold."""
    plain = [PrefixVariant(p) for p in args.policies if p != "kv_aware"]
    if "kv_aware" not in args.policies:
        return plain
    return plain + [PrefixVariant("kv_aware", w, t) for w in args.prefix_weights for t in args.min_disagg_tokens]


def prefix_router_config(prefill_args: list[str], decode_args: list[str], variant: PrefixVariant,
                         model: str) -> RouterConfig:
    """The router of one ``prefix`` row: the variant's policy on the prefills, with its knobs when kv_aware."""
    scoring = ScoringConfig() if variant.prefix_weight is None else ScoringConfig(prefix_weight=variant.prefix_weight)
    return RouterConfig(prefill=PoolConfig(instances=tuple(parse_instance(a) for a in prefill_args),
                                           policy=Policy(variant.policy)),
                        decode=PoolConfig(instances=tuple(parse_instance(a) for a in decode_args)),
                        tokenizer=model, scoring=scoring, min_disagg_tokens=variant.min_disagg_tokens or 0)


def _named(bodies: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    return [{**b, "model": model} for b in bodies]


# ---------------------------------------------------------------------------------------------- decode capacity

LONG_PROMPT_BUCKET = "2000.0"  # vllm:request_prompt_tokens bucket bound between this bench's short and long prompts


def decode_counts(url: str) -> dict[str, float]:
    """What one decode served, from its own metrics: requests, long requests (prompts over 2000 tokens,
    from vLLM's prompt-length histogram) and preemptions."""
    s = scrape(url)
    requests = metric_sum(s, "vllm:request_prompt_tokens_count")
    return {"requests": requests,
            "long": requests - metric_sum(s, "vllm:request_prompt_tokens_bucket", le=LONG_PROMPT_BUCKET),
            "preemptions": metric_sum(s, "vllm:num_preemptions_total")}


def run_decode_capacity(args: argparse.Namespace) -> dict[str, Any]:
    small = ["--num-gpu-blocks-override", str(args.small_kv_blocks), "--max-model-len", str(args.small_max_model_len)]
    specs, router_args = engine_specs(args.model, 1, 2, decode_extra=[small, []])
    long_text, short_text = sample_text(900, 7), sample_text(40, 8)
    rows = []
    with LocalCluster(specs, args.out / "decode-capacity" / "engines") as cluster:
        prefill_args, decode_args = instance_args(cluster, router_args)
        decode_urls = [i.url for i in cluster.by_role("decode")]
        for policy in ("least_work", "kv_aware"):
            before = [decode_counts(u) for u in decode_urls]
            with running_router(prefill_args, decode_args, args.out / "decode-capacity" / f"router-{policy}.log",
                                ("--decode-policy", policy, "--tokenizer", args.model)) as router:
                bodies = [{"model": args.model, "prompt": (short_text if i % 2 else long_text) + f" request {i}.",
                           "max_tokens": 64, "temperature": 0, "ignore_eos": True} for i in range(16)]
                asyncio.run(run_bodies(router, bodies, 8, "/v1/completions"))
            after = [decode_counts(u) for u in decode_urls]
            deltas = [delta(a, b) for a, b in zip(after, before)]
            rows.append({"policy": policy, **{key: [d[key] for d in deltas] for key in deltas[0]}})
    lines = ["| decode policy | requests (small, large) | long requests (small, large) | preemptions (small, large) |",
             "|---|---|---|---|"]
    lines += [f"| {r['policy']} | {_pair(r['requests'])} | {_pair(r['long'])} | {_pair(r['preemptions'])} |"
              for r in rows]
    return {"rows": rows, "table": "\n".join(lines)}


def _pair(values: list[float]) -> str:
    return ", ".join(f"{v:.0f}" for v in values)


# ---------------------------------------------------------------------------------------------- local prefill

def run_local_prefill(args: argparse.Namespace) -> dict[str, Any]:
    specs, router_args = engine_specs(args.model, 1, 1)
    rows = []
    with LocalCluster(specs, args.out / "local-prefill" / "engines") as cluster:
        prefill_args, decode_args = instance_args(cluster, router_args)
        for threshold in [0, *args.thresholds]:
            reset_caches(cluster)
            with running_router(prefill_args, decode_args, args.out / "local-prefill" / f"router-{threshold}.log",
                                ("--prefill-policy", "kv_aware", "--tokenizer", args.model,
                                 "--min-disagg-tokens", str(threshold))) as router:
                bodies = [{"model": args.model, "prompt": sample_text(6 if i % 2 else 200, 3000 + i),
                           "max_tokens": 8, "temperature": 0} for i in range(40)]
                results = asyncio.run(run_bodies(router, bodies, 0, "/v1/completions", args.interval_ms / 1e3))
                routed = scrape(router)
            short = [t for i, (_, t) in enumerate(results) if i % 2]
            long = [t for i, (_, t) in enumerate(results) if i % 2 == 0]
            rows.append({"min_disagg_tokens": threshold, "short_ttft_p50_ms": 1e3 * percentile(short, 50),
                         "long_ttft_p50_ms": 1e3 * percentile(long, 50),
                         "local": metric_sum(routed, "hetero_pd_router_local_prefill_total", reason="short_prompt")})
    lines = ["| min_disagg_tokens | short TTFT p50 ms | long TTFT p50 ms | prefilled locally |", "|---|---|---|---|"]
    lines += [f"| {r['min_disagg_tokens']} | {r['short_ttft_p50_ms']:.1f} | {r['long_ttft_p50_ms']:.1f} | "
              f"{r['local']:.0f} |" for r in rows]
    return {"rows": rows, "table": "\n".join(lines)}
