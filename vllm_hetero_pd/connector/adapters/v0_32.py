"""vLLM 0.30-0.32: KV layout era C, the connector API with ``get_transfer_results``.

Differences from 0.28 that live here (file:line in ``docs/compatibility.md``):

* the model runner calls ``get_transfer_results`` and reads ``failed_recving`` from it;
* the scheduler asks ``has_pending_block_frees`` before it preempts;
* the layout is the engine-resolved ``KVCacheLayout`` on ``cache_config``;
* CPU_ATTN's metadata builder sets the kernel ISA on each attention layer.
"""

from __future__ import annotations

from typing import Any

ERA = "C"


class ConnectorAPI:
    """Release-specific methods of ``HeteroNixlConnector`` (mixed in ahead of ``KVConnectorBase_V1``)."""

    def get_transfer_results(self, finished_req_ids: set[str]) -> Any:
        # imported here: v0_29 borrows this module's layout functions on a release without it
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

        results = self.worker.get_transfer_results(self._bound())
        return KVConnectorTransferResults(finished_sending=results.finished_sending,
                                          finished_recving=results.finished_recving,
                                          failed_recving=results.failed_recving)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        results = self.get_transfer_results(finished_req_ids)
        return results.finished_sending, results.finished_recving

    def has_pending_block_frees(self) -> bool:
        """Blocks under a lease come back without preempting anyone: the scheduler may wait for them."""
        return self.scheduler is not None and self.scheduler.has_pending_sends()


def kv_cache_layout(vllm_config: Any, backend: Any) -> str:
    """The layout the engine core resolved (``VLLM_KV_CACHE_LAYOUT``, backends, connector)."""
    return vllm_config.cache_config.get_resolved_kv_cache_layout().name


def cpu_attn_isa(layer: Any) -> str:
    return layer.isa
