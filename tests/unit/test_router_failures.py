"""Every retry and fallback path of the router, over real HTTP against fake vLLM servers.

Instances are "killed" by closing their server (connection refused afterwards), and faults are
injected through ``FakeVllm.faults``. Deadlines are generous by default, so that a slow, loaded host
never turns a healthy answer into a timeout; a test of one deadline shortens only that one and
delays the fake ten times longer, then checks that the router did not wait the delay out.
"""

import asyncio
import time

import msgspec
from test_router_http import COMPLETION, metric, metrics_text, post, run_async, sse_events

from vllm_hetero_pd.router.config import HealthConfig, Policy, TimeoutConfig
from vllm_hetero_pd.testing.fake_backend import FakeCluster, output_tokens

# Probes run every 30 s, i.e. not during a test: ejection is driven by request failures alone,
# so counts are exact. Tests of re-admission pass PROBING.
GENEROUS = TimeoutConfig(connect_s=5.0, prefill_s=10.0, decode_first_byte_s=10.0, decode_idle_s=10.0,
                         decode_total_s=30.0)
FAST = dict(timeouts=GENEROUS, health=HealthConfig(interval_s=30, timeout_s=2.0, max_failures=2))
PROBING = HealthConfig(interval_s=0.05, timeout_s=2.0, max_failures=2)
SHORT_S = 0.5  # the one deadline a test exercises
DELAY_S = 5.0  # how long the fake then stalls: the router must give up long before


def short(*names: str) -> TimeoutConfig:
    """The generous deadlines with the ones named cut to SHORT_S."""
    return msgspec.structs.replace(GENEROUS, **dict.fromkeys(names, SHORT_S))
STREAM = {**COMPLETION, "stream": True, "stream_options": {"include_usage": True}}


def rr_cluster(num_prefill=1, num_decode=1, **options) -> FakeCluster:
    """Round robin everywhere, so which instance a request tries first is known."""
    return FakeCluster(prefill_weights=(1.0,) * num_prefill, decode_weights=(1.0,) * num_decode,
                       prefill_policy=Policy.ROUND_ROBIN, decode_policy=Policy.ROUND_ROBIN, **{**FAST, **options})


def ok_text(raw: bytes) -> str:
    return msgspec.json.decode(raw)["choices"][0]["text"]


@run_async
async def test_failed_prefill_is_retried_on_another_prefill_instance():
    async with rr_cluster(num_prefill=2) as cluster:
        cluster.prefill[0].faults.fail_count = 1
        status, _, raw = await post(cluster, "/v1/completions", COMPLETION)
        assert status == 200 and ok_text(raw) == "".join(output_tokens(COMPLETION))
        assert [f.num_requests for f in cluster.prefill] == [1, 1]
        assert cluster.decode[0].received[0].body["kv_transfer_params"]["remote_engine_id"] == "prefill-1"
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_retries_total", role="prefill") == 1
        assert metric(text, "hetero_pd_router_requests_total", outcome="ok") == 1


@run_async
async def test_prefill_without_kv_transfer_params_or_too_slow_counts_as_a_failure():
    async with rr_cluster(num_prefill=3, timeouts=short("prefill_s")) as cluster:
        cluster.prefill[0].faults.omit_kv_params = True
        cluster.prefill[1].faults.delay_s = DELAY_S
        start = time.perf_counter()
        status, _, _ = await post(cluster, "/v1/completions", COMPLETION)
        assert status == 200 and time.perf_counter() - start < DELAY_S
        assert cluster.decode[0].received[0].body["kv_transfer_params"]["remote_engine_id"] == "prefill-2"


@run_async
async def test_prefill_instance_killed_is_ejected_then_readmitted_when_it_answers_again():
    async with rr_cluster(num_prefill=2, health=PROBING) as cluster:
        victim = cluster.prefill[0]
        await victim.stop()
        for _ in range(4):
            assert (await post(cluster, "/v1/completions", COMPLETION))[0] == 200
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_ejections_total", role="prefill") == 1
        assert metric(text, "hetero_pd_router_instance_healthy", instance=victim.url) == 0
        await victim.start(victim.port)  # same port: the router only knows configured addresses
        await asyncio.sleep(0.3)  # a few probe intervals
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_readmissions_total", role="prefill") == 1
        for _ in range(4):
            assert (await post(cluster, "/v1/completions", COMPLETION))[0] == 200
        assert victim.num_requests == 2


