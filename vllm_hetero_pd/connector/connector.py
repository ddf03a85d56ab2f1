"""``HeteroNixlConnector``: the vLLM-facing facade. It only checks versions and forwards calls.

vLLM builds one instance per role: ``SCHEDULER`` in the engine core (see ``scheduler.py``) and
``WORKER`` in each worker (see ``worker.py``). Everything vLLM-version-specific stays in this
file and the two role modules, so that supporting the next vLLM release is local work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)

from vllm_hetero_pd.config import parse_config
from vllm_hetero_pd.connector.metadata import HeteroConnectorMetadata
from vllm_hetero_pd.connector.stats import HeteroConnectorStats, HeteroPromMetrics
from vllm_hetero_pd.connector.version import check_vllm_version

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request


class HeteroNixlConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        check_vllm_version()
        super().__init__(vllm_config, role, kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        config = parse_config(transfer.kv_connector_extra_config)
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

    def has_pending_block_frees(self) -> bool:
        return self.scheduler is not None and self.scheduler.has_pending_sends()

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

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        return self.worker.get_transfer_results(self._bound())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        results = self.get_transfer_results(finished_req_ids)
        return results.finished_sending, results.finished_recving

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
