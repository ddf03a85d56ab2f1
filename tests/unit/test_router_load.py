"""Load test: 500 requests at concurrency 64 through the router; one instance dies midway.

Pass criteria: no request is lost (each one completes with the right answer or ends in a clean
error, all within the per-request timeout), and the router's Prometheus counters add up to what
the client saw.
"""

import asyncio
import random

import aiohttp
import msgspec
import pytest
from test_router_http import metric, metrics_text, run_async

from vllm_hetero_pd.router.config import HealthConfig, TimeoutConfig
from vllm_hetero_pd.testing.fake_backend import FakeCluster, output_tokens

NUM_REQUESTS = 500
CONCURRENCY = 64
REQUEST_TIMEOUT_S = 15.0


def make_request(i: int) -> tuple[str, dict]:
    rng = random.Random(i)
    stream = rng.random() < 0.5
    if rng.random() < 0.5:
        body = {"prompt": f"request {i} " + "x" * rng.randrange(10, 400), "max_tokens": rng.randrange(1, 12)}
        path = "/v1/completions"
    else:
        body = {"messages": [{"role": "user", "content": f"request {i}"}], "max_tokens": rng.randrange(1, 12)}
        path = "/v1/chat/completions"
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return path, body


def classify(path: str, body: dict, status: int, raw: bytes) -> str:
    """'ok' for a complete correct answer, 'error' for a clean error; anything else fails the test."""
    expected = output_tokens(body)
    chat = path.endswith("chat/completions")
    if status != 200:
        assert status in (502, 503), (status, raw)
        assert msgspec.json.decode(raw)["error"]["message"]
        return "error"
    if not body.get("stream"):
        choice = msgspec.json.decode(raw)["choices"][0]
        assert (choice["message"]["content"] if chat else choice["text"]) == "".join(expected)
        return "ok"
    assert raw.endswith(b"\n\n"), raw[-80:]
    events = [block[len(b"data: "):] for block in raw.split(b"\n\n")[:-1]]
    done = events[-1] == b"[DONE]"
    decoded = [msgspec.json.decode(e) for e in (events[:-1] if done else events)]
    tokens = [c["delta"].get("content", "") if chat else c["text"] for e in decoded for c in e.get("choices", [])]
    if done:
        assert "".join(tokens) == "".join(expected)
        return "ok"
    assert "error" in decoded[-1], decoded[-1]
    assert "".join(expected).startswith("".join(tokens))  # what arrived before the error was right
    return "error"


@pytest.mark.parametrize("victim_role", ["prefill", "decode"])
@run_async
async def test_500_requests_at_concurrency_64_with_an_instance_killed_midway(victim_role):
    options = dict(
        prefill_weights=(1.0, 1.0), decode_weights=(1.0, 1.0), token_interval_s=0.005, record=False,
        timeouts=TimeoutConfig(connect_s=1.0, prefill_s=5.0, decode_first_byte_s=5.0, decode_idle_s=2.0,
                               decode_total_s=10.0),
        health=HealthConfig(interval_s=0.2, timeout_s=0.5, max_failures=2),
    )
    async with FakeCluster(**options) as cluster:
        victim = (cluster.prefill if victim_role == "prefill" else cluster.decode)[0]
        semaphore = asyncio.Semaphore(CONCURRENCY)
        outcomes: list[str] = []
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)

        async def one(i: int) -> None:
            async with semaphore:
                if i == NUM_REQUESTS // 2:
                    await victim.stop()
                path, body = make_request(i)
                async with cluster.session.post(cluster.url + path, json=body, timeout=timeout) as response:
                    outcomes.append(classify(path, body, response.status, await response.read()))

        await asyncio.gather(*(one(i) for i in range(NUM_REQUESTS)))
        assert len(outcomes) == NUM_REQUESTS  # nothing lost, nothing timed out (a timeout raises)
        assert victim.num_requests > 0  # the victim did take traffic before it died
        num_ok, num_error = outcomes.count("ok"), outcomes.count("error")
        # a dead prefill costs retries only; a dead decode can break streams that already started
        assert num_ok >= NUM_REQUESTS - CONCURRENCY and (victim_role == "decode" or num_error == 0)

        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_requests_total", outcome="ok") == num_ok
        assert metric(text, "hetero_pd_router_requests_total", outcome="error") == num_error
        assert metric(text, "hetero_pd_router_errors_total") == num_error
        assert metric(text, "hetero_pd_router_errors_total", cause="stream_interrupted") == num_error
        assert metric(text, "hetero_pd_router_in_flight") == 0
        assert metric(text, "hetero_pd_router_ejections_total", role=victim_role) == 1
        assert metric(text, "hetero_pd_router_instance_healthy", instance=victim.url) == 0
        assert metric(text, f"hetero_pd_router_{victim_role}_seconds_count", instance=victim.url) > 0
        # a dead prefill's calls are always retried; a dead decode may be ejected on streams broken
        # after their first byte (never retried) before any request is sent to it again
        assert metric(text, "hetero_pd_router_retries_total", role=victim_role) >= (victim_role == "prefill")
        assert metric(text, "hetero_pd_router_decode_seconds_count") == num_ok
        print(f"\n{victim_role} killed: {num_ok} ok, {num_error} clean errors, retries "
              f"{metric(text, 'hetero_pd_router_retries_total', role=victim_role):.0f}")
