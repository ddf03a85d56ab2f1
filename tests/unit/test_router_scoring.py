"""The kv_aware scoring functions (router/scoring.py): pure, so tested without sockets."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_hetero_pd.router.config import PairRule, ScoringConfig
from vllm_hetero_pd.router.scoring import (
    DecodeCandidate,
    PrefillCandidate,
    best_prefill_for,
    choose_pair,
    decode_score,
    prefill_cost,
    transfer_seconds,
)

W = ScoringConfig()


def prefill(url="p0", weight=1.0, pending=0, cached=0, kv_format="", rr_pass=0.0):
    return PrefillCandidate(url=url, weight=weight, num_pending_tokens=pending, num_cached_tokens=cached,
                            kv_format=kv_format, rr_pass=rr_pass)


def decode(url="d0", weight=1.0, used=0, cached=0, capacity=None, waiting=0, transfer=None, translate=None,
           kv_format="", rr_pass=0.0):
    return DecodeCandidate(url=url, weight=weight, num_used_tokens=used, num_cached_tokens=cached,
                           capacity_tokens=capacity, num_waiting=waiting, transfer_s_per_token=transfer,
                           translate_s_per_token=translate, kv_format=kv_format, rr_pass=rr_pass)


def test_a_cached_prefix_beats_an_idle_instance_when_it_saves_more_than_the_queue_costs():
    warm, idle = prefill("warm", pending=300, cached=900), prefill("idle")
    decision = choose_pair([warm, idle], [decode()], 1000, 16, W)
    assert decision.prefill == 0  # 300 queued + 100 uncached < 1000 uncached


def test_a_long_queue_outweighs_a_small_cached_prefix():
    warm, idle = prefill("warm", pending=5000, cached=200), prefill("idle")
    assert choose_pair([warm, idle], [decode()], 1000, 16, W).prefill == 1


def test_prefix_weight_zero_is_least_work_and_higher_favours_the_cache():
    warm, idle = prefill("warm", pending=1200, cached=900), prefill("idle")
    assert choose_pair([warm, idle], [decode()], 1000, 16, ScoringConfig(prefix_weight=1.0)).prefill == 1
    assert choose_pair([warm, idle], [decode()], 1000, 16, ScoringConfig(prefix_weight=2.0)).prefill == 0
    assert choose_pair([warm, prefill("idle", pending=1199)], [decode()], 1000, 16,
                       ScoringConfig(prefix_weight=0.0)).prefill == 1


def test_with_nothing_cached_the_prefill_cost_is_least_work():
    assert prefill_cost(prefill(weight=2.0, pending=600), 400, W) == 500.0


@settings(max_examples=200, deadline=None)
@given(weights=st.lists(st.floats(0.25, 8.0), min_size=2, max_size=5), cached=st.integers(0, 900),
       prompt=st.integers(1000, 4000), num_requests=st.integers(50, 200))
def test_capacity_weights_are_honoured_under_equal_prefixes(weights, cached, prompt, num_requests):
    """Every instance caches the same prefix; work (prompt tokens queued) then splits by weight,
    within one request's worth per instance, as least_work does."""
    pending = [0] * len(weights)
    for _ in range(num_requests):
        candidates = [prefill(f"p{i}", w, pending[i], cached) for i, w in enumerate(weights)]
        chosen = choose_pair(candidates, [decode()], prompt, 16, W).prefill
        pending[chosen] += prompt - cached
    total, work = sum(weights), prompt - cached
    for p, w in zip(pending, weights):
        share = sum(pending) * w / total
        assert abs(p - share) <= work * (1 + len(weights)), (pending, weights)
    # normalised queues never differ by more than one request's work per unit of the smallest weight
    per_weight = [p / w for p, w in zip(pending, weights)]
    assert max(per_weight) - min(per_weight) <= work / min(weights) + 1e-6


@settings(max_examples=100, deadline=None)
@given(weights=st.lists(st.floats(0.25, 8.0), min_size=2, max_size=4), cached=st.integers(0, 500))
def test_an_idle_pool_with_equal_prefixes_goes_to_the_highest_weight(weights, cached):
    candidates = [prefill(f"p{i}", w, 0, cached) for i, w in enumerate(weights)]
    chosen = choose_pair(candidates, [decode()], 1000, 16, W).prefill
    # weights a float step apart (8.0, 7.999999999999999) tie once the decode cost is added
    assert weights[chosen] == pytest.approx(max(weights), rel=1e-9)


def test_equal_candidates_alternate_by_round_robin_pass():
    a, b = prefill("a", rr_pass=1.0), prefill("b", rr_pass=0.0)
    assert choose_pair([a, b], [decode()], 100, 16, W).prefill == 1


def test_a_decode_near_its_kv_limit_is_avoided_while_another_has_room():
    full = decode("full", used=800, capacity=1000)
    roomy = decode("roomy", used=5000, capacity=100000)
    decision = choose_pair([prefill()], [full, roomy], 300, 100, W)
    assert decision.decode == 1 and decision.decode_scores[0].over_watermark
    # a short request still fits in the small one (its cost is lower)
    assert choose_pair([prefill()], [full, roomy], 20, 10, W).decode == 0


