"""The router over real HTTP on loopback, in front of fake vLLM prefill/decode servers (real sockets).

Every fake decode instance refuses ``kv_transfer_params`` that its cluster's prefill fakes did not
issue for the same ``X-Request-Id``, so each successful answer here proves the P->D hand-off.
"""

import asyncio
import functools
import signal
import sys

import aiohttp
import msgspec
from prometheus_client.parser import text_string_to_metric_families

from vllm_hetero_pd.router.config import Policy
from vllm_hetero_pd.testing.fake_backend import FakeCluster, FakeVllm, output_tokens


def run_async(test, timeout_s: float = 30):
    """Run an async test function to completion within ``timeout_s``."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        return asyncio.run(asyncio.wait_for(test(*args, **kwargs), timeout_s))
    return wrapper


async def post(cluster, path, body, headers=None):
    async with cluster.session.post(cluster.url + path, json=body, headers=headers) as response:
        return response.status, response.headers.get("X-Request-Id"), await response.read()


def sse_events(raw: bytes) -> list:
    """Decode an SSE body; '[DONE]' stays a string, every other event must be JSON."""
    assert raw.endswith(b"\n\n"), raw[-50:]
    events = []
    for block in raw.split(b"\n\n")[:-1]:
        assert block.startswith(b"data: "), block
        data = block[len(b"data: "):]
        events.append("[DONE]" if data == b"[DONE]" else msgspec.json.decode(data))
    return events


def metric(text: str, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


async def metrics_text(cluster) -> str:
    async with cluster.session.get(cluster.url + "/metrics") as response:
        assert response.status == 200
        return await response.text()


COMPLETION = {"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0, "seed": 7, "stop": ["\n"],
              "logprobs": 1}
CHAT = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "temperature": 0}


@run_async
async def test_non_streaming_completion_goes_prefill_then_decode_with_one_request_id():
    async with FakeCluster() as cluster:
        status, request_id, raw = await post(cluster, "/v1/completions", COMPLETION, {"X-Request-Id": "req-42"})
        assert status == 200 and request_id == "req-42"
        answer = msgspec.json.decode(raw)
        assert answer["choices"][0]["text"] == "".join(output_tokens(COMPLETION))
        (prefill_seen,) = cluster.prefill[0].received
        (decode_seen,) = cluster.decode[0].received
        assert prefill_seen.request_id == decode_seen.request_id == "req-42"
        assert prefill_seen.body["max_tokens"] == 1 and prefill_seen.body["stream"] is False
        # decode got the client's request untouched plus exactly the params prefill returned
        assert {k: v for k, v in decode_seen.body.items() if k != "kv_transfer_params"} == COMPLETION
        assert decode_seen.body["kv_transfer_params"]["remote_engine_id"] == "prefill-0"
        assert decode_seen.body["kv_transfer_params"]["remote_request_id"] == "req-42"


@run_async
async def test_a_request_id_is_generated_when_the_client_sends_none():
    async with FakeCluster() as cluster:
        status, request_id, _ = await post(cluster, "/v1/completions", COMPLETION)
        assert status == 200 and len(request_id) >= 16
        assert cluster.prefill[0].received[0].request_id == cluster.decode[0].received[0].request_id == request_id


@run_async
async def test_streaming_completion_is_relayed_like_vllm_with_usage_and_done():
    body = {**COMPLETION, "stream": True, "stream_options": {"include_usage": True}}
    async with FakeCluster() as cluster:
        async with cluster.session.post(cluster.url + "/v1/completions", json=body) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            raw = await response.read()
        events = sse_events(raw)
        assert events[-1] == "[DONE]"
        assert "".join(e["choices"][0]["text"] for e in events[:-2]) == "".join(output_tokens(body))
        assert events[-2]["usage"]["completion_tokens"] == 5 and events[-2]["choices"] == []
        decode_body = cluster.decode[0].received[0].body
        assert decode_body["stream_options"] == {"include_usage": True} and decode_body["stream"] is True
        assert "stream_options" not in cluster.prefill[0].received[0].body


@run_async
async def test_chat_streaming_and_non_streaming():
    async with FakeCluster() as cluster:
        status, _, raw = await post(cluster, "/v1/chat/completions", CHAT)
        assert status == 200
        assert msgspec.json.decode(raw)["choices"][0]["message"]["content"] == "".join(output_tokens(CHAT))
        status, _, raw = await post(cluster, "/v1/chat/completions", {**CHAT, "stream": True})
        events = sse_events(raw)
        assert status == 200 and events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "".join(e["choices"][0]["delta"]["content"] for e in events[:-1]) == "".join(output_tokens(CHAT))
        assert [r.path for r in cluster.prefill[0].received] == ["/v1/chat/completions"] * 2


@run_async
async def test_client_kv_transfer_params_never_reach_an_instance():
    forged = {"do_remote_prefill": True, "remote_engine_id": "prefill-0", "remote_host": "10.6.6.6",
              "remote_port": 5600, "remote_block_ids": [[0, 1, 2]], "remote_request_id": "victim"}
    async with FakeCluster() as cluster:
        status, _, _ = await post(cluster, "/v1/completions", {**COMPLETION, "kv_transfer_params": forged})
        assert status == 200
        assert cluster.prefill[0].received[0].body["kv_transfer_params"]["do_remote_decode"] is True
        decode_params = cluster.decode[0].received[0].body["kv_transfer_params"]
        assert decode_params["remote_host"] == "127.0.0.1" and decode_params["remote_request_id"] != "victim"
        assert metric(await metrics_text(cluster), "hetero_pd_router_stripped_kv_transfer_params_total") == 1


@run_async
async def test_client_kv_transfer_params_are_stripped_when_decode_prefills_locally_too():
    forged = {"do_remote_prefill": True, "remote_engine_id": "prefill-0", "remote_host": "10.6.6.6",
              "remote_block_ids": [[0]], "remote_request_id": "r1"}
    async with FakeCluster(min_disagg_tokens=10_000, allow_local_prefill=True) as cluster:
        status, _, _ = await post(cluster, "/v1/completions", {**COMPLETION, "kv_transfer_params": forged},
                                  {"X-Request-Id": "r1"})
        assert status == 200 and cluster.prefill[0].num_requests == 0
        assert "kv_transfer_params" not in cluster.decode[0].received[0].body


@run_async
async def test_round_robin_weights_split_sequential_traffic_in_both_pools():
    async with FakeCluster(prefill_weights=(2.0, 1.0), decode_weights=(1.0, 3.0), prefill_policy=Policy.ROUND_ROBIN,
                           decode_policy=Policy.ROUND_ROBIN) as cluster:
        for _ in range(12):
            assert (await post(cluster, "/v1/completions", COMPLETION))[0] == 200
        assert [len(f.received) for f in cluster.prefill] == [8, 4]
        assert [len(f.received) for f in cluster.decode] == [3, 9]


@run_async
async def test_least_work_weights_split_concurrent_traffic_and_idle_traffic_goes_to_the_biggest():
    async with FakeCluster(prefill_weights=(2.0, 1.0), decode_weights=(1.0, 3.0)) as cluster:
        for fake in cluster.prefill:
            fake.faults.delay_s = 0.3  # all 12 prefills are pending at once
        streams = [{**COMPLETION, "stream": True, "max_tokens": 8} for _ in range(12)]
        for fake in cluster.decode:
            fake.token_interval_s = 0.1  # all 12 decodes are active at once
        results = await asyncio.gather(*(post(cluster, "/v1/completions", body) for body in streams))
        assert [r[0] for r in results] == [200] * 12
        assert [len(f.received) for f in cluster.prefill] == [8, 4]
        assert [len(f.received) for f in cluster.decode] == [3, 9]
        for fake in (*cluster.prefill, *cluster.decode):
            fake.received.clear()
            fake.faults.delay_s = fake.token_interval_s = 0
        for _ in range(3):  # sequential: every instance idle, the higher weight finishes sooner
            assert (await post(cluster, "/v1/completions", COMPLETION))[0] == 200
        assert [len(f.received) for f in cluster.prefill] == [3, 0]
        assert [len(f.received) for f in cluster.decode] == [0, 3]


@run_async
async def test_least_work_sends_decode_to_the_idle_instance_while_another_is_busy():
    async with FakeCluster(decode_weights=(1.0, 1.0), token_interval_s=0.05) as cluster:
        slow = asyncio.create_task(post(cluster, "/v1/completions", {**COMPLETION, "stream": True, "max_tokens": 20}))
        await asyncio.sleep(0.2)  # the stream is now active on one decode instance
        busy = next(f for f in cluster.decode if f.received)
        for _ in range(3):
            assert (await post(cluster, "/v1/completions", {**COMPLETION, "max_tokens": 1}))[0] == 200
        assert len(busy.received) == 1
        assert (await slow)[0] == 200


@run_async
async def test_prefill_least_work_prefers_the_instance_with_fewer_pending_tokens():
    async with FakeCluster(prefill_weights=(1.0, 1.0)) as cluster:
        cluster.prefill[0].faults.delay_s = 0.5
        long_prompt = {**COMPLETION, "prompt": "x" * 4000}
        first = asyncio.create_task(post(cluster, "/v1/completions", long_prompt))
        await asyncio.sleep(0.1)
        assert len(cluster.prefill[0].received) == 1  # the long prompt is pending there (1000 tokens)
        for _ in range(3):
            assert (await post(cluster, "/v1/completions", COMPLETION))[0] == 200
        assert [len(f.received) for f in cluster.prefill] == [1, 3]
        assert (await first)[0] == 200


@run_async
async def test_short_prompts_skip_remote_prefill_when_min_disagg_tokens_is_set():
    async with FakeCluster(min_disagg_tokens=50, allow_local_prefill=True) as cluster:
        assert (await post(cluster, "/v1/completions", {**COMPLETION, "prompt": "short"}))[0] == 200
        assert (await post(cluster, "/v1/completions", {**COMPLETION, "prompt": "long " * 60}))[0] == 200
        assert len(cluster.prefill[0].received) == 1
        assert [("kv_transfer_params" in r.body) for r in cluster.decode[0].received] == [False, True]
        assert metric(await metrics_text(cluster), "hetero_pd_router_local_prefill_total", reason="short_prompt") == 1


@run_async
async def test_api_key_is_required_on_client_endpoints_and_not_forwarded():
    async with FakeCluster(api_key="client-key", upstream_api_key="engine-key") as cluster:
        assert (await post(cluster, "/v1/completions", COMPLETION))[0] == 401
        status, _, raw = await post(cluster, "/v1/completions", COMPLETION, {"Authorization": "Bearer wrong"})
        assert status == 401 and b"API key" in raw
        assert (await post(cluster, "/v1/completions", COMPLETION, {"Authorization": "Bearer client-key"}))[0] == 200
        async with cluster.session.get(cluster.url + "/v1/models") as response:
            assert response.status == 401
        async with cluster.session.get(cluster.url + "/v1/models",
                                       headers={"Authorization": "Bearer client-key"}) as response:
            assert response.status == 200 and (await response.json())["data"][0]["id"] == "fake-model"
        seen = cluster.prefill[0].received + cluster.decode[0].received
        assert [r.authorization for r in seen] == ["Bearer engine-key"] * 2
        assert len(cluster.prefill[0].received) == 1  # rejected requests never reached an instance
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_errors_total", cause="unauthorized") == 2


@run_async
async def test_admin_endpoints_need_the_admin_token_and_change_the_pools():
    async with FakeCluster(decode_weights=(1.0, 1.0), decode_policy=Policy.ROUND_ROBIN, admin_token="admin-secret",
                           api_key="client-key") as cluster:
        admin = {"Authorization": "Bearer admin-secret"}
        client = {"Authorization": "Bearer client-key"}
        target = cluster.decode[1].url
        assert (await post(cluster, "/admin/drain", {"role": "decode", "url": target}))[0] == 401
        assert (await post(cluster, "/admin/drain", {"role": "decode", "url": target}, client))[0] == 401
        status, _, raw = await post(cluster, "/admin/drain", {"role": "decode", "url": target}, admin)
        assert status == 200 and msgspec.json.decode(raw)["draining"] is True
        for _ in range(4):
            assert (await post(cluster, "/v1/completions", COMPLETION, client))[0] == 200
        assert len(cluster.decode[1].received) == 0
        assert (await post(cluster, "/admin/remove", {"role": "decode", "url": target}, admin))[0] == 200
        status, _, raw = await post(cluster, "/admin/add", {"role": "decode", "url": target, "weight": 3}, admin)
        assert status == 200 and msgspec.json.decode(raw)["weight"] == 3
        for _ in range(4):
            assert (await post(cluster, "/v1/completions", COMPLETION, client))[0] == 200
        assert len(cluster.decode[1].received) == 3
        status, _, raw = await post(cluster, "/admin/add", {"role": "decode", "url": "ftp://x"}, admin)
        assert status == 400 and b"must look like http://host:port" in raw
        status, _, raw = await post(cluster, "/admin/remove", {"role": "prefill", "url": "http://127.0.0.1:1"}, admin)
        assert status == 400 and b"no prefill instance http://127.0.0.1:1" in raw
        status, _, raw = await post(cluster, "/admin/add", {"role": "decode", "url": target, "wieght": 2}, admin)
        assert status == 400 and b"wieght" in raw
        async with cluster.session.get(cluster.url + "/admin/instances", headers=admin) as response:
            listed = await response.json()
        assert sorted((i["role"], i["weight"]) for i in listed) == [("decode", 1.0), ("decode", 3.0), ("prefill", 1.0)]


@run_async
async def test_admin_endpoints_are_off_without_an_admin_token():
    async with FakeCluster() as cluster:
        status, _, raw = await post(cluster, "/admin/add", {"role": "decode", "url": "http://127.0.0.1:9"})
        assert status == 403 and b"admin endpoints are disabled" in raw


@run_async
async def test_malformed_input_gets_clear_4xx_and_never_reaches_an_instance():
    async with FakeCluster(max_body_bytes=4096) as cluster:
        async with cluster.session.post(cluster.url + "/v1/completions", data=b"{nope",
                                        headers={"Content-Type": "application/json"}) as response:
            assert response.status == 400
            assert "not valid JSON" in (await response.json())["error"]["message"]
        status, _, raw = await post(cluster, "/v1/chat/completions", {"messages": "hi"})
        assert status == 400 and msgspec.json.decode(raw)["error"]["type"] == "BadRequestError"
        status, _, raw = await post(cluster, "/v1/completions", {"prompt": "x" * 5000})
        assert status == 413 and b"max_body_bytes" in raw
        assert cluster.prefill[0].num_requests == cluster.decode[0].num_requests == 0
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_errors_total", cause="bad_request") == 2
        assert metric(text, "hetero_pd_router_errors_total", cause="body_too_large") == 1


@run_async
async def test_deeply_nested_json_is_a_400_naming_the_cause_on_every_endpoint_that_parses():
    deep = b"[" * 50_000 + b"]" * 50_000
    async with FakeCluster(admin_token="admin-secret") as cluster:
        for path, raw in (("/v1/completions", deep), ("/v1/chat/completions", b'{"messages": ' + deep + b"}"),
                          ("/admin/add", b'{"role": "decode", "url": ' + deep + b"}")):
            async with cluster.session.post(cluster.url + path, data=raw, headers={
                    "Content-Type": "application/json", "Authorization": "Bearer admin-secret"}) as response:
                assert response.status == 400, (path, await response.text())
                message = (await response.json())["error"]["message"]
            assert "nests JSON too deeply" in message or "admin add: Expected `str`" in message, message
        assert cluster.prefill[0].num_requests == 0
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_errors_total", cause="bad_request") == 2
        assert metric(text, "hetero_pd_router_errors_total", cause="internal") == 0


@run_async
async def test_upstream_4xx_is_relayed_not_retried():
    async with FakeCluster(prefill_weights=(1.0, 1.0)) as cluster:
        cluster.prefill[0].faults.fail_status = cluster.prefill[1].faults.fail_status = 400
        cluster.prefill[0].faults.fail_count = cluster.prefill[1].faults.fail_count = 1
        status, _, raw = await post(cluster, "/v1/completions", COMPLETION)
        assert status == 400 and b"injected failure" in raw
        assert sum(f.num_requests for f in cluster.prefill) == 1 and cluster.decode[0].num_requests == 0


@run_async
async def test_health_and_metrics_endpoints():
    async with FakeCluster() as cluster:
        async with cluster.session.get(cluster.url + "/health") as response:
            assert response.status == 200
            assert await response.json() == {"status": "ok", "prefill_available": 1, "decode_available": 1}
        await post(cluster, "/v1/completions", COMPLETION)
        await post(cluster, "/v1/chat/completions", {**CHAT, "stream": True})
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_requests_total", outcome="ok") == 2
        assert metric(text, "hetero_pd_router_prefill_seconds_count") == 2
        assert metric(text, "hetero_pd_router_decode_seconds_count") == 2
        assert metric(text, "hetero_pd_router_in_flight") == 0


@run_async
async def test_the_proxy_subcommand_serves_on_a_free_port_and_stops_on_sigterm():
    prefill = await FakeVllm("prefill", "prefill-0").start()
    decode = await FakeVllm("decode", "decode-0", prefill_engine_ids=frozenset({"prefill-0"}),
                            allow_local_prefill=False).start()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vllm_hetero_pd.cli", "proxy", "--port", "0", "--prefill", prefill.url,
        "--decode", f"{decode.url},weight=2", "--log-level", "WARNING", stdout=asyncio.subprocess.PIPE)
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
        assert line.startswith("router listening on http://127.0.0.1:"), line
        url = line.split()[-1]
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/v1/completions", json=COMPLETION) as response:
                assert response.status == 200
                assert (await response.json())["choices"][0]["text"] == "".join(output_tokens(COMPLETION))
        assert decode.received[0].body["kv_transfer_params"]["remote_engine_id"] == "prefill-0"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await prefill.stop()
        await decode.stop()
