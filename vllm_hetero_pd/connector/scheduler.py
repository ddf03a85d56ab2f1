"""Scheduler side of HeteroNixlConnector (engine-core process).

Prefill (producer): after a ``do_remote_decode`` request finishes, keep its blocks under a lease
and answer with ``kv_transfer_params``; serve the side channel (handshake, pin, release); tell
the workers which requests' blocks may be freed. With an export format, also tell the workers
which positions each step wrote, so they can mirror them into the export area.

Decode (consumer): for a ``do_remote_prefill`` request, ask vLLM to allocate blocks for the
whole prompt and to wait for an asynchronous load, and hand the workers a ``RecvJob``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from vllm_hetero_pd.log import get_logger
from vllm.v1.request import RequestStatus

from vllm_hetero_pd.config import ConnectorConfig
from vllm_hetero_pd.connector.leases import LeaseError, LeaseTable
from vllm_hetero_pd.connector.metadata import ExportJob, HeteroConnectorMetadata, RankHandshake, RecvJob
from vllm_hetero_pd.transport import wire
from vllm_hetero_pd.transport.side_channel import SideChannelServer

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = get_logger(__name__)


class ConnectorScheduler:
    def __init__(self, vllm_config: VllmConfig, config: ConnectorConfig, engine_id: str,
                 is_producer: bool, is_consumer: bool):
        self.config, self.engine_id = config, engine_id
        self.is_producer, self.is_consumer = is_producer, is_consumer
        self.block_size = vllm_config.cache_config.block_size
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        self.dp_rank = vllm_config.parallel_config.data_parallel_rank
        self.leases = LeaseTable(config.lease_s)
        self.ranks: list[wire.RankInfo] = []
        self.server: SideChannelServer | None = None
        self._recvs: list[RecvJob] = []
        self._export_blocks: dict[str, list[int]] = {}  # producer requests being prefilled (export only)

    # ------------------------------------------------------------------ handshake
    def set_xfer_handshake_metadata(self, metadata: dict[int, RankHandshake]) -> None:
        """Every worker's ``RankInfo`` arrives here once; a producer then opens its side channel."""
        self.ranks = [wire.decode_rank_info(info) for r in sorted(metadata) for info in metadata[r].rank_infos]
        if self.is_producer and self.server is None:
            self.server = SideChannelServer(self.config.host, self.config.port(self.dp_rank), self._serve)
            logger.info("HeteroNixlConnector side channel on %s:%d serving %d rank(s) in format %s",
                        self.config.host, self.server.port, len(self.ranks), self.ranks[0].format.name)

    def _serve(self, request: wire.Request) -> wire.Reply:
        if isinstance(request, wire.HandshakeRequest):
            if request.version != wire.WIRE_VERSION:
                return wire.Error(message=f"wire version {request.version} is not supported by this prefill "
                                          f"(speaks {wire.WIRE_VERSION}); run the same vllm-hetero-pd on both sides")
            return wire.HandshakeReply(version=wire.WIRE_VERSION, engine_id=self.engine_id, ranks=self.ranks)
        try:
            if isinstance(request, wire.PinRequest):
                return wire.PinReply(remaining_s=self.leases.pin(request.request_id, request.block_ids))
            self.leases.release(request.request_id, request.reader, request.num_readers)
            return wire.Ack()
        except LeaseError as e:
            return wire.Error(message=str(e))

    # ------------------------------------------------------------------ decode side
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params
        if self.is_consumer and params and params.get("do_remote_prefill"):
            count = len(request.prompt_token_ids or ()) - num_computed_tokens
            if count > 0:
                return count, True
        return 0, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        if not params:
            return
        if params.get("do_remote_decode") and self.is_producer:
            self._export_blocks.setdefault(request.request_id, [])
        if not (params.get("do_remote_prefill") and self.is_consumer):
            return
        params["do_remote_prefill"] = False  # load once, even if vLLM calls us again for this request
        num_prompt = len(request.prompt_token_ids or ())
        job = RecvJob(request.request_id, list(blocks.get_block_ids()[0]), num_prompt - num_external_tokens,
                      num_prompt, None)
        try:
            typed = wire.parse_transfer_params({**params, "do_remote_prefill": True})
            if typed.remote_num_tokens < num_prompt:
                raise ValueError(f"the prefill computed {typed.remote_num_tokens} tokens but the prompt has "
                                 f"{num_prompt}: send the decode the same prompt as the prefill")
            job = dataclasses.replace(job, params=typed)
        except ValueError as e:
            job = dataclasses.replace(job, error=str(e))
        self._recvs.append(job)

    # ------------------------------------------------------------------ prefill side
    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        params = request.kv_transfer_params
        self._export_blocks.pop(request.request_id, None)
        if not (self.is_producer and params and params.get("do_remote_decode")):
            return False, None
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED):
            return False, None  # aborted or failed: nobody will read it
        num_tokens = len(request.prompt_token_ids or ())
        exposed = self.exposed_block_ids(block_ids, num_tokens)
        self.leases.add(request.request_id, exposed)
        return True, {
            "do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": self.engine_id,
            "remote_request_id": request.request_id, "remote_host": self.config.host,
            "remote_port": self.config.port(self.dp_rank), "remote_block_ids": exposed,
            "remote_num_tokens": num_tokens, "tp_size": self.tp_size,
        }

    def exposed_block_ids(self, block_ids: list[int], num_tokens: int) -> list[int]:
        """Block ids a reader uses: native ones, or those of the export area (a fixed mapping)."""
        exposed_bs = self.ranks[0].format.block_size if self.ranks else self.block_size
        if exposed_bs == self.block_size:
            return list(block_ids[: math.ceil(num_tokens / self.block_size)])
        ratio = self.block_size // exposed_bs
        return [b * ratio + j for b in block_ids for j in range(ratio)][: math.ceil(num_tokens / exposed_bs)]

    def _export_jobs(self, out: SchedulerOutput) -> list[ExportJob]:
        if not self._export_blocks or not self.config.export_format:
            return []
        jobs = []
        for req in out.scheduled_new_reqs:
            if req.req_id in self._export_blocks:
                self._export_blocks[req.req_id] = list(req.block_ids[0])
                jobs.append(self._export_job(req.req_id, req.num_computed_tokens, out))
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if req_id in self._export_blocks:
                if cached.new_block_ids[i] is not None:
                    self._export_blocks[req_id] += cached.new_block_ids[i][0]
                jobs.append(self._export_job(req_id, cached.num_computed_tokens[i], out))
        return jobs

    def _export_job(self, req_id: str, start: int, out: SchedulerOutput) -> ExportJob:
        return ExportJob(req_id, list(self._export_blocks[req_id]), start, start + out.num_scheduled_tokens[req_id])

    # ------------------------------------------------------------------ per step
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> HeteroConnectorMetadata:
        meta = HeteroConnectorMetadata(recvs=self._recvs, exports=self._export_jobs(scheduler_output),
                                       freed=self.leases.take_freed() if self.is_producer else [])
        self._recvs = []
        return meta

    def has_pending_sends(self) -> bool:
        return len(self.leases) > 0

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
