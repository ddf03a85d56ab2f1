"""Batches of prompts and n > 1 through the router: one P/D exchange per choice, merged like vLLM.

The reference is a fake instance answering the whole request itself (a monolithic engine). Fake
prefills answer a batch with prompt 0's params only and fake decodes refuse params whose
prompt digest differs from any prompt they get, or that come with n > 1, as vLLM and our
connector do, so a batch or n > 1 passed through whole cannot succeed.
"""

import re

import aiohttp
import msgspec
from test_router_http import COMPLETION, metric, metrics_text, post, run_async, sse_events

from vllm_hetero_pd.testing.fake_backend import FakeCluster, FakeVllm

BATCH = {"prompt": ["The capital of France is, as every atlas says,", "Paris"], "max_tokens": 4}
SAMPLED = {**COMPLETION, "n": 2, "seed": 11, "temperature": 1.0}
CHAT_N = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 3, "n": 3, "seed": 2,
          "temperature": 0.8}


async def monolithic(path: str, body: dict) -> dict:
    """What one engine answers to the whole request (no P/D, no fan-out)."""
    fake = await FakeVllm("decode").start()
    try:
        async with aiohttp.ClientSession() as session, session.post(fake.url + path, json=body) as response:
            assert response.status == 200, await response.text()
            return await response.json()
    finally:
        await fake.stop()


def without_volatile(answer: dict) -> dict:
    """An answer without the fields that differ between any two calls (id, created)."""
    return {k: v for k, v in answer.items() if k not in ("id", "created")}


def texts_by_index(events: list, chat: bool) -> dict[int, str]:
    texts: dict[int, str] = {}
    for event in events:
        for choice in event["choices"]:
            piece = choice["delta"].get("content", "") if chat else choice["text"]
            texts[choice["index"]] = texts.get(choice["index"], "") + piece
    return texts


@run_async
async def test_a_batch_whose_second_prompt_is_shorter_is_answered_exactly_as_one_engine_would():
    async with FakeCluster() as cluster:
        status, request_id, raw = await post(cluster, "/v1/completions", BATCH, {"X-Request-Id": "batch-1"})
        assert status == 200 and request_id == "batch-1"
        answer = msgspec.json.decode(raw)
        assert without_volatile(answer) == without_volatile(await monolithic("/v1/completions", BATCH))
        assert answer["id"] == "cmpl-batch-1-0"  # the first part's
        prefilled = sorted((r.request_id, r.body["prompt"]) for r in cluster.prefill[0].received)
        assert prefilled == [("batch-1-0", BATCH["prompt"][0]), ("batch-1-1", BATCH["prompt"][1])]
        for seen in cluster.decode[0].received:  # each decode got its own prompt's params, verbatim
            params = seen.body["kv_transfer_params"]
            assert params["remote_request_id"] == seen.request_id and params["lease_token"]


@run_async
async def test_n_2_with_a_seed_gives_child_i_the_seed_plus_i_as_vllm_does():
    async with FakeCluster() as cluster:
        status, _, raw = await post(cluster, "/v1/completions", SAMPLED)
        assert status == 200
        answer = msgspec.json.decode(raw)
        assert without_volatile(answer) == without_volatile(await monolithic("/v1/completions", SAMPLED))
        assert sorted((r.body["seed"], r.body["n"]) for r in cluster.decode[0].received) == [(11, 1), (12, 1)]
        status, _, raw = await post(cluster, "/v1/chat/completions", CHAT_N)
        assert status == 200
        expected = await monolithic("/v1/chat/completions", CHAT_N)
        assert without_volatile(msgspec.json.decode(raw)) == without_volatile(expected)


