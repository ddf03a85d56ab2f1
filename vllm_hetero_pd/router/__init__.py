"""OpenAI-compatible prefill/decode router; imports neither vLLM nor torch (see docs/router.md)."""
