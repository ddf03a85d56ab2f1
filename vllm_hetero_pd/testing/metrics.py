"""Read a vLLM instance's Prometheus metrics: the proof that decode received KV instead of recomputing."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """All samples of ``url``/metrics keyed by (name, sorted labels)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        return parse_samples(resp.read().decode())


def parse_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of one Prometheus text page keyed by (name, sorted labels), as ``scrape`` returns them."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric_sum(samples: dict, name: str, **labels: str) -> float:
    """Sum of ``name`` over every label set that contains ``labels`` (e.g. across model names)."""
    want = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and want <= set(lbls))


def prompt_tokens_by_source(url: str) -> dict[str, float]:
    samples = scrape(url)
    return {src: metric_sum(samples, "vllm:prompt_tokens_by_source_total", source=src)
            for src in ("local_compute", "local_cache_hit", "external_kv_transfer")}
