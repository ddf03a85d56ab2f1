"""Router overhead benchmark: the same P/D requests sent directly and through the router, one run.

Baseline ("direct"): the client does the P/D hand-off itself, prefill with ``max_tokens=1`` and
then decode with prefill's ``kv_transfer_params``, exactly the two calls the router makes. The
router path sends one request to ``vllm-hetero-pd proxy``. The difference is what the router adds.
Backends are fake vLLM instances (``testing.fake_backend``) that answer at once, so the numbers
isolate the router's own cost. Processes: fakes in one, the router (its real CLI) in another, the load
generator here, each on uvloop when installed.

* latency: requests one at a time, alternating direct/router, p50 and p99 of each and the added
  milliseconds;
* throughput: a closed loop at ``--concurrency`` for ``--requests`` requests per mode, req/s of
  each and the ratio;
* router CPU per request: the router process's user+system CPU time (``/proc``, so Linux only)
  over the routed throughput loop, divided by its requests. On a shared machine req/s depends on
  what else runs; CPU per request does much less, and ``1e6 / cpu_us`` is the req/s one core
  could route;
* the goal of issue 13, per mode: at most 1 ms added at p50 and at least 0.8x direct req/s, both
  from this run (``ModeResult.meets_goal``).

Run: ``python -m vllm_hetero_pd.router.bench`` (or as the ``router`` part of ``vllm-hetero-pd bench``).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import subprocess
import sys
import time
from typing import Any

import aiohttp
import msgspec

from vllm_hetero_pd.ports import free_ports
from vllm_hetero_pd.router.protocol import prefill_body

GOAL_ADDED_P50_MS = 1.0
GOAL_THROUGHPUT_RATIO = 0.8


class ModeResult(msgspec.Struct, frozen=True, kw_only=True):
    stream: bool
    direct_p50_ms: float
    direct_p99_ms: float
    router_p50_ms: float
    router_p99_ms: float
    direct_req_per_s: float
    router_req_per_s: float
    router_cpu_us_per_req: float

    @property
    def added_p50_ms(self) -> float:
        return self.router_p50_ms - self.direct_p50_ms

    @property
    def added_p99_ms(self) -> float:
        return self.router_p99_ms - self.direct_p99_ms

    @property
    def throughput_ratio(self) -> float:
        """Routed req/s over direct req/s, measured back to back in this run (issue 13's second goal)."""
        return self.router_req_per_s / self.direct_req_per_s

    @property
    def meets_goal(self) -> bool:
        """Issue 13's goal: at most ``GOAL_ADDED_P50_MS`` added at p50, at least ``GOAL_THROUGHPUT_RATIO`` of direct."""
        return self.added_p50_ms <= GOAL_ADDED_P50_MS and self.throughput_ratio >= GOAL_THROUGHPUT_RATIO


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--latency-requests", type=int, default=1000, help="sequential requests per path and mode")
    parser.add_argument("--requests", type=int, default=4000, help="requests per path and mode in the throughput loop")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens per answer (SSE events when streaming)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--router-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for the router, e.g. --router-arg=--prefill-policy=kv_aware (repeatable)")


def run(args: argparse.Namespace) -> int:
    _use_uvloop()
    prefill_port, decode_port, router_port = free_ports(3)
    fakes = multiprocessing.get_context("spawn").Process(target=_serve_fakes, args=(prefill_port, decode_port),
                                                         daemon=True)
    fakes.start()
    router = subprocess.Popen(
        [sys.executable, "-m", "vllm_hetero_pd.cli", "proxy", "--port", str(router_port), "--log-level", "WARNING",
         "--prefill", f"http://127.0.0.1:{prefill_port}", "--decode", f"http://127.0.0.1:{decode_port}",
         *args.router_arg])
    try:
        results = asyncio.run(_measure(args, prefill_port, decode_port, router_port, router.pid))
    finally:
        router.terminate()
        fakes.terminate()
        router.wait(timeout=10)
        fakes.join(timeout=10)
    _print_table(results, args)
    if args.json:
        with open(args.json, "wb") as f:
            f.write(msgspec.json.format(msgspec.json.encode(
                [{**msgspec.structs.asdict(r), "added_p50_ms": r.added_p50_ms, "added_p99_ms": r.added_p99_ms,
                  "throughput_ratio": r.throughput_ratio, "meets_goal": r.meets_goal} for r in results])))
    return 0


async def _measure(args: argparse.Namespace, prefill_port: int, decode_port: int, router_port: int,
                   router_pid: int) -> list[ModeResult]:
    prefill_url, decode_url = f"http://127.0.0.1:{prefill_port}", f"http://127.0.0.1:{decode_port}"
    router_url = f"http://127.0.0.1:{router_port}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for url in (prefill_url, decode_url, router_url):
            await _wait_ready(session, url)

        async def direct(body: dict[str, Any]) -> None:
            async with session.post(prefill_url + "/v1/completions", json=prefill_body(body)) as response:
                params = (await response.json())["kv_transfer_params"]
            await _expect_ok(session, decode_url, {**body, "kv_transfer_params": params})

        async def routed(body: dict[str, Any]) -> None:
            await _expect_ok(session, router_url, body)

        results = []
        for stream in (False, True):
            body = {"prompt": "The quick brown fox " * 8, "max_tokens": args.max_tokens, "stream": stream}
            if stream:
                body["stream_options"] = {"include_usage": True}
            for _ in range(50):  # warm up connections and code paths
                await direct(body)
                await routed(body)
            direct_ms, router_ms = [], []
            for _ in range(args.latency_requests):
                direct_ms.append(await _time_ms(direct(body)))
                router_ms.append(await _time_ms(routed(body)))
            direct_rps = await _throughput(direct, body, args.requests, args.concurrency)
            cpu_before_s = _cpu_seconds(router_pid)
            router_rps = await _throughput(routed, body, args.requests, args.concurrency)
            cpu_us = (_cpu_seconds(router_pid) - cpu_before_s) / args.requests * 1e6
            results.append(ModeResult(
                stream=stream, direct_p50_ms=_percentile(direct_ms, 50), direct_p99_ms=_percentile(direct_ms, 99),
                router_p50_ms=_percentile(router_ms, 50), router_p99_ms=_percentile(router_ms, 99),
                direct_req_per_s=direct_rps, router_req_per_s=router_rps, router_cpu_us_per_req=cpu_us))
        return results


async def _expect_ok(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> None:
    """POST and read the whole answer; a benchmark of failing requests would measure nothing."""
    async with session.post(url + "/v1/completions", json=body) as response:
        raw = await response.read()
        if response.status != 200 or (body["stream"] and not raw.endswith(b"data: [DONE]\n\n")):
            raise RuntimeError(f"{url} answered HTTP {response.status}: {raw[-300:]!r}")


async def _time_ms(call) -> float:
    start = time.perf_counter()
    await call
    return (time.perf_counter() - start) * 1e3


async def _throughput(call, body: dict[str, Any], num_requests: int, concurrency: int) -> float:
    remaining = iter(range(num_requests))

    async def worker() -> None:
        for _ in remaining:
            await call(body)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return num_requests / (time.perf_counter() - start)


async def _wait_ready(session: aiohttp.ClientSession, url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            async with session.get(url + "/health") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not become healthy within {timeout_s} s")
        await asyncio.sleep(0.1)


def _cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of a process so far (fields 14 and 15 of /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _print_table(results: list[ModeResult], args: argparse.Namespace) -> None:
    print(f"router overhead vs direct P->D calls (fake instances, {args.max_tokens} tokens, "
          f"router args {' '.join(args.router_arg) or 'none'}, load average {os.getloadavg()[0]:.1f}, "
          f"latency: {args.latency_requests} sequential requests each, throughput: {args.requests} requests "
          f"at concurrency {args.concurrency})")
    print("| mode | direct p50 ms | router p50 ms | added p50 ms | direct p99 ms | router p99 ms | added p99 ms "
          "| direct req/s | router req/s | router/direct req/s | router CPU µs/req | goal met |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {'streaming' if r.stream else 'non-streaming'} | {r.direct_p50_ms:.3f} | {r.router_p50_ms:.3f} "
              f"| {r.added_p50_ms:.3f} | {r.direct_p99_ms:.3f} | {r.router_p99_ms:.3f} | {r.added_p99_ms:.3f} "
              f"| {r.direct_req_per_s:.0f} | {r.router_req_per_s:.0f} | {r.throughput_ratio:.2f} "
              f"| {r.router_cpu_us_per_req:.0f} | {'yes' if r.meets_goal else 'no'} |")
    print(f"goal: added p50 <= {GOAL_ADDED_P50_MS} ms and router/direct req/s >= {GOAL_THROUGHPUT_RATIO}, "
          "both from this run")


def _serve_fakes(prefill_port: int, decode_port: int) -> None:
    from vllm_hetero_pd.testing.fake_backend import FakeVllm

    async def serve() -> None:
        prefill = FakeVllm("prefill", record=False)
        await prefill.start(prefill_port)
        decode = FakeVllm("decode", prefill_engine_ids=frozenset({prefill.engine_id}), record=False)
        await decode.start(decode_port)
        await asyncio.Event().wait()

    _use_uvloop()
    asyncio.run(serve())


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