@run_async
async def test_an_instance_whose_health_passes_but_requests_fail_is_still_ejected():
    async with rr_cluster(num_decode=2, health=PROBING) as cluster:
        cluster.decode[0].faults.fail_count = 100
        assert (await post(cluster, "/v1/completions", COMPLETION))[0] == 200
        await asyncio.sleep(0.15)  # passing probes in between do not wipe out the failure
        assert (await post(cluster, "/v1/completions", COMPLETION))[0] == 200
        instance = cluster.router.router.decode.instances[0]
        assert instance.ejected or instance.num_ejections_in_row == 1
        for _ in range(8):  # re-admitted on probation at most: each return costs one retried attempt
            assert (await post(cluster, "/v1/completions", COMPLETION))[0] == 200
            await asyncio.sleep(0.02)
        assert cluster.decode[0].num_requests < 6
        assert cluster.decode[1].num_requests == 10


@run_async
async def test_every_prefill_down_falls_back_to_local_prefill_when_allowed():
    async with rr_cluster(num_prefill=2, allow_local_prefill=True) as cluster:
        for fake in cluster.prefill:
            fake.faults.fail_count = 100
        status, _, raw = await post(cluster, "/v1/completions", STREAM)
        assert status == 200 and sse_events(raw)[-1] == "[DONE]"
        assert "kv_transfer_params" not in cluster.decode[0].received[0].body
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_local_prefill_total", reason="prefill_failed") == 1
        for fake in cluster.prefill:
            await fake.stop()
        for _ in range(4):  # both get ejected, then requests skip prefill without trying it
            assert (await post(cluster, "/v1/completions", COMPLETION))[0] == 200
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_local_prefill_total", reason="no_prefill_instance") >= 1


@run_async
async def test_every_prefill_down_is_a_clean_error_when_fallback_is_off():
    async with rr_cluster(num_prefill=2, local_prefill_fallback=False) as cluster:
        for fake in cluster.prefill:
            fake.faults.fail_count = 2
        status, request_id, raw = await post(cluster, "/v1/completions", COMPLETION)
        assert status == 502 and request_id
        message = msgspec.json.decode(raw)["error"]["message"]
        assert message.startswith("prefill failed") and "HTTP 500" in message
        assert cluster.decode[0].num_requests == 0
        assert (await post(cluster, "/v1/completions", COMPLETION))[0] == 502  # 2nd failure each: ejected
        status, _, raw = await post(cluster, "/v1/completions", COMPLETION)
        assert status == 503 and b"no prefill instance is available" in raw
        async with cluster.session.get(cluster.url + "/health") as response:
            assert response.status == 503
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_errors_total", cause="prefill_failed") == 2
        assert metric(text, "hetero_pd_router_errors_total", cause="no_prefill_instance") == 1


@run_async
async def test_decode_5xx_is_retried_on_another_decode_with_a_fresh_prefill():
    async with rr_cluster(num_decode=2) as cluster:
        cluster.decode[0].faults.fail_count = 1
        status, _, raw = await post(cluster, "/v1/completions", COMPLETION)
        assert status == 200 and ok_text(raw) == "".join(output_tokens(COMPLETION))
        # the failed decode got the request, so it may have consumed the prefilled blocks: prefill again
        assert cluster.prefill[0].num_requests == 2
        assert [f.num_requests for f in cluster.decode] == [1, 1]
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_retries_total", role="decode") == 1
        assert metric(text, "hetero_pd_router_decode_recoveries_total", action="other_decode_fresh_prefill") == 1


@run_async
async def test_unreachable_decode_is_retried_reusing_the_prefill():
    async with rr_cluster(num_decode=2) as cluster:
        await cluster.decode[0].stop()  # never connected: connection refused
        status, _, _ = await post(cluster, "/v1/completions", COMPLETION)
        assert status == 200
        assert cluster.prefill[0].num_requests == 1  # the blocks were never read, reuse them
        assert cluster.decode[1].num_requests == 1
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_decode_recoveries_total", action="other_decode_same_params") == 1


@run_async
async def test_streaming_decode_that_errors_before_the_first_token_is_retried():
    async with rr_cluster(num_decode=2) as cluster:
        cluster.decode[0].faults.error_event_first = True  # vLLM-style: HTTP 200, error as first event
        status, _, raw = await post(cluster, "/v1/completions", STREAM)
        events = sse_events(raw)
        assert status == 200 and events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
        assert "".join(e["choices"][0]["text"] for e in events[:-2]) == "".join(output_tokens(STREAM))
        assert [f.num_requests for f in cluster.decode] == [1, 1] and cluster.prefill[0].num_requests == 2


