"""vllm-hetero-pd: prefill/decode disaggregated vLLM serving across accelerator vendors.

Importing this package must stay cheap: vLLM loads the ``register`` entry point in every
process (API server, engine core, workers), so nothing here may import torch, vLLM or NIXL
at module level.
"""

__version__ = "0.1.0"


CONNECTOR_NAME = "HeteroNixlConnector"


def register() -> None:
    """vLLM ``general_plugins`` entry point: runs once in every vLLM process.

    Registers ``HeteroNixlConnector`` with vLLM's connector factory (lazily: the class is only
    imported when an engine is configured with it) and applies the opt-in NIXL progress delay
    and message-queue spin bound.
    """
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from vllm_hetero_pd.connector.mq_spin import apply_mq_nap_from_env
    from vllm_hetero_pd.transport.nixl_progress import apply_progress_delay_from_env

    if CONNECTOR_NAME not in KVConnectorFactory._registry:  # register_connector raises on duplicates
        KVConnectorFactory.register_connector(CONNECTOR_NAME, "vllm_hetero_pd.connector.connector", CONNECTOR_NAME)
    apply_progress_delay_from_env()
    apply_mq_nap_from_env()
