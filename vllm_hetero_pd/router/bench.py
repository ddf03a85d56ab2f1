"""Router overhead benchmark: the same P/D requests sent directly and through the router, one run.

Baseline ("direct"): the client does the P/D hand-off itself, prefill with ``max_tokens=1`` and
then decode with prefill's ``kv_transfer_params``, exactly the two calls the router makes. The
router path sends one request to ``vllm-hetero-pd proxy``. The difference is what the router adds.
Backends are fake vLLM instances (``testing.fake_backend``) that answer at once, so the numbers
isolate the router's own cost. Processes: fakes in one, the router (its real CLI) in another, the load
generator here, each on uvloop when installed.

* latency: requests one at a time, alternating direct/router, p50 and p99 of each and the added
  milliseconds;
* throughput: ``--repeat`` rounds (default 3) of a closed loop at ``--concurrency`` for
  ``--requests`` requests per path, direct and routed back to back, which one first alternating
  by round (so a drift of the host's speed does not always favour one path); req/s of each, and
  the ratio per round, reported as its mean and range;
* router CPU per request: the router process's user+system CPU time (``/proc``, so Linux only)
  over each routed throughput loop, divided by its requests. On a shared machine req/s depends on
  what else runs; CPU per request does much less, and ``1e6 / cpu_us`` is the req/s one core
  could route;
* the others' CPU per request (this load generator and the fake instances), direct and routed,
  and the "CPU-bound ratio" they predict: direct CPU per request over routed CPU per request
  (the others' plus the router's). On a host where the cores are the only limit this is the
  req/s ratio; the router's own cost cannot be told from its share of the cores any other way;
* the load average before and after, and a result marked noisy when it was above 1.5 before;
* the goal of issue 13, per mode: at most 1 ms added at p50 and a mean of at least 0.8x direct
  req/s over the rounds, all from this run (``ModeResult.meets_goal``).

Run: ``python -m vllm_hetero_pd.router.bench`` (or as the ``router`` part of ``vllm-hetero-pd bench``).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
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
QUIET_LOAD = 1.5  # load average above which, before a run, its figures are noise on this 2-core host
RELAYS = ("router", "bare-aiohttp", "bare-httptools")


class ModeResult(msgspec.Struct, frozen=True, kw_only=True):
    stream: bool
    direct_p50_ms: float
    direct_p99_ms: float
    router_p50_ms: float
    router_p99_ms: float
    direct_req_per_s: tuple[float, ...]  # one per throughput round
    router_req_per_s: tuple[float, ...]
    router_cpu_us_per_req: tuple[float, ...]
    # CPU of everything else (this load generator and the fake instances) per request, per round
    direct_others_cpu_us_per_req: tuple[float, ...]
    routed_others_cpu_us_per_req: tuple[float, ...]

    @property
    def added_p50_ms(self) -> float:
        return self.router_p50_ms - self.direct_p50_ms

    @property
    def added_p99_ms(self) -> float:
        return self.router_p99_ms - self.direct_p99_ms

    @property
    def ratios(self) -> tuple[float, ...]:
        """Routed req/s over direct req/s of each round, the two loops back to back."""
        return tuple(r / d for r, d in zip(self.router_req_per_s, self.direct_req_per_s))

    @property
    def throughput_ratio(self) -> float:
        """The mean of the rounds' ratios (issue 13's second goal)."""
        return statistics.fmean(self.ratios)

    @property
    def cpu_bound_ratio(self) -> float:
        """The mean ratio the CPU times predict if the host's cores were the only limit: the direct
        path's CPU per request over the routed path's (the others' plus the router's)."""
        return statistics.fmean(d / (o + r) for d, o, r in zip(
            self.direct_others_cpu_us_per_req, self.routed_others_cpu_us_per_req, self.router_cpu_us_per_req))

    @property
    def meets_goal(self) -> bool:
        """Issue 13's goal: at most ``GOAL_ADDED_P50_MS`` added at p50, at least ``GOAL_THROUGHPUT_RATIO`` of direct."""
        return self.added_p50_ms <= GOAL_ADDED_P50_MS and self.throughput_ratio >= GOAL_THROUGHPUT_RATIO


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--latency-requests", type=int, default=1000, help="sequential requests per path and mode")
    parser.add_argument("--requests", type=int, default=4000, help="requests per path and mode in the throughput loop")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="throughput rounds per mode (direct and routed each)")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens per answer (SSE events when streaming)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--router-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for the router, e.g. --router-arg=--prefill-policy=kv_aware (repeatable)")
    parser.add_argument("--relay", choices=RELAYS, default="router",
                        help="what serves the routed path: our router, or a bare relay of its two calls on aiohttp's "
                             "server or on httptools (testing/bare_relay.py), to price the server apart")


def run(args: argparse.Namespace) -> int:
    if args.repeat < 1:
        raise SystemExit("error: --repeat must be at least 1")
    if args.router_arg and args.relay != "router":
        raise SystemExit(f"error: --router-arg configures our router; --relay {args.relay} takes none")
    _use_uvloop()
    load_before = os.getloadavg()[0]
    prefill_port, decode_port, router_port = free_ports(3)
    fakes = multiprocessing.get_context("spawn").Process(target=_serve_fakes, args=(prefill_port, decode_port),
                                                         daemon=True)
    fakes.start()
    router = subprocess.Popen(_relay_command(args, prefill_port, decode_port, router_port))
    try:
        results = asyncio.run(_measure(args, prefill_port, decode_port, router_port, router.pid, fakes.pid))
    finally:
        router.terminate()
        fakes.terminate()
        router.wait(timeout=10)
        fakes.join(timeout=10)
    load_after = os.getloadavg()[0]
    _print_table(results, args, load_before, load_after)
    if args.json:
        with open(args.json, "wb") as f:
            f.write(msgspec.json.format(msgspec.json.encode(
                [{**msgspec.structs.asdict(r), "added_p50_ms": r.added_p50_ms, "added_p99_ms": r.added_p99_ms,
                  "ratios": r.ratios, "throughput_ratio": r.throughput_ratio, "cpu_bound_ratio": r.cpu_bound_ratio,
                  "meets_goal": r.meets_goal,
                  "load_average": {"start": load_before, "end": load_after}, "noisy": load_before > QUIET_LOAD}
                 for r in results])))
    return 0