@run_async
async def test_slow_first_byte_is_retried_and_nothing_hangs():
    async with rr_cluster(num_decode=2, timeouts=short("decode_first_byte_s")) as cluster:
        cluster.decode[0].faults.delay_s = DELAY_S
        start = time.perf_counter()
        status, _, raw = await post(cluster, "/v1/completions", STREAM)
        assert status == 200 and sse_events(raw)[-1] == "[DONE]"
        assert time.perf_counter() - start < DELAY_S


@run_async
async def test_stream_broken_after_the_first_byte_ends_with_an_sse_error_event():
    async with rr_cluster() as cluster:
        cluster.decode[0].faults.break_after_events = 2
        status, _, raw = await post(cluster, "/v1/completions", STREAM)
        assert status == 200  # the status was sent with the first event
        events = sse_events(raw)
        assert [e["choices"][0]["text"] for e in events[:2]] == output_tokens(STREAM)[:2]
        assert "[DONE]" not in events
        assert events[-1]["error"]["code"] == 502 and "stream broke" in events[-1]["error"]["message"]
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_errors_total", cause="stream_interrupted") == 1
        assert metric(text, "hetero_pd_router_requests_total", outcome="error") == 1


@run_async
async def test_every_decode_failing_is_a_clean_502_naming_each_instance():
    async with rr_cluster(num_decode=2) as cluster:
        for fake in cluster.decode:
            fake.faults.fail_count = 100
        status, _, raw = await post(cluster, "/v1/completions", STREAM)
        message = msgspec.json.decode(raw)["error"]["message"]
        assert status == 502 and all(f.url in message for f in cluster.decode)
        # decode-0, decode-1, then decode-1 again after a fresh prefill, then decode-1 prefilling locally
        assert [f.num_requests for f in cluster.decode] == [1, 3] and cluster.prefill[0].num_requests == 3
        assert "same_decode_fresh_prefill: " in message and "local_prefill: " in message
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_errors_total", cause="decode_failed") == 1
        assert metric(text, "hetero_pd_router_in_flight") == 0


@run_async
async def test_a_lone_decode_that_fails_to_load_the_kv_is_retried_once_with_a_fresh_prefill():
    async with rr_cluster() as cluster:
        cluster.decode[0].faults.fail_kv_loads = 1  # vLLM's generic HTTP 500 for a failed KV load
        status, _, raw = await post(cluster, "/v1/completions", COMPLETION)
        assert status == 200 and ok_text(raw) == "".join(output_tokens(COMPLETION))
        assert cluster.prefill[0].num_requests == 2
        first, second = (r.body["kv_transfer_params"] for r in cluster.decode[0].received)
        assert first["lease_token"] != second["lease_token"]  # fresh params, not the consumed ones
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_decode_recoveries_total", action="same_decode_fresh_prefill") == 1
        assert metric(text, "hetero_pd_router_retries_total", role="decode") == 0
        assert metric(text, "hetero_pd_router_requests_total", outcome="ok") == 1


@run_async
async def test_when_the_fresh_prefill_fails_too_the_decode_prefills_locally():
    async with rr_cluster(allow_local_prefill=True) as cluster:
        cluster.decode[0].faults.fail_kv_loads = 2  # streamed: an error event first, under HTTP 200
        status, _, raw = await post(cluster, "/v1/completions", STREAM)
        events = sse_events(raw)
        assert status == 200 and events[-1] == "[DONE]"
        assert "".join(e["choices"][0]["text"] for e in events[:-2]) == "".join(output_tokens(STREAM))
        assert ["kv_transfer_params" in r.body for r in cluster.decode[0].received] == [True, True, False]
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_decode_recoveries_total", action="same_decode_fresh_prefill") == 1
        assert metric(text, "hetero_pd_router_decode_recoveries_total", action="local_prefill") == 1
        assert metric(text, "hetero_pd_router_local_prefill_total", reason="decode_failed") == 1


@run_async
async def test_a_kv_load_failure_nothing_recovers_is_a_502_naming_decode_prefill_and_cause():
    async with rr_cluster(local_prefill_fallback=False) as cluster:
        cluster.decode[0].faults.fail_kv_loads = 10
        status, _, raw = await post(cluster, "/v1/completions", COMPLETION)
        message = msgspec.json.decode(raw)["error"]["message"]
        assert status == 502 and message.startswith("decode failed: ")
        assert (f"decode {cluster.decode[0].url} answered HTTP 500" in message
                and f"handed the KV of prefill {cluster.prefill[0].url}" in message
                and "could not load that KV; see the decode's log" in message)
        assert cluster.decode[0].num_requests == 2  # no local prefill: the fallback is off
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_decode_recoveries_total", action="local_prefill") == 0


