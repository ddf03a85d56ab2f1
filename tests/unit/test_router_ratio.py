"""The ratio controller's pure parts: the split decision with its hysteresis (``router/ratio.py``),
the workload window (``router/window.py``) and capacities from the planner's model (``router/capacity.py``)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_hetero_pd.router.capacity import CapacityModel
from vllm_hetero_pd.router.config import ConfigError, InstanceConfig, PoolConfig, RatioConfig, Role, RouterConfig
from vllm_hetero_pd.router.ratio import (
    Action,
    Flip,
    Mixed,
    Observation,
    Pinned,
    RoleCapacity,
    State,
    current_load,
    decide,
    desired_replicas,
    split_load,
)
from vllm_hetero_pd.router.window import WorkloadWindow

CONFIG = RatioConfig(model="llama-3.1-8b", device="H100", min_requests=5, hold_s=10, cooldown_s=30, min_gain=0.1)
NO_PINNED = Pinned(num_prefill=0, num_decode=0, capacity=RoleCapacity(prefill=0.0, decode=0.0))
SAME = RoleCapacity(prefill=10.0, decode=10.0)
BUSY = Observation(rate=8.0, isl=1000, osl=100, num_requests=100)


def mixed(*roles: Role, capacity: RoleCapacity = SAME, draining: int | None = None) -> list[Mixed]:
    return [Mixed(url=f"http://m{i}:8000", capacity=capacity, role=role, draining=i == draining)
            for i, role in enumerate(roles)]


P, D = Role.PREFILL, Role.DECODE
# a prefill-heavy workload: instances prefill 4 req/s and decode 40
PREFILL_HEAVY = RoleCapacity(prefill=4.0, decode=40.0)


def run(states_and_times, observed, pinned, instances, config=CONFIG):
    """Decide at each time in turn, carrying the state; the decisions."""
    state, out = State(), []
    for now in states_and_times:
        state, decision = decide(now, observed, pinned, instances, state, config)
        out.append(decision)
    return out


def test_a_prefill_heavy_workload_moves_a_decode_to_prefill_after_the_hold():
    instances = mixed(P, D, D, capacity=PREFILL_HEAVY)
    first, confirming, flip = run([0.0, 5.0, 10.0], BUSY, NO_PINNED, instances)
    assert first.action is confirming.action is Action.CONFIRMING
    assert flip.action is Action.FLIP and flip.flip.to_role is P and flip.flip.url in {"http://m1:8000", "http://m2:8000"}
    assert flip.best_num_prefill == 2 and flip.best_load < flip.load


def test_no_flip_while_an_instance_drains_and_the_proposal_survives_the_drain():
    instances = mixed(P, D, D, capacity=PREFILL_HEAVY, draining=0)
    state = State()
    for now in (0.0, 20.0, 40.0):
        state, decision = decide(now, BUSY, NO_PINNED, instances, state, CONFIG)
        assert decision.action is Action.DRAINING and decision.flip is None
    drained = mixed(P, D, D, capacity=PREFILL_HEAVY)
    _, decision = decide(41.0, BUSY, NO_PINNED, drained, state, CONFIG)
    assert decision.action is Action.FLIP  # held since t=0, so it flips as soon as the drain is over


def test_cooldown_after_a_flip():
    config = RatioConfig(model="x", device="H100", min_requests=1, hold_s=0, cooldown_s=30)
    state, flip = decide(0.0, BUSY, NO_PINNED, mixed(D, D, D, D, capacity=PREFILL_HEAVY), State(), config)
    assert flip.action is Action.FLIP
    after = mixed(P, D, D, D, capacity=PREFILL_HEAVY)  # the flip done, still short of prefill
    state, decision = decide(29.0, BUSY, NO_PINNED, after, state, config)
    assert decision.action is Action.COOLDOWN
    _, decision = decide(30.0, BUSY, NO_PINNED, after, state, config)
    assert decision.action is Action.FLIP


def test_a_workload_that_changes_faster_than_hold_s_never_flips():
    """Hysteresis: prefill-heavy and decode-heavy alternate every 5 s; hold_s is 10 s."""
    decode_heavy = RoleCapacity(prefill=40.0, decode=4.0)
    state = State()
    for step in range(20):
        capacity = PREFILL_HEAVY if step % 2 else decode_heavy
        state, decision = decide(step * 5.0, BUSY, NO_PINNED, mixed(P, D, capacity=capacity), state, CONFIG)
        assert decision.flip is None, decision


def test_a_small_gain_is_not_worth_a_flip():
    """2 prefill : 2 decode at 4.4 vs 4.0 per instance: 3:1 would lower the load by < min_gain."""
    capacity = RoleCapacity(prefill=4.0, decode=4.4)
    decisions = run([0.0, 100.0], Observation(rate=7.0, isl=1, osl=1, num_requests=50), NO_PINNED,
                    mixed(P, P, D, D, capacity=capacity))
    assert all(d.action in (Action.BALANCED, Action.NO_GAIN) for d in decisions)


def test_too_few_requests_in_the_window_hold():
    _, decision = decide(100.0, Observation(rate=1.0, isl=10, osl=10, num_requests=4), NO_PINNED,
                         mixed(P, D, D, capacity=PREFILL_HEAVY), State(), CONFIG)
    assert decision.action is Action.NO_DATA


def test_no_capacity_under_the_slo_is_infeasible():
    _, decision = decide(100.0, BUSY, NO_PINNED, mixed(P, D, capacity=RoleCapacity(prefill=0.0, decode=5.0)),
                         State(), CONFIG)
    assert decision.action is Action.INFEASIBLE and decision.flip is None


def test_pinned_capacity_counts_and_a_role_is_never_left_empty():
    """One pinned decode; the only mixed instance may prefill (the decode role is never empty)."""
    pinned = Pinned(num_prefill=0, num_decode=1, capacity=RoleCapacity(prefill=0.0, decode=40.0))
    decisions = run([0.0, 10.0], BUSY, pinned, mixed(P, capacity=PREFILL_HEAVY))
    assert decisions[-1].action is Action.BALANCED
    # without the pinned decode the lone mixed instance must stay where it is
    decisions = run([0.0, 10.0], BUSY, NO_PINNED, mixed(P, capacity=PREFILL_HEAVY))
    assert decisions[-1].action is Action.BALANCED and decisions[-1].flip is None


roles = st.lists(st.sampled_from([P, D]), min_size=2, max_size=6)
rates = st.floats(0.1, 50.0)
caps = st.builds(RoleCapacity, prefill=st.floats(0.5, 50.0), decode=st.floats(0.5, 50.0))


@settings(max_examples=200, deadline=None)
@given(roles, rates, caps)
def test_the_best_split_is_the_best_of_every_split_for_identical_instances(assigned, rate, capacity):
    instances = mixed(*assigned, capacity=capacity)
    config = RatioConfig(model="x", device="H100", min_requests=1, hold_s=0, cooldown_s=0, min_gain=0)
    _, decision = decide(0.0, Observation(rate=rate, isl=1, osl=1, num_requests=10), NO_PINNED, instances,
                         State(), config)
    every = [split_load(rate, capacity.prefill * k, capacity.decode * (len(assigned) - k))
             for k in range(1, len(assigned))]
    assert decision.best_load == pytest.approx(min(every))
    if decision.flip is not None:  # one step towards the best never raises the load
        after = [Mixed(url=m.url, capacity=m.capacity, role=decision.flip.to_role if m.url == decision.flip.url
                       else m.role) for m in instances]
        assert current_load(rate, NO_PINNED, after) <= decision.load + 1e-9


@settings(max_examples=200, deadline=None)
@given(roles, rates, st.lists(caps, min_size=6, max_size=6), st.integers(0, 5), st.floats(0, 1000))
def test_nothing_flips_while_any_instance_drains(assigned, rate, capacities, draining, now):
    instances = [Mixed(url=f"http://m{i}:1", capacity=capacities[i], role=r, draining=i == draining % len(assigned))
                 for i, r in enumerate(assigned)]
    config = RatioConfig(model="x", device="H100", min_requests=1, hold_s=0, cooldown_s=0, min_gain=0)
    _, decision = decide(now, Observation(rate=rate, isl=1, osl=1, num_requests=10), NO_PINNED, instances,
                         State(proposed=P, proposed_since_s=-1e9), config)
    assert decision.flip is None


@settings(max_examples=100, deadline=None)
@given(roles, rates, st.lists(caps, min_size=6, max_size=6))
def test_a_flip_never_empties_a_role(assigned, rate, capacities):
    instances = [Mixed(url=f"http://m{i}:1", capacity=capacities[i], role=r) for i, r in enumerate(assigned)]
    config = RatioConfig(model="x", device="H100", min_requests=1, hold_s=0, cooldown_s=0, min_gain=0)
    _, decision = decide(0.0, Observation(rate=rate, isl=1, osl=1, num_requests=10), NO_PINNED, instances, State(),
                         config)
    after = [decision.flip.to_role if decision.flip and m.url == decision.flip.url else m.role for m in instances]
    if P in assigned and D in assigned:
        assert P in after and D in after


def test_unlike_instances_swap_roles_one_safe_flip_at_a_time():
    """A fast prefiller decoding and a fast decoder prefilling: the best split swaps them. Alone,
    either flip would empty a role (blocked); next to a pinned decode, a goes first, then b."""
    a = Mixed(url="http://a:1", capacity=RoleCapacity(prefill=20.0, decode=2.0), role=D)
    b = Mixed(url="http://b:1", capacity=RoleCapacity(prefill=2.0, decode=20.0), role=P)
    config = RatioConfig(model="x", device="H100", min_requests=1, hold_s=0, cooldown_s=0)
    observed = Observation(rate=5.0, isl=1, osl=1, num_requests=10)
    _, decision = decide(0.0, observed, NO_PINNED, [a, b], State(), config)
    assert decision.best_load == pytest.approx(0.25) and decision.load == pytest.approx(2.5)
    assert decision.action is Action.BLOCKED and decision.flip is None
    pinned = Pinned(num_prefill=0, num_decode=1, capacity=RoleCapacity(prefill=0.0, decode=1.0))
    _, first = decide(0.0, observed, pinned, [a, b], State(), config)
    assert first.flip == Flip(url="http://a:1", to_role=P)
    a_moved = Mixed(url=a.url, capacity=a.capacity, role=P)
    _, second = decide(1.0, observed, pinned, [a_moved, b], State(), config)
    assert second.flip == Flip(url="http://b:1", to_role=D)


@pytest.mark.parametrize("rate,capacity,expected", [(0.0, 10.0, 1), (10.0, 10.0, 2), (8.0, 10.0, 1),
                                                    (8.4, 10.0, 2), (100.0, 0.0, 64), (1e6, 1.0, 64)])
def test_desired_replicas_cover_the_rate_with_headroom(rate, capacity, expected):
    assert desired_replicas(rate, capacity, RatioConfig(model="x", headroom=0.2)) == expected


def test_the_window_reports_rate_and_means_over_its_length():
    window = WorkloadWindow(window_s=10.0, started_s=0.0)
    assert window.observe(0.0).num_requests == 0
    for t in range(20):
        window.add(float(t), 100 + t, 10)
    early = WorkloadWindow(window_s=10.0, started_s=0.0)
    early.add(1.0, 50, 5)
    assert early.observe(2.0).rate == pytest.approx(0.5)  # over the 2 s since start, not the 10 s window
    observed = window.observe(19.5)
    assert observed.num_requests == 10 and observed.rate == pytest.approx(1.0)
    assert observed.isl == pytest.approx(sum(100 + t for t in range(10, 20)) / 10) and observed.osl == 10


def test_capacities_follow_the_planner_model_and_the_workload():
    model = CapacityModel(RatioConfig(model="llama-3.1-8b", device="H100", ttft_ms=2000, tpot_ms=50))
    instance = InstanceConfig(url="http://a:1")
    prefill_heavy, decode_heavy = model.capacity(instance, 4096, 64), model.capacity(instance, 128, 1024)
    assert prefill_heavy.prefill < prefill_heavy.decode and decode_heavy.prefill > decode_heavy.decode
    assert model.capacity(InstanceConfig(url="http://b:1", device="H100", tp=2), 4096, 64).prefill > \
        prefill_heavy.prefill
    assert math.isclose(model.price_per_hour(InstanceConfig(url="http://b:1", tp=2)),
                        2 * model.price_per_hour(instance))


def test_capacity_model_errors_name_the_key():
    with pytest.raises(ConfigError, match="ratio: model 'no-such-model' is neither a preset"):
        CapacityModel(RatioConfig(model="no-such-model", device="H100"))
    with pytest.raises(ConfigError, match="instance http://a:1: unknown device 'Z80'"):
        CapacityModel(RatioConfig(model="llama-3.1-8b", device="H100")).check(
            (InstanceConfig(url="http://a:1", device="Z80"),))


def test_router_config_checks_the_ratio_section():
    decode = PoolConfig(instances=(InstanceConfig(url="http://d:1"),))
    with pytest.raises(ConfigError, match="instance http://d:1: the ratio controller needs its device"):
        RouterConfig(decode=decode, ratio=RatioConfig(model="llama-3.1-8b"))
    with pytest.raises(ConfigError, match="ratio.initial_prefill must be between 0 and the 0 mixed"):
        RouterConfig(decode=decode, ratio=RatioConfig(model="m", device="H100", initial_prefill=1))
    with pytest.raises(ConfigError, match=r"ratio.min_gain must be in \[0, 1\)"):
        RatioConfig(model="m", min_gain=1.0)
    with pytest.raises(ConfigError, match="ratio needs 0 <= min_replicas <= max_replicas"):
        RatioConfig(model="m", min_replicas=5, max_replicas=2)
    # mixed instances alone make a router
    RouterConfig(mixed=(InstanceConfig(url="http://m:1"),), local_prefill_fallback=False)