def _relay_command(args: argparse.Namespace, prefill_port: int, decode_port: int, router_port: int) -> list[str]:
    urls = ["--prefill", f"http://127.0.0.1:{prefill_port}", "--decode", f"http://127.0.0.1:{decode_port}"]
    if args.relay == "router":
        return [sys.executable, "-m", "vllm_hetero_pd.cli", "proxy", "--port", str(router_port), "--log-level",
                "WARNING", *urls, *args.router_arg]
    return [sys.executable, "-m", "vllm_hetero_pd.testing.bare_relay", "--server", args.relay.removeprefix("bare-"),
            "--port", str(router_port), *urls]


async def _measure(args: argparse.Namespace, prefill_port: int, decode_port: int, router_port: int,
                   router_pid: int, fakes_pid: int) -> list[ModeResult]:
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
            rounds = await _throughput_rounds(direct, routed, body, args, router_pid, fakes_pid)
            results.append(ModeResult(
                stream=stream, direct_p50_ms=_percentile(direct_ms, 50), direct_p99_ms=_percentile(direct_ms, 99),
                router_p50_ms=_percentile(router_ms, 50), router_p99_ms=_percentile(router_ms, 99), **rounds))
        return results


async def _throughput_rounds(direct, routed, body: dict[str, Any], args: argparse.Namespace, router_pid: int,
                             fakes_pid: int) -> dict[str, tuple[float, ...]]:
    """``--repeat`` rounds of both closed loops, which path runs first alternating by round: per
    round, each path's req/s, the router's CPU µs per routed request and the others' (this load
    generator's and the fake instances') CPU µs per request on each path, as ``ModeResult`` fields."""
    columns: dict[str, list[float]] = {name: [] for name in (
        "direct_req_per_s", "router_req_per_s", "router_cpu_us_per_req", "direct_others_cpu_us_per_req",
        "routed_others_cpu_us_per_req")}

    def others_s() -> float:
        return time.process_time() + _cpu_seconds(fakes_pid)

    async def direct_round() -> None:
        others_before_s = others_s()
        columns["direct_req_per_s"].append(await _throughput(direct, body, args.requests, args.concurrency))
        columns["direct_others_cpu_us_per_req"].append((others_s() - others_before_s) / args.requests * 1e6)

    async def routed_round() -> None:
        router_before_s, others_before_s = _cpu_seconds(router_pid), others_s()
        columns["router_req_per_s"].append(await _throughput(routed, body, args.requests, args.concurrency))
        columns["router_cpu_us_per_req"].append((_cpu_seconds(router_pid) - router_before_s) / args.requests * 1e6)
        columns["routed_others_cpu_us_per_req"].append((others_s() - others_before_s) / args.requests * 1e6)

    for number in range(args.repeat):
        for step in (direct_round, routed_round) if number % 2 == 0 else (routed_round, direct_round):
            await step()
    return {name: tuple(values) for name, values in columns.items()}


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


def _print_table(results: list[ModeResult], args: argparse.Namespace, load_before: float, load_after: float) -> None:
    print(f"{args.relay} overhead vs direct P->D calls (fake instances, {args.max_tokens} tokens, "
          f"router args {' '.join(args.router_arg) or 'none'}, latency: {args.latency_requests} sequential "
          f"requests each, throughput: {args.repeat} round(s) of {args.requests} requests per path at concurrency "
          f"{args.concurrency}; req/s and CPU cells are the mean (min-max) over rounds)")
    print("| mode | direct p50 ms | router p50 ms | added p50 ms | direct p99 ms | router p99 ms | added p99 ms "
          "| direct req/s | router req/s | router/direct req/s | router CPU µs/req "
          "| client + instances CPU µs/req, direct / routed | CPU-bound ratio | goal met |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {'streaming' if r.stream else 'non-streaming'} | {r.direct_p50_ms:.3f} | {r.router_p50_ms:.3f} "
              f"| {r.added_p50_ms:.3f} | {r.direct_p99_ms:.3f} | {r.router_p99_ms:.3f} | {r.added_p99_ms:.3f} "
              f"| {spread(r.direct_req_per_s, 0)} | {spread(r.router_req_per_s, 0)} | {spread(r.ratios, 2)} "
              f"| {spread(r.router_cpu_us_per_req, 0)} | {statistics.fmean(r.direct_others_cpu_us_per_req):.0f} / "
              f"{statistics.fmean(r.routed_others_cpu_us_per_req):.0f} | {r.cpu_bound_ratio:.2f} "
              f"| {'yes' if r.meets_goal else 'no'} |")
    print(f"goal: added p50 <= {GOAL_ADDED_P50_MS} ms and mean router/direct req/s >= {GOAL_THROUGHPUT_RATIO}, "
          "all from this run")
    noisy = f" (above {QUIET_LOAD}: the figures are noise, rerun on a quiet host)" if load_before > QUIET_LOAD else ""
    print(f"load average before {load_before:.2f}{noisy}, after {load_after:.2f}")


def spread(values: tuple[float, ...], digits: int) -> str:
    """``mean (min-max)`` of a result's rounds."""
    return f"{statistics.fmean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


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
