"""Shared fixtures for tests that start real vLLM CPU engines.

Engines are expensive (about 45-60 s each on 2 cores), so the monolithic reference for a model
is computed once per session and shared by every end-to-end test that compares against it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_hetero_pd.launch.cluster import LocalCluster
from vllm_hetero_pd.launch.greedy import reference_completions
from vllm_hetero_pd.launch.instance import InstanceSpec
from vllm_hetero_pd.launch.instance import hetero_kv_config as hetero
from vllm_hetero_pd.testing.compare import Completion
from vllm_hetero_pd.testing.prompts import make_prompts
from vllm_hetero_pd.testing.tiny_model import build_tiny_model

MODEL, DTYPE = "llama-gqa-d32", "float32"  # on disk; vLLM's CPU backend runs it in bfloat16
LEASE_S = 4.0  # short, so that lease expiry is observable in tests




@pytest.fixture(scope="session")
def tiny_model() -> str:
    return str(build_tiny_model(MODEL, DTYPE))


@pytest.fixture(scope="session")
def prompts(tiny_model) -> list[list[int]]:
    """Eight prompts of 50-900 tokens that cross block boundaries of 16, 32 and 128."""
    return make_prompts(tiny_model)


@pytest.fixture(scope="session")
def reference(tiny_model, prompts, tmp_path_factory) -> list[Completion]:
    return reference_completions(tiny_model, prompts, tmp_path_factory.mktemp("monolithic"))


@pytest.fixture
def log_dir(tmp_path) -> Path:
    return tmp_path / "logs"


@pytest.fixture(scope="session")
def hetero_cluster(tiny_model, tmp_path_factory):
    """A prefill with a short lease, a decode on the same model, and a decode whose model has a
    different head size (an incompatible peer); shared by the failure and router tests."""
    other = str(build_tiny_model("llama-gqa-d64", DTYPE))
    specs = [InstanceSpec(role="prefill", model=tiny_model,
                          kv_transfer_config=hetero("kv_producer", {"lease_s": LEASE_S, "heartbeat_s": 1.0})),
             InstanceSpec(role="decode", model=tiny_model, kv_transfer_config=hetero("kv_consumer")),
             InstanceSpec(role="decode", model=other, kv_transfer_config=hetero("kv_consumer"))]
    with LocalCluster(specs, tmp_path_factory.mktemp("hetero-cluster")) as running:
        yield running