@run_async
async def test_a_decode_that_times_out_is_not_retried_on_itself():
    async with rr_cluster(timeouts=short("decode_first_byte_s")) as cluster:
        cluster.decode[0].faults.delay_s = DELAY_S  # no answer, no 5xx
        status, _, _ = await post(cluster, "/v1/completions", STREAM)
        assert status == 502 and cluster.decode[0].num_requests == 1


@run_async
async def test_no_decode_instance_left_is_a_503_and_health_says_so():
    async with rr_cluster(num_decode=1) as cluster:
        await cluster.decode[0].stop()
        statuses = [(await post(cluster, "/v1/completions", COMPLETION))[0] for _ in range(3)]
        assert statuses == [502, 502, 503]
        async with cluster.session.get(cluster.url + "/health") as response:
            assert response.status == 503 and (await response.json())["decode_available"] == 0


@run_async
async def test_a_stream_idle_longer_than_decode_idle_s_ends_with_an_sse_error_event():
    async with rr_cluster(token_interval_s=DELAY_S, timeouts=short("decode_idle_s")) as cluster:
        start = time.perf_counter()
        status, _, raw = await post(cluster, "/v1/completions", STREAM)
        events = sse_events(raw)
        assert status == 200 and time.perf_counter() - start < DELAY_S
        assert events[0]["choices"][0]["text"] == output_tokens(STREAM)[0]
        assert "[DONE]" not in events and "stream broke" in events[-1]["error"]["message"]


@run_async
async def test_the_wait_for_a_streams_first_event_is_bounded_by_first_byte_not_idle():
    async with rr_cluster(timeouts=short("decode_idle_s")) as cluster:
        cluster.decode[0].faults.first_event_delay_s = 3 * SHORT_S  # headers at once, then a slow KV load
        status, _, raw = await post(cluster, "/v1/completions", STREAM)
        assert status == 200 and sse_events(raw)[-1] == "[DONE]"
        assert cluster.decode[0].num_requests == 1


@run_async
async def test_a_client_leaving_mid_stream_is_counted_and_the_upstream_stream_is_closed():
    async with rr_cluster(token_interval_s=0.05) as cluster:
        body = {**STREAM, "max_tokens": 40}
        async with cluster.session.post(cluster.url + "/v1/completions", json=body) as response:
            assert response.status == 200
            await response.content.readany()
            response.close()  # drop the connection after the first bytes
        text = ""
        for _ in range(40):  # the router notices on its next write, within one token interval
            await asyncio.sleep(0.05)
            text = await metrics_text(cluster)
            if metric(text, "hetero_pd_router_errors_total", cause="client_disconnected"):
                break
        assert metric(text, "hetero_pd_router_errors_total", cause="client_disconnected") == 1
        assert metric(text, "hetero_pd_router_in_flight") == 0
        for _ in range(40):  # the decode instance sees the cut on its next write
            if cluster.decode[0].num_requests_in_progress == 0:
                break
            await asyncio.sleep(0.05)
        assert cluster.decode[0].num_requests_in_progress == 0


@run_async
async def test_a_client_leaving_during_prefill_cancels_the_prefill_and_starts_no_decode():
    async with rr_cluster(num_prefill=1, timeouts=TimeoutConfig(prefill_s=5.0)) as cluster:
        cluster.prefill[0].faults.delay_s = 1.0
        for body in (COMPLETION, {**COMPLETION, "prompt": ["a", "b"]}):  # one exchange, and a fanned-out batch
            client = asyncio.create_task(post(cluster, "/v1/completions", body))
            await asyncio.sleep(0.3)  # the prefill is in progress
            client.cancel()  # the client's connection closes
            await asyncio.gather(client, return_exceptions=True)
        expected_cancels = 1 + 2
        for _ in range(40):
            if cluster.prefill[0].num_cancelled == expected_cancels:
                break
            await asyncio.sleep(0.05)
        assert cluster.prefill[0].num_cancelled == expected_cancels  # the router closed every prefill call
        await asyncio.sleep(1.0)  # past the prefill's delay: nothing went on to decode
        assert cluster.decode[0].num_requests == 0
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_errors_total", cause="client_disconnected") == 2
        assert metric(text, "hetero_pd_router_in_flight") == 0
        cluster.prefill[0].faults.delay_s = 0
        assert (await post(cluster, "/v1/completions", COMPLETION))[0] == 200  # the router is fine

