"""The kv_aware router in front of real engines: 2 prefills + 1 decode with prefix caching and KV events.

Checks what the unit tests cannot: that the router tokenises prompts exactly as vLLM does (the
precondition for matching its KV events), that the events of a real engine decode and drive the
choice, that answers through kv_aware routing (cache hits included) equal the monolithic ones,
that a cleared engine cache (``AllBlocksCleared``) costs no request, and that a prefill engine that
dies and comes back (a new process, its event sequence starting again) costs none either: the
router routes by load while its view of that engine is gone and rebuilds it from the new events.
It also checks that a prefill holding a
KV lease does not starve the prefill that shares its core. The restart runs last: it changes the
cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request

import pytest

from vllm_hetero_pd.kv_params import prefill_request_params
from vllm_hetero_pd.launch.bench_routing import engine_specs, instance_args, reset_caches, run_bodies
from vllm_hetero_pd.launch.cluster import LocalCluster
from vllm_hetero_pd.launch.request import post_json
from vllm_hetero_pd.launch.router_process import running_router
from vllm_hetero_pd.router.tokens import PromptTokenizer, prompt_of
from vllm_hetero_pd.testing.compare import LOGPROB_TOLERANCE, compare, greedy_body, parse_completion
from vllm_hetero_pd.testing.metrics import metric_sum, scrape
from vllm_hetero_pd.testing.tiny_model import sample_text

ADMIN_ENV = "HETERO_PD_TEST_ADMIN_TOKEN"


@pytest.fixture(scope="module")
def kv_cluster(tiny_model, tmp_path_factory):
    specs, router_args = engine_specs(tiny_model, 2, 1)
    with LocalCluster(specs, tmp_path_factory.mktemp("kv-aware")) as cluster:
        yield cluster, router_args


@pytest.fixture(scope="module")
def kv_router(kv_cluster, tiny_model, tmp_path_factory):
    cluster, router_args = kv_cluster
    prefill_args, decode_args = instance_args(cluster, router_args)
    os.environ[ADMIN_ENV] = "kv-aware-admin"
    log = tmp_path_factory.mktemp("kv-aware-router") / "router.log"
    with running_router(prefill_args, decode_args, log, ("--prefill-policy", "kv_aware", "--decode-policy",
                                                         "kv_aware", "--tokenizer", tiny_model,
                                                         "--admin-token-env", ADMIN_ENV)) as url:
        time.sleep(1.0)  # the subscribers join the event streams
        yield url


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_the_router_tokenises_as_the_engine_does(kv_cluster, tiny_model):
    cluster, _ = kv_cluster
    url = cluster.instances[0].url
    tokenizer = PromptTokenizer(tiny_model)
    text = sample_text(120, 5)
    messages = [{"role": "system", "content": sample_text(40, 6)}, {"role": "user", "content": text},
                {"role": "assistant", "content": sample_text(10, 7)}, {"role": "user", "content": "And then?"}]
    engine = post(url + "/tokenize", {"model": tiny_model, "prompt": text})["tokens"]
    assert list(prompt_of({"prompt": text}, False, tokenizer).units) == engine
    engine_chat = post(url + "/tokenize", {"model": tiny_model, "messages": messages,
                                           "add_generation_prompt": True})["tokens"]
    assert list(prompt_of({"messages": messages}, True, tokenizer).units) == engine_chat


def test_conversations_follow_their_cache_and_answers_equal_monolithic(kv_router, kv_cluster, tiny_model, prompts,
                                                                       reference):
    cluster, _ = kv_cluster
    reset_caches(cluster)
    # token-id prompts, each sent twice: the second time it is a prefix-cache hit somewhere
    got = [parse_completion(post_json(kv_router + "/v1/completions", greedy_body(p), f"kv-{i}-{r}", 300))
           for r in range(2) for i, p in enumerate(prompts[:4])]
    assert compare(reference[:4] * 2, got, LOGPROB_TOLERANCE) == []
    routed = scrape(kv_router)
    assert metric_sum(routed, "hetero_pd_router_kv_events_total", kind="stored") > 0
    assert metric_sum(routed, "hetero_pd_router_prefix_hit_tokens_total", role="prefill", source="events") > 0
    auth = {"Authorization": f"Bearer {os.environ[ADMIN_ENV]}"}
    for i in range(4):  # the repeat went to the prefill that had computed the prompt
        firsts, seconds = (_explained(kv_router, f"kv-{i}-{r}", auth) for r in range(2))
        assert firsts["prefill"] == seconds["prefill"], (firsts, seconds)


def test_chat_turns_reuse_the_earlier_turns_on_one_prefill(kv_router, kv_cluster, tiny_model):
    cluster, _ = kv_cluster
    reset_caches(cluster)
    prefill_urls = [i.url for i in cluster.by_role("prefill")]
    before = sum(metric_sum(scrape(u), "vllm:prefix_cache_hits_total") for u in prefill_urls)
    messages = [{"role": "system", "content": sample_text(150, 11)}]
    for turn in range(4):
        messages.append({"role": "user", "content": sample_text(25, 20 + turn)})
        body = {"model": tiny_model, "messages": messages, "max_tokens": 8, "temperature": 0}
        ((answer, _),) = asyncio.run(run_bodies(kv_router, [body], 1))
        messages.append({"role": "assistant", "content": answer})
    hits = sum(metric_sum(scrape(u), "vllm:prefix_cache_hits_total") for u in prefill_urls) - before
    assert hits >= 3 * 150  # every later turn reused at least the system prompt


def test_a_cleared_engine_cache_costs_no_request(kv_router, kv_cluster, prompts, reference):
    cluster, _ = kv_cluster
    reset_caches(cluster)  # AllBlocksCleared on every engine
    time.sleep(0.5)
    got = [parse_completion(post_json(kv_router + "/v1/completions", greedy_body(p), f"after-clear-{i}", 300))
           for i, p in enumerate(prompts[:2])]
    assert compare(reference[:2], got, LOGPROB_TOLERANCE) == []
    assert metric_sum(scrape(kv_router), "hetero_pd_router_kv_events_total", kind="cleared") >= 2
    assert metric_sum(scrape(kv_router), "hetero_pd_router_errors_total") == 0


def test_a_prefill_holding_a_lease_does_not_starve_the_prefill_that_shares_its_core(kv_cluster, tiny_model):
    """The two prefills are bound to one core (``launch/cluster.py``). One that holds an unread KV
    lease keeps its engine stepping. Without ``HETERO_PD_MQ_NAP_S`` its worker spun on
    ``sched_yield`` between steps, and a prompt sent to the other prefill was answered only once
    the lease expired (30 s against 0.4 s, measured). This checks an order, not a time: the other
    prefill answers while the lease is still held, i.e. before the holder's KV usage is back to 0."""
    cluster, _ = kv_cluster
    other, holder = cluster.by_role("prefill")
    post(other.url + "/v1/completions", {"model": tiny_model, "prompt": sample_text(200, 4141), "max_tokens": 1})
    held = post(holder.url + "/v1/completions", {"model": tiny_model, "prompt": sample_text(200, 4242),
                                                 "max_tokens": 1, "kv_transfer_params": prefill_request_params()})
    assert held["kv_transfer_params"]["remote_block_ids"], "the prefill started no lease"
    time.sleep(1.5)  # past the 1 s that vLLM's worker spins after a message: the other one's sleeps now
    post(other.url + "/v1/completions", {"model": tiny_model, "prompt": sample_text(200, 4343), "max_tokens": 1})
    usage = metric_sum(scrape(holder.url), "vllm:kv_cache_usage_perc")
    assert usage > 0, ("the other prefill answered only after the holder's lease expired: an idle worker "
                       "spinning on a shared core starved it (see connector/mq_spin.py)")


