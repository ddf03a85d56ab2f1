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
