"""``bench prefix``'s router configurations: one kv_aware row per prefix weight and local-prefill threshold,
the others unchanged."""

from __future__ import annotations

import argparse

from vllm_hetero_pd.launch.bench_routing import (
    PrefixVariant,
    add_arguments,
    arrival_order,
    prefix_router_config,
    prefix_table,
    prefix_variants,
)
from vllm_hetero_pd.router.config import DEFAULT_MIN_DISAGG_TOKENS, Policy, ScoringConfig


def parsed(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_one_kv_aware_run_per_prefix_weight_and_threshold_and_the_defaults_alone():
    default = PrefixVariant("kv_aware", ScoringConfig().prefix_weight, DEFAULT_MIN_DISAGG_TOKENS)
    assert prefix_variants(parsed()) == [PrefixVariant("round_robin"), PrefixVariant("least_work"), default]
    argv = ("--prefix-weights", "1", "2", "--min-disagg-tokens", "0", "128", "--policies", "least_work", "kv_aware")
    assert prefix_variants(parsed(*argv)) == [
        PrefixVariant("least_work"), PrefixVariant("kv_aware", 1.0, 0), PrefixVariant("kv_aware", 1.0, 128),
        PrefixVariant("kv_aware", 2.0, 0), PrefixVariant("kv_aware", 2.0, 128)]


def test_a_variant_is_labelled_by_the_knobs_it_sets():
    assert PrefixVariant("least_work").label == "least_work"
    assert PrefixVariant("kv_aware", 1.0, 0).label == "kv_aware (prefix_weight 1)"
    assert PrefixVariant("kv_aware", 2.5, 128).label == "kv_aware (prefix_weight 2.5, min_disagg_tokens 128)"


def test_the_config_names_the_instances_their_events_and_the_knobs(tmp_path):
    config = prefix_router_config(["http://p:1,kv_events=tcp://p:2,kv_events_replay=tcp://p:3"], ["http://d:4"],
                                  PrefixVariant("kv_aware", 2.5, 128), str(tmp_path))
    assert config.prefill.policy is Policy.KV_AWARE and config.scoring.prefix_weight == 2.5
    assert config.min_disagg_tokens == 128
    assert config.prefill.instances[0].kv_events == "tcp://p:2" and config.decode.instances[0].url == "http://d:4"
    assert config.tokenizer == str(tmp_path)
    plain = prefix_router_config(["http://p:1"], ["http://d:4"], PrefixVariant("least_work"), str(tmp_path))
    assert plain.prefill.policy is Policy.LEAST_WORK and plain.scoring == ScoringConfig()
    assert plain.min_disagg_tokens == 0


def test_the_prefix_table_gives_medians_over_rounds_and_kv_aware_against_least_work_per_round():
    def row(policy: str, number: int, computed: float, p50: float) -> dict:
        return {"policy": policy, "round": number, "requests": 108, "hit_rate": 0.8,
                "prefill_tokens_computed": computed, "decode_tokens_computed": number, "local_prefills": 0,
                "ttft_p50_ms": p50, "ttft_p90_ms": 2 * p50,
                "ttft_mean_ms": p50 + 10, "mismatches": 0,
                "prefills": [{"calls": 54 + number, "mean_ms": p50 / 2}, {"calls": 54 - number, "mean_ms": p50 / 4}]}

    rows = [row("least_work", 1, 20000, 400), row("kv_aware (prefix_weight 1)", 1, 12000, 300),
            row("kv_aware (prefix_weight 1)", 2, 14000, 500), row("least_work", 2, 21000, 450),
            row("least_work", 3, 19000, 420), row("kv_aware (prefix_weight 1)", 3, 13000, 410)]
    lines = prefix_table(rows)
    assert lines[0] == "3 round(s); each cell is the median (min-max) over rounds."
    assert ("| least_work | 108 | 0.800 (0.800-0.800) | 20000 (19000-21000) | 2 (1-3) (0) | 420.0 (400.0-450.0) | "
            "840.0 (800.0-900.0) | 430.0 (410.0-460.0) | 56 (210) / 52 (105) | 0 |") in lines
    assert lines[-1] == ("\nkv_aware (prefix_weight 1) / least_work, per round: prefill tokens computed 0.600, 0.667, "
                         "0.684 (goal <= 0.70); TTFT p50 0.75, 1.11, 0.98 (goal < 1)")


def test_each_turn_arrives_in_its_own_seeded_order_the_same_for_every_policy():
    orders = [arrival_order(12, t, shuffle=True) for t in range(4)]
    assert all(sorted(o) == list(range(12)) for o in orders)
    assert orders == [arrival_order(12, t, shuffle=True) for t in range(4)]
    assert len({tuple(o) for o in orders}) > 1 and orders[0] != list(range(12))
    assert arrival_order(12, 3, shuffle=False) == list(range(12))
