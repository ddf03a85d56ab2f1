"""kv_aware routing over real HTTP and real ZMQ on loopback, against fake engines with prefix caches.

The fakes cache blocks under their own sha256 chain and publish vLLM-shaped KV events over ZMQ;
the router must route by what they cache, rebuild its view when events are lost or an engine
restarts (never failing a request for it), keep long requests off a decode near its KV limit,
never pick an incompatible pair, prefill locally what the decode has cached, and explain itself
on /debug/route.
"""

import asyncio
import functools

import msgspec
from test_router_http import metric, metrics_text
from test_router_http import run_async as run_async_within

from vllm_hetero_pd.router.config import PairRule, Policy, ScoringConfig
from vllm_hetero_pd.testing.fake_backend import FakeCluster, output_tokens

KV = Policy.KV_AWARE


run_async = functools.partial(run_async_within, timeout_s=60)  # index rebuilds and event replays take longer


async def complete(cluster, prompt, max_tokens=4, request_id=None, **extra):
    body = {"prompt": prompt, "max_tokens": max_tokens, **extra}
    headers = {"X-Request-Id": request_id} if request_id else None
    async with cluster.session.post(cluster.url + "/v1/completions", json=body, headers=headers) as response:
        raw = await response.read()
        assert response.status == 200, raw
        answer = msgspec.json.decode(raw)
        assert answer["choices"][0]["text"] == "".join(output_tokens(body))
        return answer


def conversations(num_conversations=5, num_turns=5, system_len=64, turn_len=40):
    """Token-id prompts: a few shared system prompts, each turn extending the previous one."""
    systems = [[5000 + s] * system_len for s in range(2)]
    history = {c: list(systems[c % 2]) for c in range(num_conversations)}
    for turn in range(num_turns):
        for c in range(num_conversations):
            history[c] = history[c] + [100 * c + turn + 1] * turn_len
            yield c, list(history[c])


async def subscribed(cluster):
    for fake in (*cluster.prefill, *cluster.decode):
        if fake.kv_events:
            await fake.wait_subscribed()


def cache_options(events=True, replay=False, blocks=4096):
    return {"prefix_cache_blocks": blocks, "block_size": 16, "kv_events": events, "kv_replay": replay}


async def run_workload(prefill_policy, events=True):
    async with FakeCluster((1.0, 1.0), prefill_policy=prefill_policy,
                           prefill_options=[cache_options(events), cache_options(events)]) as cluster:
        await subscribed(cluster)
        placed = {}
        for c, prompt in conversations():
            await complete(cluster, prompt)
            await asyncio.sleep(0.01)  # let the events of this turn arrive, as between real turns
            placed.setdefault(c, set()).add(next(i for i, p in enumerate(cluster.prefill)
                                                 if p.received[-1:] and p.received[-1].body["prompt"] == prompt))
        computed = sum(p.computed_tokens for p in cluster.prefill)
        return computed, placed, await metrics_text(cluster)


@run_async
async def test_kv_aware_keeps_each_conversation_on_the_prefill_that_caches_it():
    computed_kv, placed, text = await run_workload(KV)
    computed_lw, _, _ = await run_workload(Policy.LEAST_WORK, events=False)
    assert all(len(instances) == 1 for instances in placed.values()), placed
    assert computed_kv <= 0.7 * computed_lw, (computed_kv, computed_lw)
    assert metric(text, "hetero_pd_router_prefix_hit_tokens_total", role="prefill", source="events") > 0
    assert metric(text, "hetero_pd_router_kv_events_total", kind="stored") > 0
    assert metric(text, "hetero_pd_router_routes_total") == 25


@run_async
async def test_without_events_the_router_routes_by_what_it_sent():
    computed, placed, text = await run_workload(KV, events=False)
    assert all(len(instances) == 1 for instances in placed.values()), placed
    assert metric(text, "hetero_pd_router_prefix_hit_tokens_total", source="sent") > 0
    assert metric(text, "hetero_pd_router_prefix_hit_tokens_total", source="events") == 0


@run_async
async def test_lost_events_are_replayed_or_the_view_rebuilt_and_a_restart_clears_it():
    options = [cache_options(replay=True), cache_options(replay=False)]
    async with FakeCluster((1.0, 1.0), prefill_policy=KV, prefill_options=options) as cluster:
        await subscribed(cluster)
        router = cluster.router.router
        views = [router.prefill.instances[i].prefix for i in range(2)]
        for p in cluster.prefill:
            p.publish([{"type": "BlockRemoved", "block_hashes": [b"none"], "medium": "GPU"}])
            p.event_faults.drop_batches = 2
        for i in range(6):  # distinct prompts, so both prefills store blocks and drop two batches
            await complete(cluster, [7000 + i] * 64)
        for p in cluster.prefill:
            p.publish([{"type": "BlockRemoved", "block_hashes": [b"none"], "medium": "GPU"}])
        await asyncio.sleep(0.3)
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_kv_event_gaps_total", instance=cluster.prefill[0].url,
                      outcome="replayed") == 1
        assert metric(text, "hetero_pd_router_kv_event_gaps_total", instance=cluster.prefill[1].url,
                      outcome="rebuilt") == 1
        assert views[0].events.num_blocks == len(cluster.prefill[0].cache.blocks)  # nothing missed
        # rebuilt from the first batch after the gap: that prompt's 4 blocks, not the 12 the engine holds
        assert views[1].synced_since is not None and views[1].events.num_blocks == 4
        assert len(cluster.prefill[1].cache.blocks) == 12
        cluster.prefill[0].restart_engine()
        await complete(cluster, [8000] * 64)
        await complete(cluster, [8001] * 64)
        await asyncio.sleep(0.3)
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_kv_event_gaps_total", instance=cluster.prefill[0].url,
                      outcome="restarted") == 1
        assert views[0].events.num_blocks == len(cluster.prefill[0].cache.blocks)
        cluster.prefill[1].clear_prefix_cache()
        await asyncio.sleep(0.2)
        assert views[1].events.num_blocks == 0
        assert metric(text, "hetero_pd_router_errors_total") == 0


