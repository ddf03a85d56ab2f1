"""Worker side of HeteroNixlConnector: one per TP rank, in the process that owns the KV cache.

It describes the local cache as a ``KVFormat``, registers it (and the export area, if any) with
its own NIXL agent, publishes a ``RankInfo`` for the handshake, mirrors written blocks into the
export area (prefill), drives the ``Receiver`` (decode), and reports finished and failed
requests to vLLM.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from vllm_hetero_pd.config import ConnectorConfig
from vllm_hetero_pd.connector.control import ControlPlane
from vllm_hetero_pd.connector.detect import detect
from vllm_hetero_pd.connector.host_buffer import device_id_of, mem_type_of
from vllm_hetero_pd.connector.metadata import HeteroConnectorMetadata, RankHandshake, TransferResults
from vllm_hetero_pd.connector.receiver import LocalCache, Receiver
from vllm_hetero_pd.connector.sender import ExportArea
from vllm_hetero_pd.connector.stats import HeteroConnectorStats
from vllm_hetero_pd.log import get_logger
from vllm_hetero_pd.transport import wire
from vllm_hetero_pd.transport.block_layout import block_layout
from vllm_hetero_pd.transport.nixl_agent import NixlAgent

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = get_logger(__name__)


class ConnectorWorker:
    def __init__(self, vllm_config: VllmConfig, config: ConnectorConfig, engine_id: str,
                 is_producer: bool, is_consumer: bool):
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        self.vllm_config, self.config = vllm_config, config
        self.is_producer, self.is_consumer = is_producer, is_consumer
        self.tp_rank = get_tensor_model_parallel_rank()
        self.agent = NixlAgent(f"{engine_id}-tp{self.tp_rank}", config.backends, config.backend_params,
                               config.progress_delay_us)
        self.local: LocalCache | None = None
        self.export: ExportArea | None = None
        self.receiver: Receiver | None = None
        self.control: ControlPlane | None = None
        self.rank_infos: list[wire.RankInfo] = []
        self._num_failed = 0

    def register_kv_caches(self, kv_caches: Mapping[str, torch.Tensor]) -> None:
        fmt = detect(self.vllm_config, kv_caches)
        tensors = [t for entry in kv_caches.values() for t in (entry if isinstance(entry, tuple) else (entry,))]
        device = tensors[0].device
        mem_type, device_id = mem_type_of(device), device_id_of(device)
        storages = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in tensors}
        self.agent.register(sorted(storages), mem_type, device_id)
        parts = 2 if fmt.storage == "split" else 1
        layer_addrs = [[(e[p] if isinstance(e, tuple) else e).data_ptr() for e in kv_caches.values()]
                       for p in range(parts)]
        self.local = LocalCache(fmt, kv_caches, block_layout(fmt), layer_addrs, mem_type, device_id)
        exposed = [(fmt, layer_addrs)]
        if self.is_producer and self.config.exports:
            self.export = ExportArea(fmt, self.config, device)
            if self.config.host_staging:
                mem_type, device_id = "DRAM", 0
            for shard in self.export.shards:
                self.agent.register([(t.data_ptr(), t.nbytes) for t in shard.tensors], mem_type, device_id)
                block_layout(shard.format)  # refuse at start-up a format that NIXL cannot read per block
            exposed = [(shard.format, shard.layer_addrs) for shard in self.export.shards]
        if self.is_consumer:
            self.control = ControlPlane(self.config.handshake_timeout_s)
            self.receiver = Receiver(self.agent, self.config, self.local,
                                     self.vllm_config.parallel_config.tensor_parallel_size, self.control)
        metadata = self.agent.metadata()
        self.rank_infos = [wire.RankInfo(tp_rank=self.tp_rank * len(exposed) + i, agent_name=self.agent.name,
                                         agent_metadata=metadata, format=f, layer_addrs=addrs, mem_type=mem_type,
                                         device_id=device_id)
                           for i, (f, addrs) in enumerate(exposed)]
        logger.info("HeteroNixlConnector rank %d: native format %s (block %d, %d heads from %d, %s) in %s%s%s",
                    self.tp_rank, fmt.name, fmt.block_size, fmt.num_heads, fmt.head_start, fmt.dtype,
                    self.local.mem_type, ", host staging on" if self.config.host_staging else "",
                    f", exporting {exposed[0][0].name} block {exposed[0][0].block_size} as {len(exposed)} rank(s) "
                    f"in {mem_type}" if self.export else "")

    def get_handshake_metadata(self) -> RankHandshake | None:
        return RankHandshake([wire.encode(info) for info in self.rank_infos]) if self.rank_infos else None

    def start_load_kv(self, meta: HeteroConnectorMetadata) -> None:
        for job in meta.recvs:
            self.receiver.add(job)
        for release in meta.releases:
            self.receiver.add_release(release)

    def wait_for_save(self, meta: HeteroConnectorMetadata) -> None:
        if self.export is not None:
            for job in meta.exports:
                self.export.write(self.local.kv_caches, job)

    def get_transfer_results(self, meta: HeteroConnectorMetadata | None) -> TransferResults:
        sending = set(meta.freed) if meta is not None else set()
        idle_s = meta.idle_s if meta is not None else 0.0
        if self.receiver is None:
            if idle_s and not sending:
                time.sleep(idle_s)
            return TransferResults(finished_sending=sending)
        done, failed = self.receiver.poll()
        if idle_s and not (done or failed or sending):
            if self.receiver.active:
                done, failed = self.receiver.wait(idle_s)
            elif not (meta.recvs or meta.releases):
                time.sleep(idle_s)
        self._num_failed += len(failed)
        return TransferResults(finished_sending=sending, finished_recving=done | set(failed),
                               failed_recving=set(failed))

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.receiver.take_bad_blocks() if self.receiver is not None else set()

    def get_stats(self) -> HeteroConnectorStats | None:
        r = self.receiver
        if r is None or not (r.finished_stats or self._num_failed or r.handshake_failures or r.active):
            return None
        stats = HeteroConnectorStats.of(r.finished_stats, self._num_failed, r.handshake_failures,
                                        r.staging_occupancy())
        r.finished_stats, self._num_failed, r.handshake_failures = [], 0, 0
        return stats

    def shutdown(self) -> None:
        if self.control is not None:
            self.control.shutdown()
        self.agent.close()
