"""Per-step messages from the scheduler-side connector to its workers (same host, pickled by vLLM)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorHandshakeMetadata, KVConnectorMetadata

from vllm_hetero_pd.kv_params import TransferParams


@dataclass(frozen=True)
class RecvJob:
    """Decode side: read prompt positions ``[start, stop)`` of a remote request into local blocks.

    ``error`` is set when the scheduler already knows the job cannot run (malformed params, or
    params of another prompt); the worker then reports the load as failed without touching NIXL
    or the prefill: the lease may belong to another request.
    """

    request_id: str
    local_block_ids: list[int]
    start: int
    stop: int
    params: TransferParams | None
    error: str = ""


@dataclass(frozen=True)
class ReleaseJob:
    """Decode side: a request that will not read its prefill's lease (vLLM skips the prefix cache
    for it, or it was aborted before it was scheduled); each rank releases it, unreported."""

    request_id: str
    params: TransferParams


@dataclass(frozen=True)
class ExportJob:
    """Prefill side: positions ``[start, stop)`` of a request were written this step; mirror them
    into the export area (only when an export format is configured)."""

    request_id: str
    block_ids: list[int]
    start: int
    stop: int


@dataclass
class TransferResults:
    """A worker's report for one step, in no release's types: each ``connector/adapters`` module
    hands it to vLLM its own way. A failed receive is also in ``finished_recving``."""

    finished_sending: set[str] = field(default_factory=set)
    finished_recving: set[str] = field(default_factory=set)
    failed_recving: set[str] = field(default_factory=set)


@dataclass
class HeteroConnectorMetadata(KVConnectorMetadata):
    recvs: list[RecvJob] = field(default_factory=list)
    releases: list[ReleaseJob] = field(default_factory=list)
    exports: list[ExportJob] = field(default_factory=list)
    freed: list[str] = field(default_factory=list)  # prefill: released or expired; report finished_sending
    idle_s: float = 0.0  # nothing is scheduled this step: the worker spends this long on it (IDLE_STEP_S)


@dataclass(frozen=True)
class RankHandshake(KVConnectorHandshakeMetadata):
    """A worker's contribution to the handshake, collected by the engine core for the scheduler."""

    rank_infos: list[bytes]  # msgpack-encoded wire.RankInfo: one, or one per export shard
