"""Test fixtures that tests, the demo and the benchmarks share: tiny models, prompts, comparisons."""
