"""Small helpers shared by the end-to-end tests that drive real P/D engines directly."""

from __future__ import annotations

import time

import pytest

from vllm_hetero_pd.launch.request import RequestFailed, post_json, prefill_body
from vllm_hetero_pd.testing.compare import greedy_body
from vllm_hetero_pd.testing.metrics import metric_sum, scrape


def kv_usage(url: str) -> float:
    return metric_sum(scrape(url), "vllm:kv_cache_usage_perc")


def prefilled(prefill_url: str, prompt: list[int], request_id: str) -> dict:
    """Run the prefill leg alone and return its ``kv_transfer_params``."""
    answer = post_json(prefill_url + "/v1/completions", prefill_body(greedy_body(prompt)), request_id, 120)
    return answer["kv_transfer_params"]


def decode_fails(decode_url: str, prompt: list[int], params: dict) -> str:
    """Send a decode request that must fail; return what the client was told."""
    with pytest.raises(RequestFailed) as err:
        post_json(decode_url + "/v1/completions", {**greedy_body(prompt), "kv_transfer_params": params}, "bad", 60)
    return err.value.body


def wait_until(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return predicate()


def log_of(instance) -> str:
    return instance.log_path.read_text(errors="replace")


LOAD_COUNTERS = {"transfers": "vllm:hetero_pd_transfer_seconds_count",
                 "failed_loads": "vllm:hetero_pd_failed_loads_total",
                 "translate_s": "vllm:hetero_pd_translate_seconds_sum"}


def load_counters(decode_url: str) -> dict[str, float]:
    """A decode's cumulative KV-loading counters: prompt tokens by source and the connector's loads."""
    samples = scrape(decode_url)
    counters = {key: metric_sum(samples, name) for key, name in LOAD_COUNTERS.items()}
    for source in ("local_compute", "local_cache_hit", "external_kv_transfer"):
        counters[source] = metric_sum(samples, "vllm:prompt_tokens_by_source_total", source=source)
    return counters


def counted(decode_url: str, run):
    """``run()`` and what it added to the decode's counters: tests sharing one decode see only their own."""
    before = load_counters(decode_url)
    result = run()
    after = load_counters(decode_url)
    return result, {key: after[key] - before[key] for key in after}