@run_async
async def test_a_streamed_batch_with_n_relays_every_choice_then_one_usage_chunk_and_one_done():
    body = {**BATCH, "n": 2, "seed": 4, "temperature": 1.0, "stream": True,
            "stream_options": {"include_usage": True}}
    async with FakeCluster(decode_weights=(1.0, 1.0), token_interval_s=0.01) as cluster:
        status, _, raw = await post(cluster, "/v1/completions", body)
        events = sse_events(raw)
        assert status == 200 and events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
        expected = await monolithic("/v1/completions", {**body, "stream": False})
        assert texts_by_index(events[:-1], chat=False) == {c["index"]: c["text"] for c in expected["choices"]}
        usage_chunks = [e for e in events[:-1] if e.get("usage")]
        assert len(usage_chunks) == 1 and usage_chunks[0] is events[-2]
        assert usage_chunks[0]["usage"] == expected["usage"] and usage_chunks[0]["choices"] == []
        assert len({e["id"] for e in events[:-1]}) == 1  # one stream, one id
        assert sum(f.num_requests for f in cluster.decode) == 4
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_requests_total", outcome="ok") == 1
        assert metric(text, "hetero_pd_router_decode_seconds_count") == 4


@run_async
async def test_a_streamed_chat_with_n_gives_each_choice_its_role_chunk():
    async with FakeCluster() as cluster:
        status, _, raw = await post(cluster, "/v1/chat/completions", {**CHAT_N, "stream": True})
        events = sse_events(raw)
        assert status == 200 and events[-1] == "[DONE]"
        roles = sorted(c["index"] for e in events[:-1] for c in e["choices"] if c["delta"].get("role"))
        assert roles == [0, 1, 2]
        expected = await monolithic("/v1/chat/completions", CHAT_N)
        assert texts_by_index(events[:-1], chat=True) == {c["index"]: c["message"]["content"]
                                                          for c in expected["choices"]}


@run_async
async def test_a_failing_part_fails_the_whole_request_naming_its_prompt():
    async with FakeCluster(local_prefill_fallback=False) as cluster:
        cluster.prefill[0].faults.fail_status = 400
        cluster.prefill[0].faults.fail_count = 1
        status, _, raw = await post(cluster, "/v1/completions", BATCH)
        message = msgspec.json.decode(raw)["error"]["message"]
        assert status == 400 and re.fullmatch(r"prompt [01] of 2: injected failure on prefill-0", message)
        cluster.prefill[0].faults.fail_status = 500
        cluster.prefill[0].faults.fail_count = 1
        status, _, raw = await post(cluster, "/v1/completions", BATCH)
        message = msgspec.json.decode(raw)["error"]["message"]
        assert status == 502 and re.match(r"prompt [01] of 2: prefill failed: prefill http://\S+ answered HTTP 500",
                                          message)
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_in_flight") == 0


@run_async
async def test_a_part_stream_breaking_after_the_first_byte_ends_the_stream_with_an_error_naming_it():
    async with FakeCluster() as cluster:
        cluster.decode[0].faults.break_after_events = 2
        status, _, raw = await post(cluster, "/v1/completions", {**BATCH, "stream": True})
        events = sse_events(raw)
        assert status == 200 and "[DONE]" not in events
        assert re.match(r"prompt [01] of 2: decode http://\S+ (stream broke|ended without \[DONE\])",
                        events[-1]["error"]["message"])
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_errors_total", cause="stream_interrupted") == 1
        assert metric(text, "hetero_pd_router_in_flight") == 0


@run_async
async def test_more_choices_than_max_fan_out_is_a_400_that_reaches_no_instance():
    async with FakeCluster(max_fan_out=3) as cluster:
        status, _, raw = await post(cluster, "/v1/completions", {**COMPLETION, "n": 4, "temperature": 1.0})
        assert status == 400 and b"more than the router's max_fan_out (3)" in raw
        status, _, raw = await post(cluster, "/v1/completions", {**COMPLETION, "best_of": 2})
        assert status == 400 and b"'best_of' 2 is not supported" in raw
        assert cluster.prefill[0].num_requests == cluster.decode[0].num_requests == 0