def test_a_request_needing_more_than_max_request_kv_fraction_of_an_empty_decode_goes_to_a_bigger_one():
    """bench decode-capacity's small decode: 3072 KV tokens, a long request needs 2278 (74 %)."""
    small = decode("small", used=0, capacity=3072)
    large = decode("large", used=20000, capacity=200000)
    decision = choose_pair([prefill()], [small, large], 2214, 64, W)
    assert decision.decode == 1 and decision.decode_scores[0].over_watermark
    assert choose_pair([prefill()], [small, large], 160, 64, W).decode == 0  # a short one stays
    everything = ScoringConfig(max_request_kv_fraction=1.0)  # 1.0: only the watermark applies
    assert choose_pair([prefill()], [small, large], 2214, 64, everything).decode == 0


@given(needed=st.integers(1, 10_000), capacity=st.integers(1, 10_000),
       fraction=st.floats(0.01, 1.0, allow_nan=False))
def test_over_means_past_the_watermark_or_too_big_a_share(needed, capacity, fraction):
    weights = ScoringConfig(max_request_kv_fraction=fraction)
    score = decode_score(decode(capacity=capacity), needed, weights)
    assert score.over_watermark == (needed / capacity > weights.kv_high_watermark or needed > fraction * capacity)


def test_when_every_decode_is_over_the_watermark_the_least_loaded_one_is_chosen():
    a, b = decode("a", used=950, capacity=1000), decode("b", used=900, capacity=1000)
    assert choose_pair([prefill()], [a, b], 100, 10, W).decode == 1


def test_waiting_requests_count_against_a_decode():
    busy, calm = decode("busy", waiting=4), decode("calm", used=1000)
    assert choose_pair([prefill()], [busy, calm], 100, 10, W).decode == 1
    assert decode_score(busy, 100, W).cost == 100 + 4 * W.waiting_penalty_tokens


def test_an_incompatible_pair_is_never_chosen_even_when_it_is_cheapest():
    rules = (PairRule(prefill="fp8", decode="bf16", compatible=False),)
    cheap = prefill("cheap", kv_format="fp8")
    costly = prefill("costly", pending=100000, kv_format="bf16")
    decision = choose_pair([cheap, costly], [decode(kv_format="bf16")], 100, 10, W, rules)
    assert decision.prefill == 1
    assert all(s.prefill != 0 for s in decision.pairs)


def test_no_compatible_prefill_means_a_local_prefill_with_the_reason():
    rules = (PairRule(prefill="*", decode="d0", compatible=False),)
    decision = choose_pair([prefill()], [decode()], 100, 10, W, rules)
    assert decision.prefill is None and decision.local_reason == "no_compatible_prefill"
    assert choose_pair([], [decode()], 100, 10, W).local_reason == "no_prefill_instance"
    assert choose_pair([prefill()], [], 100, 10, W) is None


def test_the_pair_with_the_cheaper_transfer_wins_when_loads_are_equal():
    near, far = decode("near", transfer=1e-6), decode("far", transfer=1e-4)
    assert choose_pair([prefill()], [far, near], 2000, 10, W).decode == 1


def test_translation_is_paid_only_when_the_formats_differ():
    d = decode(kv_format="cpu", transfer=1e-5, translate=1e-4)
    assert transfer_seconds(prefill(kv_format="cpu"), d, 1000, ()) == 1000 * 1e-5
    assert transfer_seconds(prefill(kv_format="cuda"), d, 1000, ()) == 1000 * (1e-5 + 1e-4)
    # only the part the decode has not cached moves
    d_cached = decode(kv_format="cpu", transfer=1e-5, cached=600)
    assert transfer_seconds(prefill(kv_format="cpu"), d_cached, 1000, ()) == 400 * 1e-5


def test_a_rule_transfer_cost_replaces_the_measured_one():
    rules = (PairRule(prefill="p0", decode="*", transfer_ms_per_1k_tokens=50.0),)
    assert transfer_seconds(prefill(), decode(transfer=1.0), 2000, rules) == 0.1
    slow = (PairRule(prefill="slow", decode="*", transfer_ms_per_1k_tokens=500.0),)
    decision = choose_pair([prefill("slow"), prefill("fast", pending=100)], [decode()], 1000, 10, W, slow)
    assert decision.prefill == 1


def test_min_disagg_tokens_counts_the_part_the_decode_has_not_cached():
    warm = decode(cached=950)
    assert choose_pair([prefill()], [warm], 1000, 10, W, min_disagg_tokens=100).local_reason == "short_prompt"
    assert choose_pair([prefill()], [decode()], 1000, 10, W, min_disagg_tokens=100).prefill == 0
    assert choose_pair([prefill()], [decode()], 50, 10, W, min_disagg_tokens=100).local_reason == "short_prompt"


def test_best_prefill_for_a_chosen_decode_skips_incompatible_ones():
    rules = (PairRule(prefill="a", decode="*", compatible=False),)
    assert best_prefill_for(decode(), [prefill("a"), prefill("b", pending=10)], 100, W, rules) == 1
    assert best_prefill_for(decode(), [prefill("a")], 100, W, rules) is None
