"""Shared fixtures for tests that start real vLLM CPU engines.

Engines are expensive (about 45-60 s each on 2 cores), so the monolithic reference for a model
is computed once per session and shared by every end-to-end test that compares against it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_hetero_pd.testing.compare import Completion, reference_completions
from vllm_hetero_pd.testing.prompts import make_prompts
from vllm_hetero_pd.testing.tiny_model import build_tiny_model

MODEL, DTYPE = "llama-gqa-d32", "float32"


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
