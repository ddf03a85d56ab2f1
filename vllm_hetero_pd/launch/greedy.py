"""Greedy completions from live instances: what ``testing.compare`` then compares.

These helpers drive running servers (a ``LocalCluster`` for the monolithic reference, plain
HTTP for the rest), so they live in ``launch``; the comparison itself is pure and lives in
``testing.compare``, which therefore never imports ``launch``.
"""

from __future__ import annotations

from pathlib import Path

from vllm_hetero_pd.launch.cluster import LocalCluster
from vllm_hetero_pd.launch.instance import InstanceSpec
from vllm_hetero_pd.launch.request import disaggregated_request, post_json
from vllm_hetero_pd.testing.compare import Completion, greedy_body, parse_completion


def run_greedy(url: str, prompts: list[list[int]], max_tokens: int = 32) -> list[Completion]:
    """One request per prompt, sequentially, so that batch composition cannot change the numerics."""
    return [parse_completion(post_json(url + "/v1/completions", greedy_body(p, max_tokens), f"ref-{i}", 300))
            for i, p in enumerate(prompts)]


def run_disaggregated(prefill_url: str, decode_url: str, prompts: list[list[int]],
                      max_tokens: int = 32) -> list[Completion]:
    """The same requests as ``run_greedy``, each prefilled on one instance and decoded on another."""
    return [parse_completion(disaggregated_request(prefill_url, decode_url, greedy_body(p, max_tokens)))
            for p in prompts]


def reference_completions(model_dir: str, prompts: list[list[int]], log_dir: Path, max_tokens: int = 32,
                          python: str | None = None, block_size: int | None = None) -> list[Completion]:
    """Greedy completions of a monolithic engine (no connector) on the same model: the ground truth.
    ``python`` picks the environment (the vLLM release) it runs in."""
    spec = InstanceSpec(role="monolithic", model=model_dir, python=python, block_size=block_size)
    with LocalCluster([spec], log_dir) as cluster:
        return run_greedy(cluster.instances[0].url, prompts, max_tokens)