@run_async
async def test_a_decode_near_its_kv_limit_gets_no_long_requests_and_nothing_is_preempted():
    small, large = {"kv_capacity_tokens": 2000}, {"kv_capacity_tokens": 200000}
    async with FakeCluster((1.0,), (1.0, 1.0), decode_policy=KV, decode_options=[small, large],
                           token_interval_s=0.01, scoring=ScoringConfig(metrics_interval_s=0.05)) as cluster:
        await asyncio.sleep(0.2)  # first /metrics poll
        longs = [complete(cluster, [900 + i] * 900, max_tokens=20) for i in range(12)]
        shorts = [complete(cluster, [10 + i] * 20, max_tokens=4) for i in range(12)]
        await asyncio.gather(*longs, *shorts)
        long_on = [sum(1 for r in d.received if len(r.body["prompt"]) == 900) for d in cluster.decode]
        assert long_on[0] <= 1 and long_on[1] >= 11, long_on  # one fits in 2000 tokens
        assert [d.num_preemptions for d in cluster.decode] == [0, 0]
        assert len(cluster.decode[0].received) > 0  # short ones still use it


@run_async
async def test_an_incompatible_pair_is_never_used_and_the_other_prefill_serves_that_decode():
    rules = (PairRule(prefill="cuda-fp8", decode="cpu-bf16", compatible=False),)
    async with FakeCluster((1.0, 1.0), (1.0, 1.0), prefill_policy=KV, decode_policy=KV,
                           prefill_options=[{"kv_format": "cuda-fp8"}, {"kv_format": "cpu-bf16"}],
                           decode_options=[{"kv_format": "cpu-bf16"}, {"kv_format": "cuda-fp8"}],
                           pairs=rules) as cluster:
        await asyncio.gather(*(complete(cluster, [i] * 50) for i in range(20)))
        for r in cluster.decode[0].received:
            assert r.body["kv_transfer_params"]["remote_engine_id"] == "prefill-1"
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_routes_total", prefill=cluster.prefill[0].url,
                      decode=cluster.decode[0].url) == 0


@run_async
async def test_a_prompt_the_decode_has_cached_is_prefilled_by_the_decode():
    async with FakeCluster(prefill_policy=KV, allow_local_prefill=True, min_disagg_tokens=64,
                           decode_options=[cache_options(events=False)]) as cluster:
        prompt = [42] * 400
        await complete(cluster, prompt)  # 400 uncached: remote
        await complete(cluster, prompt + [43] * 32)  # the decode holds 400 of these: local
        await complete(cluster, [44] * 20)  # short and uncached: local
        decode_got = cluster.decode[0].received
        assert ["kv_transfer_params" in r.body for r in decode_got] == [True, False, False]
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_local_prefill_total", reason="short_prompt") == 2
        assert metric(text, "hetero_pd_router_routes_total", prefill="local") == 2


@run_async
async def test_debug_route_explains_a_choice_to_admins_only():
    async with FakeCluster((1.0, 1.0), prefill_policy=KV, admin_token="admin-secret",
                           prefill_options=[cache_options(events=False)] * 2) as cluster:
        await complete(cluster, [9] * 100, request_id="r-1")
        async with cluster.session.post(cluster.url + "/debug/route", json={"prompt": [9] * 100}) as response:
            assert response.status == 401
        auth = {"Authorization": "Bearer admin-secret"}
        async with cluster.session.post(cluster.url + "/debug/route", json={"prompt": [9] * 120},
                                        headers=auth) as response:
            (explained,) = await response.json()
        warm = explained["prefill"]
        assert explained["num_prompt_tokens"] == 120 and explained["tokens_exact"]
        assert {p["url"]: p["cached_tokens"] for p in explained["prefills"]}[warm] == 96
        assert {p["prefill"] for p in explained["pairs"]} == {p.url for p in cluster.prefill}
        async with cluster.session.get(cluster.url + "/debug/route?request_id=r-1", headers=auth) as response:
            assert response.status == 200 and (await response.json())["prefill"] == warm
        async with cluster.session.get(cluster.url + "/debug/route?request_id=nope", headers=auth) as response:
            assert response.status == 404
        assert all(len(p.received) <= 1 for p in cluster.prefill)  # explaining sent nothing


@run_async
async def test_routing_is_off_by_default_and_debug_route_says_so():
    async with FakeCluster(admin_token="t") as cluster:
        assert not cluster.router.router.routing.enabled
        async with cluster.session.post(cluster.url + "/debug/route", json={"prompt": "x"},
                                        headers={"Authorization": "Bearer t"}) as response:
            assert response.status == 409
