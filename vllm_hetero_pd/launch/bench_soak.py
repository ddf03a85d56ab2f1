"""Soak: a random mix of real client requests through the router, with a decode restarted mid-run.

What it counts is loss, not speed. The same requests first run against a monolithic engine (the
reference, at the same concurrency); then against one prefill and two decodes behind the router,
while one decode is stopped and started again on the same ports half-way through. Every answer
must be 200 and equal to the reference, or a clean error; the router's retry and recovery
counters show what it absorbed, and every engine's KV usage must return to 0.

``vllm-hetero-pd bench soak --requests 200 --concurrency 24``
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec

from vllm_hetero_pd.launch.cluster import Instance, LocalCluster
from vllm_hetero_pd.launch.instance import InstanceSpec, hetero_kv_config
from vllm_hetero_pd.launch.router_process import running_router
from vllm_hetero_pd.ports import is_free
from vllm_hetero_pd.testing.client_requests import differences, request_kinds, send
from vllm_hetero_pd.testing.metrics import metric_sum, scrape
from vllm_hetero_pd.testing.prompts import make_prompts
from vllm_hetero_pd.testing.tiny_model import build_tiny_model

Job = tuple[int, str, str, dict[str, Any]]  # (index, kind, endpoint, body)


class SoakResult(msgspec.Struct, frozen=True, kw_only=True):
    requests: int
    concurrency: int
    exact: int
    mismatched: list[str]
    errors: dict[str, int]  # HTTP status (or exception) -> count
    router_retries: float
    router_recoveries: float
    served_by_restarted: float
    kv_usage_after: dict[str, float]
    wall_s: float
    load_before: float
    load_after: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    parser.add_argument("--out", type=Path, default=None, help="write results.json here")


def mix(prompts: list[list[int]], count: int, seed: int) -> list[Job]:
    """``count`` requests drawn from every client request kind (plus plain greedy ones)."""
    kinds = request_kinds(prompts)
    rng = random.Random(seed)
    jobs = []
    for i in range(count):
        name = rng.choice([*kinds, "greedy"])
        if name == "greedy":
            path, body = "/v1/completions", {"prompt": rng.choice(prompts), "max_tokens": 16, "temperature": 0.0,
                                             "ignore_eos": True, "logprobs": 1}
        else:
            path, body = kinds[name]
        jobs.append((i, name, path, body))
    return jobs


def fire(url: str, jobs: list[Job], concurrency: int, midway=None) -> dict[int, tuple[int, Any]]:
    """Send every job at ``concurrency``; start ``midway()`` once a quarter of them have been sent,
    and wait for it before the last quarter, so that those reach the restarted instance too."""
    started, lock, helper = [0], threading.Lock(), []

    def one(job: Job) -> tuple[int, tuple[int, Any]]:
        with lock:
            started[0] += 1
            trigger = midway is not None and started[0] == len(jobs) // 4
            if trigger:
                helper.append(threading.Thread(target=midway, daemon=True))
                helper[0].start()
            last_quarter = started[0] > 3 * len(jobs) // 4
        if last_quarter and helper:
            helper[0].join(300)
        try:
            return job[0], send(url, job[2], job[3])
        except OSError as e:  # connection reset etc.: a lost request, counted as such
            return job[0], (-1, repr(e))

    with ThreadPoolExecutor(concurrency) as pool:
        return dict(pool.map(one, jobs))


def restart(instance: Instance, log_dir: Path, cores: str) -> Instance:
    """Stop ``instance`` and start the same spec again on the same ports; wait until healthy."""
    spec = msgspec.structs.replace(instance.spec, http_port=instance.http_port,
                                   side_channel_port=instance.side_channel_port)
    instance.stop()
    deadline = time.monotonic() + 300
    while not (is_free(spec.http_port) and is_free(spec.side_channel_port)):  # connections still closing
        if time.monotonic() > deadline:
            raise instance.failure("did not release its ports")
        time.sleep(0.5)
    again = Instance(spec, instance.name + "-restarted", log_dir, cores)
    while not again.is_healthy():
        if again.process.poll() is not None or time.monotonic() > deadline:
            raise again.failure("did not come back")
        time.sleep(1)
    return again


def score(jobs: list[Job], reference: dict, got: dict) -> tuple[int, list[str], Counter]:
    exact, mismatched, errors = 0, [], Counter()
    for i, kind, _, _ in jobs:
        ref_status, ref = reference[i]
        status, answer = got[i]
        if status == 200 and isinstance(answer, dict) and answer.get("errors"):
            errors["200 + stream error event"] += 1
        elif status == 200 and ref_status == 200:
            diff = differences(ref, answer)
            exact += not diff
            if diff:
                mismatched.append(f"#{i} {kind}: {diff[:2]}")
        elif status == ref_status:
            exact += 1  # refused by vLLM itself, and refused the same way through P/D
        else:
            errors[str(status)] += 1
    return exact, mismatched, errors


def soak(model: str, jobs: list[Job], concurrency: int, work: Path) -> SoakResult:
    load_before = os.getloadavg()[0]
    with LocalCluster([InstanceSpec(role="monolithic", model=model, block_size=128)], work / "mono") as mono:
        reference = fire(mono.instances[0].url, jobs, concurrency)
    producer = hetero_kv_config("kv_producer", {"lease_s": 10.0, "heartbeat_s": 2.0})
    consumer = hetero_kv_config("kv_consumer")
    specs = [InstanceSpec(role="prefill", model=model, block_size=32, kv_transfer_config=producer),
             InstanceSpec(role="decode", model=model, block_size=128, kv_transfer_config=consumer),
             InstanceSpec(role="decode", model=model, block_size=128, kv_transfer_config=consumer)]
    start = time.monotonic()
    with LocalCluster(specs, work / "pd") as cluster:
        prefill, d1, d2 = cluster.instances
        restarted: list[Instance] = []
        try:
            with running_router([prefill.url], [d1.url, d2.url], work / "router.log") as url:
                got = fire(url, jobs, concurrency, midway=lambda: restarted.append(restart(d2, work / "pd", "0")))
                samples = scrape(url)
            if not restarted:
                raise d2.failure("was not restarted in time")
            served = metric_sum(scrape(restarted[0].url), "vllm:request_success_total")
            time.sleep(12)  # leases of requests whose decode died expire after lease_s
            usage = {i.name: metric_sum(scrape(i.url), "vllm:kv_cache_usage_perc") for i in (prefill, d1, *restarted)}
        finally:
            for instance in restarted:
                instance.stop()
    exact, mismatched, errors = score(jobs, reference, got)
    return SoakResult(requests=len(jobs), concurrency=concurrency, exact=exact, mismatched=mismatched,
                      errors=dict(errors), router_retries=metric_sum(samples, "hetero_pd_router_retries_total"),
                      router_recoveries=metric_sum(samples, "hetero_pd_router_decode_recoveries_total"),
                      served_by_restarted=served,
                      kv_usage_after=usage, wall_s=time.monotonic() - start, load_before=load_before,
                      load_after=os.getloadavg()[0])


def run(args: argparse.Namespace) -> int:
    model = str(build_tiny_model("llama-gqa-d32", "bfloat16"))
    jobs = mix(make_prompts(model), args.requests, args.seed)
    with tempfile.TemporaryDirectory(prefix="hetero-pd-soak-") as tmp:
        result = soak(model, jobs, args.concurrency, Path(args.out or tmp))
    print(msgspec.json.format(msgspec.json.encode(result)).decode())
    if args.out:
        (args.out / "results.json").write_bytes(msgspec.json.encode(result))
    return 0 if not result.mismatched and not result.errors and not any(result.kv_usage_after.values()) else 1
