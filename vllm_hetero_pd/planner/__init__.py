"""Deployment planner: which accelerators, TP degrees and instance counts serve a workload cheapest.

Pure Python on msgspec and numpy; it never imports torch or vLLM, so ``vllm-hetero-pd plan``
starts in a fraction of a second. Data flows one way:
``catalog`` + ``model`` + ``workload`` -> ``perf`` (per-instance capacity) -> ``search`` (plan)
-> ``report`` / ``emit`` (edges that print or write files).
"""
