"""vllm-hetero-pd: prefill/decode disaggregated vLLM serving across accelerator vendors.

Importing this package must stay cheap: vLLM loads the ``register`` entry point in every
process (API server, engine core, workers), so nothing here may import torch, vLLM or NIXL
at module level.
"""

__version__ = "0.1.0"


def register() -> None:
    """vLLM ``general_plugins`` entry point: runs once in every vLLM process."""
    from vllm_hetero_pd.launch.nixl_progress import apply_progress_delay_from_env

    apply_progress_delay_from_env()
