"""``bench prefix``'s router configurations: one kv_aware row per prefix weight, the others unchanged."""

from __future__ import annotations

import argparse

from vllm_hetero_pd.launch.bench_routing import add_arguments, prefix_router_config, prefix_variants
from vllm_hetero_pd.router.config import Policy, ScoringConfig


def parsed(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_one_kv_aware_run_per_prefix_weight_and_the_default_alone():
    assert prefix_variants(parsed()) == [("round_robin", None), ("least_work", None),
                                         ("kv_aware", ScoringConfig().prefix_weight)]
    assert prefix_variants(parsed("--prefix-weights", "1", "2", "--policies", "least_work", "kv_aware")) == [
        ("least_work", None), ("kv_aware", 1.0), ("kv_aware", 2.0)]


def test_the_config_names_the_instances_their_events_and_the_weight(tmp_path):
    config = prefix_router_config(["http://p:1,kv_events=tcp://p:2,kv_events_replay=tcp://p:3"], ["http://d:4"],
                                  "kv_aware", 2.5, str(tmp_path))
    assert config.prefill.policy is Policy.KV_AWARE and config.scoring.prefix_weight == 2.5
    assert config.prefill.instances[0].kv_events == "tcp://p:2" and config.decode.instances[0].url == "http://d:4"
    assert config.tokenizer == str(tmp_path)
    plain = prefix_router_config(["http://p:1"], ["http://d:4"], "least_work", None, str(tmp_path))
    assert plain.prefill.policy is Policy.LEAST_WORK and plain.scoring == ScoringConfig()