def test_a_restarted_prefill_engine_is_routed_around_then_rebuilt_and_no_request_fails(kv_router, kv_cluster,
                                                                                       prompts, reference):
    cluster, _ = kv_cluster
    victim = cluster.by_role("prefill")[0]

    def answered(tag: str, indices: range) -> None:
        got = [parse_completion(post_json(kv_router + "/v1/completions", greedy_body(prompts[i]), f"{tag}-{i}", 300))
               for i in indices]
        assert compare([reference[i] for i in indices], got, LOGPROB_TOLERANCE) == []

    def wait_for(condition) -> dict:
        for _ in range(60):
            text = scrape(kv_router)
            if condition(text):
                return text
            time.sleep(0.5)
        return text

    before = scrape(kv_router)
    victim.stop()
    answered("victim-down", range(3))  # retried on the other prefill, the dead one ejected
    fresh = cluster.restart(victim)
    wait_for(lambda t: metric_sum(t, "hetero_pd_router_instance_healthy", instance=fresh.url) == 1)
    # The new process publishes from sequence 0 again; a prompt it alone has cached shows that the
    # router follows its new events, and routes by them.
    unseen = list(reversed(prompts[6]))
    post_json(fresh.url + "/v1/completions", greedy_body(unseen, 2), "direct-to-restarted", 300)
    rebuilt = wait_for(lambda t: metric_sum(t, "hetero_pd_router_prefix_view_synced", instance=fresh.url) == 1)
    assert metric_sum(rebuilt, "hetero_pd_router_kv_event_gaps_total", instance=fresh.url, outcome="restarted") >= 1
    routes = metric_sum(rebuilt, "hetero_pd_router_routes_total", prefill=fresh.url)
    post_json(kv_router + "/v1/completions", greedy_body(unseen, 2), "unseen-via-router", 300)
    assert metric_sum(scrape(kv_router), "hetero_pd_router_routes_total", prefill=fresh.url) == routes + 1
    answered("victim-back", range(8))
    after = scrape(kv_router)
    assert metric_sum(after, "hetero_pd_router_errors_total") == metric_sum(before, "hetero_pd_router_errors_total")
    assert metric_sum(after, "hetero_pd_router_ejections_total", role="prefill") >= 1
    assert metric_sum(after, "hetero_pd_router_readmissions_total", role="prefill") >= 1


def _explained(router: str, request_id: str, headers: dict) -> dict:
    request = urllib.request.Request(f"{router}/debug/route?request_id={request_id}", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())
