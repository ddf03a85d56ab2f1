"""Pure instance selection (router/policy.py) and the pool state it reads (router/pool.py)."""

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_hetero_pd.router.config import InstanceConfig, Policy, Role
from vllm_hetero_pd.router.metrics import RouterMetrics
from vllm_hetero_pd.router.policy import Candidate, choose
from vllm_hetero_pd.router.pool import AdminError, Pool


def candidate(weight=1.0, tokens=0, active=0, rr_pass=0.0) -> Candidate:
    return Candidate(weight=weight, num_pending_tokens=tokens, num_active_requests=active, rr_pass=rr_pass)


def pool(role: Role, policy: Policy, weights, max_failures=3) -> Pool:
    configs = tuple(InstanceConfig(url=f"http://10.0.0.{i}:8000", weight=w) for i, w in enumerate(weights))
    return Pool(role, policy, configs, max_failures, RouterMetrics())


def test_least_work_prefill_joins_the_queue_with_fewest_pending_tokens_per_weight():
    # 900 tokens on weight 1 vs 1500 on weight 2: 900+100 > (1500+100)/2, so the heavier one wins
    cands = [candidate(tokens=900), candidate(weight=2.0, tokens=1500)]
    assert choose(Policy.LEAST_WORK, Role.PREFILL, cands, num_prompt_tokens=100) == 1
    cands = [candidate(tokens=700), candidate(weight=2.0, tokens=1500)]
    assert choose(Policy.LEAST_WORK, Role.PREFILL, cands, num_prompt_tokens=100) == 0


def test_least_work_decode_counts_active_requests_not_tokens():
    cands = [candidate(tokens=10, active=3), candidate(tokens=10_000, active=1)]
    assert choose(Policy.LEAST_WORK, Role.DECODE, cands, num_prompt_tokens=5) == 1


def test_least_work_ties_fall_back_to_round_robin_order():
    cands = [candidate(rr_pass=2.0), candidate(rr_pass=1.0), candidate(rr_pass=3.0)]
    assert choose(Policy.LEAST_WORK, Role.DECODE, cands, num_prompt_tokens=1) == 1


def test_round_robin_ignores_load():
    cands = [candidate(active=50, tokens=9999, rr_pass=0.5), candidate(rr_pass=1.0)]
    assert choose(Policy.ROUND_ROBIN, Role.PREFILL, cands, num_prompt_tokens=1) == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=5))
def test_weighted_round_robin_splits_picks_in_proportion_to_weights(weights):
    p = pool(Role.PREFILL, Policy.ROUND_ROBIN, [float(w) for w in weights])
    rounds = 20
    picks = Counter(p.pick(1).url for _ in range(rounds * sum(weights)))
    assert [picks[i.url] for i in p.instances] == [rounds * w for w in weights]


def test_weighted_round_robin_interleaves_instead_of_bursting():
    p = pool(Role.DECODE, Policy.ROUND_ROBIN, [2.0, 1.0])
    order = [p.instances.index(p.pick(1)) for _ in range(6)]
    assert order.count(0) == 4 and all(order[k:k + 2] != [1, 1] for k in range(5))


def test_least_work_with_a_slow_instance_steers_load_by_weight():
    """Requests that never finish pile up in proportion to weights under least_work."""
    p = pool(Role.DECODE, Policy.LEAST_WORK, [3.0, 1.0])
    held = []
    for _ in range(40):
        instance = p.pick(10)
        ctx = p.track(instance, 10)
        ctx.__enter__()
        held.append(ctx)
    assert [i.num_active_requests for i in p.instances] == [30, 10]
    for ctx in held:
        ctx.__exit__(None, None, None)
    assert [i.num_active_requests for i in p.instances] == [0, 0]


def test_pool_ejects_after_consecutive_failures_and_a_success_resets_the_count():
    p = pool(Role.PREFILL, Policy.ROUND_ROBIN, [1.0, 1.0], max_failures=3)
    bad = p.instances[0]
    p.record_failure(bad, "x")
    p.record_failure(bad, "x")
    p.record_success(bad)
    p.record_failure(bad, "x")
    p.record_failure(bad, "x")
    assert not bad.ejected
    p.record_failure(bad, "x")
    assert bad.ejected
    assert {p.pick(1).url for _ in range(5)} == {p.instances[1].url}


def test_pool_skips_excluded_and_draining_instances_and_reports_none_when_empty():
    p = pool(Role.DECODE, Policy.LEAST_WORK, [1.0, 1.0])
    first, second = p.instances
    assert p.pick(1, exclude=frozenset({first.url})) is second
    p.drain(second.url)
    assert p.pick(1, exclude=frozenset({first.url})) is None


def test_pool_admin_errors_name_the_instance():
    p = pool(Role.DECODE, Policy.LEAST_WORK, [1.0])
    with pytest.raises(AdminError, match="already exists"):
        p.add(InstanceConfig(url=p.instances[0].url))
    with pytest.raises(AdminError, match="no decode instance http://nowhere:1"):
        p.remove("http://nowhere:1")


def test_a_new_instance_does_not_get_a_burst_under_round_robin():
    p = pool(Role.PREFILL, Policy.ROUND_ROBIN, [1.0, 1.0])
    for _ in range(100):
        p.pick(1)
    newcomer = p.add(InstanceConfig(url="http://10.0.0.9:8000"))
    picks = Counter(p.pick(1).url for _ in range(30))
    assert picks[newcomer.url] == 10


def test_readmission_needs_more_good_probes_after_each_ejection_in_a_row():
    p = pool(Role.DECODE, Policy.LEAST_WORK, [1.0], max_failures=2)
    (instance,) = p.instances
    probes_needed = []
    for _ in range(4):
        while not instance.ejected:
            p.record_failure(instance, "request failed")
        probes = 0
        while instance.ejected:
            p.record_probe(instance, ok=True, reason="")
            probes += 1
        probes_needed.append(probes)
        assert instance.consecutive_failures == 1  # probation: the next failure ejects again
    assert probes_needed == [1, 2, 4, 8]
    p.record_success(instance)
    p.record_failure(instance, "x")
    p.record_failure(instance, "x")
    p.record_probe(instance, ok=True, reason="")
    assert not instance.ejected  # a successful request cleared the history


def test_a_failed_probe_restarts_the_count_of_good_probes():
    p = pool(Role.DECODE, Policy.LEAST_WORK, [1.0], max_failures=1)
    (instance,) = p.instances
    for _ in range(3):
        p.record_failure(instance, "x")
        while instance.ejected:
            p.record_probe(instance, ok=True, reason="")
    p.record_failure(instance, "x")  # 4th ejection in a row: 8 good probes needed
    for ok in [True] * 7 + [False] + [True] * 7:
        p.record_probe(instance, ok=ok, reason="")
    assert instance.ejected
    p.record_probe(instance, ok=True, reason="")
    assert not instance.ejected
