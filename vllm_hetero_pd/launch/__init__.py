"""Start and stop local vLLM instances for prefill/decode runs (tests, demo, benchmarks, planner scripts)."""
