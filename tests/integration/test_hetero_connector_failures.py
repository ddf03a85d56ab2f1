"""Bad input against real engines: every failure is fast, named, leaks no blocks, and the servers stay up.

Uses the session's ``hetero_cluster``: one prefill (short lease) and two decodes, one on the same
model and one on a model with a different head size (an incompatible peer). Each bad request must
fail on its own while the next good request still matches the monolithic output.
"""

from __future__ import annotations

import time

import pytest

from vllm_hetero_pd.launch.greedy import run_disaggregated
from vllm_hetero_pd.testing.compare import LOGPROB_TOLERANCE, compare
from vllm_hetero_pd.testing.metrics import metric_sum, scrape

from pd_helpers import decode_fails, kv_usage, log_of, prefilled, wait_until


@pytest.fixture
def cluster(hetero_cluster):
    return hetero_cluster


@pytest.fixture
def lease_s(hetero_cluster) -> float:
    return hetero_cluster.instances[0].spec.kv_transfer_config["kv_connector_extra_config"]["lease_s"]


BAD_PARAMS = {
    "wrong types": lambda p: {**p, "remote_block_ids": "all of them", "remote_port": "x"},
    "missing fields": lambda p: {"do_remote_prefill": True},
    "unknown engine id": lambda p: {**p, "remote_engine_id": "no-such-engine"},
    "foreign block ids": lambda p: {**p, "remote_block_ids": [b + 1 for b in p["remote_block_ids"]]},
    "out-of-range block ids": lambda p: {**p, "remote_block_ids": [10**7 + b for b in p["remote_block_ids"]]},
    "moved side channel": lambda p: {**p, "remote_port": 1},
    "unreachable side channel": lambda p: {**p, "remote_port": 1, "remote_engine_id": "engine-nobody-runs"},
}
EXPECTED_LOG = {
    "wrong types": "malformed kv_transfer_params",
    "missing fields": "malformed kv_transfer_params",
    "unknown engine id": "belongs to engine",
    "foreign block ids": "are not leased to request",
    "out-of-range block ids": "outside the prefill's",
    "moved side channel": "but it was handshaken at",
    "unreachable side channel": "unreachable or timed out",
}


@pytest.mark.parametrize("case", list(BAD_PARAMS))
def test_bad_transfer_params_fail_cleanly(case, cluster, prompts, lease_s):
    prefill, decode, _ = cluster.instances
    params = prefilled(prefill.url, prompts[0], f"bad-{case}")
    start = time.monotonic()
    decode_fails(decode.url, prompts[0], BAD_PARAMS[case](params))
    assert time.monotonic() - start < 30, "a bad request must fail fast"
    assert EXPECTED_LOG[case] in log_of(cluster.instances[1])
    assert decode.is_healthy()
    # nothing leaks: the decode's blocks are free again; the prefill's after release or lease expiry
    assert wait_until(lambda: kv_usage(decode.url) == 0.0, 10), kv_usage(decode.url)
    assert wait_until(lambda: kv_usage(prefill.url) == 0.0, lease_s + 10), kv_usage(prefill.url)


def test_expired_lease_is_refused_and_blocks_are_freed(cluster, prompts, lease_s):
    """A decode that comes too late (or died) must not read reused blocks; the prefill frees them."""
    prefill, decode, _ = cluster.instances
    params = prefilled(prefill.url, prompts[1], "late")
    assert kv_usage(prefill.url) > 0
    assert wait_until(lambda: kv_usage(prefill.url) == 0.0, lease_s + 10), "prefill kept blocks past the lease"
    decode_fails(decode.url, prompts[1], params)
    assert "lease expired" in log_of(cluster.instances[1])
    assert wait_until(lambda: kv_usage(decode.url) == 0.0, 10)


def test_incompatible_peer_names_the_field(cluster, prompts, lease_s):
    prefill, _, other = cluster.instances
    params = prefilled(prefill.url, prompts[0], "incompatible")
    decode_fails(other.url, prompts[0], params)
    assert "head_size differs: source 32 vs destination 64" in log_of(cluster.instances[2])
    assert metric_sum(scrape(other.url), "vllm:hetero_pd_handshake_failures_total") >= 1
    assert other.is_healthy()
    assert wait_until(lambda: kv_usage(prefill.url) == 0.0, lease_s + 10)


def test_servers_still_serve_correctly_afterwards(cluster, prompts, reference):
    prefill, decode, _ = cluster.instances
    got = run_disaggregated(prefill.url, decode.url, prompts[:2])
    assert compare(reference[:2], got, LOGPROB_TOLERANCE) == []
