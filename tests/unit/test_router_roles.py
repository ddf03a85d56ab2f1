"""Mixed (kv_both) instances and the ratio controller over real HTTP, against fake ``both`` instances.

The fakes answer a request carrying ``do_remote_decode`` as a prefill and any other as a decode, and
refuse params no fake of the cluster issued, so every answer proves the hand-off it went through.
"""

import asyncio
import time

import msgspec
from test_router_http import metric, metrics_text, post, run_async

from vllm_hetero_pd.router.config import Policy, RatioConfig, Role
from vllm_hetero_pd.router.ratio import Action
from vllm_hetero_pd.testing.fake_backend import FakeCluster, output_tokens

RATIO = dict(model="llama-3.1-8b", device="H100", ttft_ms=2000, tpot_ms=50)


def legs(fake) -> tuple[int, int]:
    """(prefill legs, decode legs) a fake received."""
    prefills = sum(fake.is_prefill_leg(r.body) for r in fake.received)
    return prefills, len(fake.received) - prefills


def params_from(fake) -> list[str]:
    """The engine ids whose KV params each of the fake's decode legs carried ('' for a local prefill)."""
    return [(r.body.get("kv_transfer_params") or {}).get("remote_engine_id", "") for r in fake.received
            if not fake.is_prefill_leg(r.body)]


async def wait_until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def completion(i: int, max_tokens: int = 6, stream: bool = False) -> dict:
    return {"prompt": f"request {i}", "max_tokens": max_tokens, "temperature": 0, "stream": stream}


@run_async
async def test_a_mixed_instance_prefills_for_a_decode_while_it_decodes_its_own():
    """A pinned decode and one mixed instance: decodes alternate (round robin), the mixed instance
    prefills them all (locally for its own), with both kinds in flight on it at once."""
    async with FakeCluster(prefill_weights=(), num_mixed=1, token_interval_s=0.02,
                           decode_policy=Policy.ROUND_ROBIN) as cluster:
        (mixed,) = cluster.mixed
        answers = await asyncio.gather(*(post(cluster, "/v1/completions", completion(i, stream=False))
                                         for i in range(6)))
        for i, (status, _, raw) in enumerate(answers):
            assert status == 200, raw
            assert msgspec.json.decode(raw)["choices"][0]["text"] == "".join(output_tokens(completion(i)))
        assert legs(cluster.decode[0]) == (0, 3) and set(params_from(cluster.decode[0])) == {"mixed-0"}
        assert legs(mixed) == (3, 3) and set(params_from(mixed)) == {""}  # its own: prefilled locally
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_local_prefill_total", reason="same_instance") == 3
        assert metric(text, "hetero_pd_router_requests_total", outcome="ok") == 6


@run_async
async def test_a_flip_drains_the_old_role_and_loses_no_request():
    """A decode stream is in flight when its instance flips to prefill: the stream completes, the
    instance takes no new request of either role until then, and prefills once it is done."""
    ratio = RatioConfig(**RATIO, initial_prefill=1, interval_s=3600)
    async with FakeCluster(prefill_weights=(), decode_weights=(), num_mixed=3, token_interval_s=0.05,
                           ratio=ratio) as cluster:
        roles = cluster.router.router.roles
        prefill_fake, *decode_fakes = cluster.mixed
        slow = asyncio.ensure_future(post(cluster, "/v1/completions", completion(0, max_tokens=40, stream=True)))
        await wait_until(lambda: any(legs(f)[1] for f in decode_fakes))
        busy = next(f for f in decode_fakes if legs(f)[1])
        other = next(f for f in decode_fakes if f is not busy)
        roles.flip(busy.url, Role.PREFILL)
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_instance_role", instance=busy.url) == 0  # draining: neither role
        for i in range(1, 5):  # meanwhile every request goes to the other two
            status, _, raw = await post(cluster, "/v1/completions", completion(i))
            assert status == 200, raw
        assert legs(busy) == (0, 1) and legs(other)[1] == 4 and legs(prefill_fake)[0] == 5
        status, _, raw = await slow
        assert status == 200 and raw.endswith(b"data: [DONE]\n\n")  # the in-flight stream finished
        roles.settle()
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_instance_role", instance=busy.url, role="prefill") == 1
        assert metric(text, "hetero_pd_router_role_drains_total", outcome="finished") == 1
        assert metric(text, "hetero_pd_router_role_flips_total", instance=busy.url, to_role="prefill") == 1
        before = legs(busy)[0]
        for i in range(5, 9):
            assert (await post(cluster, "/v1/completions", completion(i)))[0] == 200
        assert legs(busy)[0] > before and legs(busy)[1] == 1  # now a prefill, and only a prefill
        assert metric(await metrics_text(cluster), "hetero_pd_router_errors_total") == 0


@run_async
async def test_the_controller_follows_the_phases_and_the_desired_replicas_with_it():
    """Three mixed instances, one prefilling: long prompts with short answers move a second one to
    prefill; short prompts with long answers move one back. Every request answers correctly."""
    ratio = RatioConfig(**RATIO, initial_prefill=1, interval_s=0.1, window_s=1.5, min_requests=5, hold_s=0,
                        cooldown_s=0)
    async with FakeCluster(prefill_weights=(), decode_weights=(), num_mixed=3, ratio=ratio) as cluster:
        roles = cluster.router.router.roles

        def num_prefilling() -> int:
            return sum(m.role is Role.PREFILL and m.draining_from is None for m in roles.mixed)

        async def phase(isl: int, osl: int, until) -> dict[str, float]:
            deadline = time.monotonic() + 10
            i = 0
            while not until() and time.monotonic() < deadline:
                body = {"prompt": [7 + (i % 50)] * isl, "max_tokens": osl, "temperature": 0}
                status, _, raw = await post(cluster, "/v1/completions", body)
                assert status == 200, raw
                assert msgspec.json.decode(raw)["choices"][0]["text"] == "".join(output_tokens(body))
                i += 1
                await asyncio.sleep(0.02)
            assert until(), f"no flip after {i} requests; last decision {roles.last}"
            text = await metrics_text(cluster)
            return {role: metric(text, "hetero_pd_router_desired_replicas", pool=role)
                    for role in ("prefill", "decode")}

        prefill_heavy = await phase(4096, 16, lambda: num_prefilling() == 2)
        decode_heavy = await phase(64, 1024, lambda: num_prefilling() == 1)
        assert prefill_heavy["prefill"] > decode_heavy["prefill"]
        assert decode_heavy["decode"] >= prefill_heavy["decode"]
        text = await metrics_text(cluster)
        assert metric(text, "hetero_pd_router_role_flips_total", to_role="prefill") >= 1
        assert metric(text, "hetero_pd_router_role_flips_total", to_role="decode") >= 1
        assert metric(text, "hetero_pd_router_ratio_decisions_total", action=Action.FLIP.value) >= 2
        assert metric(text, "hetero_pd_router_errors_total") == 0


@run_async
async def test_without_a_ratio_section_mixed_instances_keep_both_roles_and_nothing_flips():
    async with FakeCluster(prefill_weights=(), decode_weights=(), num_mixed=2) as cluster:
        assert not cluster.router.router.roles.active
        for i in range(4):
            assert (await post(cluster, "/v1/completions", completion(i)))[0] == 200
        text = await metrics_text(cluster)
        for fake in cluster.mixed:
            for role in ("prefill", "decode"):
                assert metric(text, "hetero_pd_router_instance_role", instance=fake.url, role=role) == 1
        assert metric(text, "hetero_pd_router_ratio_decisions_total") == 0
