"""``kv_role: kv_both`` (issue 15): two HeteroNixlConnector instances that each prefill for the
other while decoding requests the other prefilled, at the same time.

Requests alternate direction (A prefills for B, B prefills for A) and run four at a time, so
each engine holds leases as a prefill while it READs as a decode. Every output must equal the
monolithic engine's, each decode must have loaded (not recomputed) its prompts, and once the
requests are done both engines' KV usage must return to 0 (every lease released).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from vllm_hetero_pd.launch.cluster import LocalCluster
from vllm_hetero_pd.launch.instance import InstanceSpec, hetero_kv_config
from vllm_hetero_pd.launch.request import disaggregated_request
from vllm_hetero_pd.testing.compare import LOGPROB_TOLERANCE, compare, greedy_body, parse_completion
from vllm_hetero_pd.testing.metrics import metric_sum, prompt_tokens_by_source, scrape

from pd_helpers import kv_usage, wait_until

pytestmark = pytest.mark.engine


def test_two_kv_both_instances_prefill_for_each_other_while_decoding(tiny_model, prompts, reference, log_dir):
    kv = hetero_kv_config("kv_both", {"lease_s": 60.0})
    spec = InstanceSpec(role="both", model=tiny_model, kv_transfer_config=kv)
    with LocalCluster([spec, spec], log_dir) as cluster:
        a, b = cluster.instances
        pairs = [(a, b) if i % 2 == 0 else (b, a) for i in range(len(prompts))]
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda i: disaggregated_request(pairs[i][0].url, pairs[i][1].url,
                                                                    greedy_body(prompts[i])), range(len(prompts))))
        got = [parse_completion(answer) for answer in answers]
        drained = wait_until(lambda: kv_usage(a.url) == 0 and kv_usage(b.url) == 0, 30)
        usage = (kv_usage(a.url), kv_usage(b.url))
        loaded = {inst.name: metric_sum(scrape(inst.url), "vllm:hetero_pd_transfer_seconds_count") for inst in (a, b)}
        sources = {inst.name: prompt_tokens_by_source(inst.url) for inst in (a, b)}

    assert compare(reference, got, LOGPROB_TOLERANCE) == []
    assert drained, f"KV usage did not return to 0 (leases or loads leaked): {usage}"
    per_side = len(prompts) // 2
    assert loaded == {a.name: per_side, b.name: per_side}, loaded
    # as a decode each computed at most one prompt token per request it decoded; the rest it prefilled
    for inst, decoded in ((a, prompts[1::2]), (b, prompts[0::2])):
        prefilled = prompts[0::2] if inst is a else prompts[1::2]
        assert sources[inst.name]["local_compute"] <= sum(map(len, prefilled)) + len(decoded), sources
        assert sources[inst.name]["external_kv_transfer"] >= sum(map(len, decoded)) - len(decoded), sources
