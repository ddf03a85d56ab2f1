"""``HeteroNixlConnector``: the vLLM-facing facade. It only forwards calls.

vLLM builds one instance per role: ``SCHEDULER`` in the engine core (see ``scheduler.py``) and
``WORKER`` in each worker (see ``worker.py``). The methods here exist with the same meaning in
every supported release; those that do not (``get_finished`` vs ``get_transfer_results``,
``has_pending_block_frees`` ...) come from the installed release's adapter
(``connector/adapters/``), mixed in ahead of vLLM's base class. Importing this module on an
unsupported vLLM raises ``UnsupportedVllmVersion`` with the supported releases.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
)

from vllm_hetero_pd.config import parse_config, with_kv_buffer_device
from vllm_hetero_pd.connector import adapters
from vllm_hetero_pd.connector.metadata import HeteroConnectorMetadata
from vllm_hetero_pd.connector.stats import HeteroConnectorStats, HeteroPromMetrics

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request


ADAPTER = adapters.load()  # this vLLM release's glue


class HeteroNixlConnector(ADAPTER.ConnectorAPI, KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config, role, kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        from vllm.platforms import current_platform

        config = with_kv_buffer_device(parse_config(transfer.kv_connector_extra_config), transfer.kv_buffer_device,
                                       current_platform.device_type)
        args = (vllm_config, config, transfer.engine_id, transfer.is_kv_producer, transfer.is_kv_consumer)
        self.scheduler = self.worker = None
        if role == KVConnectorRole.SCHEDULER:
            from vllm_hetero_pd.connector.scheduler import ConnectorScheduler

            self.scheduler = ConnectorScheduler(*args)
        else:
            from vllm_hetero_pd.connector.worker import ConnectorWorker

            self.worker = ConnectorWorker(*args)

    # ------------------------------------------------------------------ scheduler side
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request, block_ids)

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        self.scheduler.set_xfer_handshake_metadata(metadata)

    # ------------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register_kv_caches(kv_caches)

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        return self.worker.get_handshake_metadata()

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self.worker.start_load_kv(self._bound())

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads complete between steps (asynchronously), never inside a layer."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        """Readers pull whole requests after they finish; nothing is pushed per layer."""

    def wait_for_save(self) -> None:
        self.worker.wait_for_save(self._bound())

    # get_finished / get_transfer_results: in the adapter (the runner calls one or the other)
    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.get_block_ids_with_load_errors()

    def get_kv_connector_stats(self) -> HeteroConnectorStats | None:
        return self.worker.get_stats() if self.worker is not None else None

    def shutdown(self) -> None:
        for side in (self.scheduler, self.worker):
            if side is not None:
                side.shutdown()

    def _bound(self) -> HeteroConnectorMetadata:
        meta = self._get_connector_metadata() if self.has_connector_metadata() else None
        return meta if isinstance(meta, HeteroConnectorMetadata) else HeteroConnectorMetadata()

    # ------------------------------------------------------------------ class-level hooks
    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> HeteroConnectorStats:
        return HeteroConnectorStats(data=data) if data is not None else HeteroConnectorStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types, labelnames, per_engine_labelvalues):
        return HeteroPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
