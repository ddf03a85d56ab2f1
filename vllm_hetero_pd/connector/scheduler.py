"""Scheduler side of HeteroNixlConnector (engine-core process).

Prefill (producer): after a ``do_remote_decode`` request finishes, keep its blocks under a lease
and answer with ``kv_transfer_params``; serve the side channel (handshake, pin, release); tell
the workers which requests' blocks may be freed. With an export format, also tell the workers
which positions each step wrote, so they can mirror them into the export area.

Decode (consumer): for a ``do_remote_prefill`` request, ask vLLM to allocate blocks for the
whole prompt and to wait for an asynchronous load, and hand the workers a ``RecvJob``. A request
that will read nothing (vLLM skips the prefix cache for ``prompt_logprobs`` and ``echo`` with
``logprobs``, or it was aborted before it was scheduled) gets a ``ReleaseJob`` instead: it must
never be reported as received (vLLM's scheduler asserts), and its prefill should not wait for
the lease to expire. Params that name another prompt (by digest) are refused.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from vllm.v1.request import RequestStatus

from vllm_hetero_pd import kv_params
from vllm_hetero_pd.config import ConnectorConfig
from vllm_hetero_pd.connector.leases import LeaseError, LeaseTable
from vllm_hetero_pd.connector.metadata import ExportJob, HeteroConnectorMetadata, RankHandshake, RecvJob, ReleaseJob
from vllm_hetero_pd.log import get_logger
from vllm_hetero_pd.transport import auth, wire
from vllm_hetero_pd.transport.side_channel import SideChannelServer

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = get_logger(__name__)

IDLE_STEP_S = 0.002
"""vLLM steps an engine with nothing to compute as fast as it can while a lease is held (prefill) or a
load is in flight (decode), only so that the connector can poll. Unthrottled, that empty loop burns a
core per engine, and on a shared host it starved a decode long enough for its prefill's lease to expire
(15 s measured with two prefills and a decode on 2 cores). So each empty step takes this long in the
worker: a decode spends it watching its loads (an ending is seen at once), anything else naps."""


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
        self.secret = auth.load_secret(config.side_channel_secret_env) if is_producer else None
        self._recvs: list[RecvJob] = []
        self._releases: list[ReleaseJob] = []
        self._export_blocks: dict[str, list[int]] = {}  # producer requests being prefilled (export only)
        self._malformed: dict[str, str] = {}  # consumer: why a request's params did not parse

    # ------------------------------------------------------------------ handshake
    def set_xfer_handshake_metadata(self, metadata: dict[int, RankHandshake]) -> None:
        """Every worker's ``RankInfo`` arrives here once; a producer then opens its side channel."""
        self.ranks = [wire.decode_rank_info(info) for r in sorted(metadata) for info in metadata[r].rank_infos]
        if self.is_producer and self.server is None:
            self.server = SideChannelServer(self.config.host, self.config.port(self.dp_rank), self._serve)
            logger.info("HeteroNixlConnector side channel on %s:%d serving %d rank(s) in format %s",
                        self.config.host, self.server.port, len(self.ranks), self.ranks[0].format.name)

    def _serve(self, request: wire.Request) -> wire.Reply:
        try:
            if isinstance(request, wire.HandshakeRequest):
                return self._handshake(request)
            if isinstance(request, wire.PinRequest):
                return wire.PinReply(remaining_s=self.leases.pin(request.request_id, request.lease_token,
                                                                 request.reader, request.block_ids))
            self.leases.release(request.request_id, request.lease_token, request.reader, request.num_readers)
            return wire.Ack()
        except (LeaseError, auth.AuthError) as e:
            return wire.Error(message=str(e))

    def _handshake(self, request: wire.HandshakeRequest) -> wire.Reply:
        if request.version != wire.WIRE_VERSION:
            return wire.Error(message=f"wire version {request.version} is not supported by this prefill "
                                      f"(speaks {wire.WIRE_VERSION}); run the same vllm-hetero-pd on both sides")
        reply = wire.HandshakeReply(version=wire.WIRE_VERSION, engine_id=self.engine_id, ranks=self.ranks)
        if self.secret is None:
            return reply
        auth.check(self.secret, "hs-request", request.mac, request.nonce, request.target)
        advertised = f"{self.config.host}:{self.server.port}"
        if request.target != advertised:
            raise auth.AuthError(f"handshake addressed to {request.target}, but this prefill is {advertised}: "
                                 f"refusing a relayed handshake")
        mac = auth.mac(self.secret, "hs-reply", request.nonce, request.target, self.engine_id,
                       wire.encode_ranks(self.ranks))
        return wire.HandshakeReply(version=wire.WIRE_VERSION, engine_id=self.engine_id, ranks=self.ranks, mac=mac)

    # ------------------------------------------------------------------ decode side
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        """A request that skips the prefix cache (``prompt_logprobs``, ``echo`` with logprobs) must
        compute its prompt itself: vLLM 0.31+ zeroes our answer for it, 0.26-0.30 would trust a load.
        Answering 0 here gives every release the same outcome: the scheduler releases the lease."""
        params = request.kv_transfer_params
        if getattr(request, "skip_reading_prefix_cache", False):
            return 0, False
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
        typed = self._take_params(request)  # load once, even if vLLM calls us again for this request
        if num_external_tokens == 0:
            if typed is not None:
                self._releases.append(ReleaseJob(request.request_id, typed))
            return
        num_prompt = len(request.prompt_token_ids or ())
        job = RecvJob(request.request_id, list(blocks.get_block_ids()[0]), num_prompt - num_external_tokens,
                      num_prompt, typed, error=self._mismatch(request, typed))
        self._recvs.append(job)

    def _take_params(self, request: Request) -> kv_params.TransferParams | None:
        """Mark the request's params consumed and return them typed (None, logged, if malformed)."""
        params = request.kv_transfer_params
        params["do_remote_prefill"] = False
        try:
            return kv_params.parse_transfer_params({**params, "do_remote_prefill": True})
        except ValueError as e:
            self._malformed[request.request_id] = str(e)
            logger.warning("request %s: %s", request.request_id, e)
            return None

    def _mismatch(self, request: Request, typed: kv_params.TransferParams | None) -> str:
        """Why ``typed`` cannot be this request's KV ("" if it can)."""
        if typed is None:
            return self._malformed.pop(request.request_id, "malformed kv_transfer_params")
        tokens = request.prompt_token_ids or ()
        if typed.remote_num_tokens != len(tokens) or typed.prompt_digest != kv_params.prompt_digest(tokens):
            return (f"kv_transfer_params belong to another prompt ({typed.remote_num_tokens} tokens, digest "
                    f"{typed.prompt_digest[:8]}) than this request's ({len(tokens)} tokens); each prompt of a batch "
                    f"and each of n samples needs its own prefill: send them one per request")
        return ""

    # ------------------------------------------------------------------ prefill side
    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        params = request.kv_transfer_params
        self._export_blocks.pop(request.request_id, None)
        self._malformed.pop(request.request_id, None)
        if self.is_consumer and params and params.get("do_remote_prefill"):
            typed = self._take_params(request)  # finished before it was ever scheduled: nobody will read
            self._malformed.pop(request.request_id, None)
            if typed is not None:
                self._releases.append(ReleaseJob(request.request_id, typed))
        if not (self.is_producer and params and params.get("do_remote_decode")):
            return False, None
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED):
            return False, None  # aborted or failed: nobody will read it
        tokens = request.prompt_token_ids
        if not tokens:
            logger.warning("request %s has no prompt token ids (prompt embeddings?): its KV is not exported",
                           request.request_id)
            return False, None
        exposed = self.exposed_block_ids(block_ids, len(tokens))
        token = self.leases.add(request.request_id, exposed)
        return True, kv_params.to_dict(kv_params.TransferParams(
            do_remote_prefill=True, remote_engine_id=self.engine_id, remote_request_id=request.request_id,
            remote_host=self.config.host, remote_port=self.config.port(self.dp_rank), remote_block_ids=exposed,
            remote_num_tokens=len(tokens), lease_token=token, prompt_digest=kv_params.prompt_digest(tokens)))

    def exposed_block_ids(self, block_ids: list[int], num_tokens: int) -> list[int]:
        """Block ids a reader uses: native ones, or those of the export area (a fixed mapping)."""
        exposed_bs = self.ranks[0].format.block_size if self.ranks else self.block_size
        if exposed_bs == self.block_size:
            return list(block_ids[: math.ceil(num_tokens / self.block_size)])
        ratio = self.block_size // exposed_bs
        return [b * ratio + j for b in block_ids for j in range(ratio)][: math.ceil(num_tokens / exposed_bs)]

    def _export_jobs(self, out: SchedulerOutput) -> list[ExportJob]:
        """Positions to mirror this step. New and resumed requests mirror from position 0: their
        prefix-cache hits were computed by other requests, which may never have been mirrored, and
        a resumed request's block list is replaced, not extended."""
        if not self._export_blocks or not self.config.exports:
            return []
        jobs = []
        for req in out.scheduled_new_reqs:
            if req.req_id in self._export_blocks:
                self._export_blocks[req.req_id] = list(req.block_ids[0])
                jobs.append(self._export_job(req.req_id, 0, req.num_computed_tokens, out))
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if req_id not in self._export_blocks:
                continue
            resumed = req_id in cached.resumed_req_ids
            new_ids = cached.new_block_ids[i]
            if resumed:
                self._export_blocks[req_id] = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                self._export_blocks[req_id] += new_ids[0]
            computed = cached.num_computed_tokens[i]
            jobs.append(self._export_job(req_id, 0 if resumed else computed, computed, out))
        return jobs

    def _export_job(self, req_id: str, start: int, computed: int, out: SchedulerOutput) -> ExportJob:
        return ExportJob(req_id, list(self._export_blocks[req_id]), start, computed + out.num_scheduled_tokens[req_id])

    # ------------------------------------------------------------------ per step
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> HeteroConnectorMetadata:
        idle = scheduler_output.total_num_scheduled_tokens == 0
        meta = HeteroConnectorMetadata(recvs=self._recvs, releases=self._releases,
                                       exports=self._export_jobs(scheduler_output),
                                       freed=self.leases.take_freed() if self.is_producer else [],
                                       idle_s=IDLE_STEP_S if idle else 0.0)
        self._recvs, self._releases = [], []
        return meta

    def has_pending_sends(self) -> bool:
        return len(self.leases) > 0

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
