"""Decode worker side: pull a request's KV from its prefill and land it in local blocks.

Per remote engine, one handshake fixes everything that does not change per request: which
remote ranks hold the heads this rank needs, whether their format equals ours (then blocks are
READ straight into the KV cache: the fast path), and otherwise a compiled translation plan and
a registered staging pool (READ into staging, then ``translate`` into the KV cache). A request
moves through: pin its lease -> post READs chunk by chunk as staging allows (back-pressure:
it waits, never drops) -> translate -> release the lease. Any failure reports the request as
failed, with its blocks, so vLLM's ``kv_load_failure_policy`` applies; the lease is released.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec
import numpy as np
import torch
from vllm_hetero_pd.log import get_logger

from vllm_hetero_pd.config import ConnectorConfig
from vllm_hetero_pd.connector.metadata import RecvJob
from vllm_hetero_pd.connector.stats import TransferStats
from vllm_hetero_pd.formats.format import KVFormat, LayoutError
from vllm_hetero_pd.shim.plan import TranslationPlan, plan
from vllm_hetero_pd.shim.translate import allocate, translate
from vllm_hetero_pd.transport import side_channel, wire
from vllm_hetero_pd.transport.block_layout import BlockLayout, block_descs, block_layout, whole_cache_layer_addrs
from vllm_hetero_pd.transport.nixl_agent import NixlAgent, Read, TransferError

logger = get_logger(__name__)


class RecvError(RuntimeError):
    """Why one request's KV could not be loaded (named cause and fix)."""


@dataclass
class LocalCache:
    """This rank's KV cache as vLLM registered it."""

    format: KVFormat
    kv_caches: Mapping[str, torch.Tensor]
    layout: BlockLayout
    layer_addrs: list[list[int]]
    mem_type: str


@dataclass
class Staging:
    """A registered pool of blocks in the source ranks' format, handed out in slots."""

    formats: list[KVFormat]
    buffers: list  # per source rank: tensor (joint) or (K, V) tensors (split)
    layouts: list[BlockLayout]
    layer_addrs: list[list[list[int]]]
    free: list[int]

    def take(self, n: int) -> list[int] | None:
        if len(self.free) < n:
            return None
        taken, self.free = self.free[:n], self.free[n:]
        return taken

    def give_back(self, slots: list[int]) -> None:
        self.free.extend(slots)


@dataclass
class RemoteEngine:
    engine_id: str
    host: str
    port: int
    sources: list[wire.RankInfo]  # the remote ranks this rank reads from, in plan order
    agent_names: list[str]
    layouts: list[BlockLayout]
    plan: TranslationPlan | None  # None: identical formats, READ straight into the KV cache
    staging: Staging | None


@dataclass
class Transfer:
    job: RecvJob
    remote: RemoteEngine
    remote_block_ids: list[int]
    next_block: int  # first remote block (index into the prompt's blocks) not yet posted
    end_block: int
    reads: list[Read] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    chunk: tuple[int, int] = (0, 0)
    started: float = field(default_factory=time.monotonic)
    last_pin: float = field(default_factory=time.monotonic)
    posted: float = 0.0
    stats: TransferStats = field(default_factory=TransferStats)


class Receiver:
    def __init__(self, agent: NixlAgent, config: ConnectorConfig, local: LocalCache, num_ranks: int):
        self.agent, self.config, self.local = agent, config, local
        self.num_ranks = num_ranks  # every decode rank reads and releases each request
        self.remotes: dict[str, RemoteEngine] = {}
        self.active: dict[str, Transfer] = {}
        self.done: set[str] = set()
        self.failed: dict[str, str] = {}
        self.bad_blocks: set[int] = set()
        self.finished_stats: list[TransferStats] = []
        self.handshake_failures = 0

    # ------------------------------------------------------------------ admission
    def add(self, job: RecvJob) -> None:
        try:
            if job.error:
                raise RecvError(job.error)
            transfer = self._start(job)
        except (RecvError, side_channel.SideChannelError, TransferError, LayoutError) as e:
            self._fail_job(job, str(e))
            if job.params is not None:
                self._release(job.params)
            return
        self.active[job.request_id] = transfer
        self._step(transfer)

    def _start(self, job: RecvJob) -> Transfer:
        params = job.params
        remote = self._remote(params)
        bs = remote.sources[0].format.block_size
        first, end = job.start // bs, math.ceil(job.stop / bs)
        if len(params.remote_block_ids) < end:
            raise RecvError(f"kv_transfer_params.remote_block_ids has {len(params.remote_block_ids)} blocks but "
                            f"{job.stop} prompt tokens need {end} of size {bs}; forward the prefill's params unchanged")
        num_remote = remote.sources[0].format.num_blocks
        bad = [b for b in params.remote_block_ids[first:end] if b >= num_remote]
        if bad:
            raise RecvError(f"remote block ids {bad[:8]} are outside the prefill's {num_remote} blocks")
        side_channel.call(params.remote_host, params.remote_port,
                          wire.PinRequest(request_id=params.remote_request_id,
                                          block_ids=params.remote_block_ids[first:end]),
                          self.config.handshake_timeout_s)
        return Transfer(job=job, remote=remote, remote_block_ids=params.remote_block_ids, next_block=first,
                        end_block=end)

    def _remote(self, params: wire.TransferParams) -> RemoteEngine:
        known = self.remotes.get(params.remote_engine_id)
        if known is not None:
            return known
        start = time.perf_counter()
        try:
            reply = side_channel.call(params.remote_host, params.remote_port, wire.HandshakeRequest(),
                                      self.config.handshake_timeout_s)
            if reply.engine_id != params.remote_engine_id:
                raise RecvError(f"the side channel at {params.remote_host}:{params.remote_port} belongs to engine "
                                f"{reply.engine_id!r}, not {params.remote_engine_id!r} named in kv_transfer_params")
            remote = self._connect(params, reply.ranks)
        except (RecvError, side_channel.SideChannelError, TransferError, LayoutError):
            self.handshake_failures += 1
            raise
        self.remotes[params.remote_engine_id] = remote
        logger.info("handshake with prefill %s (%s:%d) in %.1f ms: %d source rank(s), format %s -> %s, %s",
                    reply.engine_id, params.remote_host, params.remote_port, 1000 * (time.perf_counter() - start),
                    len(remote.sources), remote.sources[0].format.name, self.local.format.name or "local",
                    "direct READ (same format)" if remote.plan is None else "staged READ + translate")
        return remote

    def _connect(self, params: wire.TransferParams, ranks: list[wire.RankInfo]) -> RemoteEngine:
        sources = choose_sources(ranks, self.local.format)
        try:
            identical = len(sources) == 1 and plan([sources[0].format], self.local.format).is_identity
            layouts = [block_layout(r.format) for r in sources]
        except LayoutError as e:
            raise RecvError(f"prefill engine {params.remote_engine_id!r} is incompatible with this decode: {e}") from None
        added: dict[str, str] = {}  # export shards of one prefill rank share its NIXL agent
        for r in sources:
            if r.agent_name not in added:
                added[r.agent_name] = self.agent.add_remote(r.agent_metadata)
        names = [added[r.agent_name] for r in sources]
        if identical:
            return RemoteEngine(params.remote_engine_id, params.remote_host, params.remote_port, sources, names,
                                layouts, None, None)
        staging = self._staging([r.format for r in sources])
        compiled = plan(staging.formats, self.local.format)
        return RemoteEngine(params.remote_engine_id, params.remote_host, params.remote_port, sources, names, layouts,
                            compiled, staging)

    def _staging(self, formats: list[KVFormat]) -> Staging:
        per_slot = sum(f.nbytes_per_block * f.num_layers for f in formats)
        capacity = max(1, self.config.staging_mib * 2**20 // per_slot)
        formats = [msgspec.structs.replace(f, num_blocks=capacity, num_pad_blocks=0) for f in formats]
        device = next(iter(self.local.kv_caches.values()))
        device = (device[0] if isinstance(device, tuple) else device).device
        buffers = [allocate(f, device) for f in formats]
        tensors = [t for b in buffers for t in (b if isinstance(b, tuple) else (b,))]
        self.agent.register([(t.data_ptr(), t.nbytes) for t in tensors], self.local.mem_type)
        addrs = [whole_cache_layer_addrs(f, [t.data_ptr() for t in (b if isinstance(b, tuple) else (b,))])
                 for f, b in zip(formats, buffers)]
        logger.info("staging pool: %d blocks x %d source rank(s) (%.1f MiB)", capacity, len(formats),
                    capacity * per_slot / 2**20)
        return Staging(formats, buffers, [block_layout(f) for f in formats], addrs, list(range(capacity)))

    # ------------------------------------------------------------------ progress
    def poll(self) -> tuple[set[str], dict[str, str]]:
        """Advance every transfer; return (loaded, failed -> reason) since the last call."""
        for transfer in list(self.active.values()):
            try:
                self._step(transfer)
            except (RecvError, side_channel.SideChannelError, TransferError, LayoutError) as e:
                self._fail(transfer, str(e))
        done, failed = self.done, self.failed
        self.done, self.failed = set(), {}
        return done, failed

    def _step(self, t: Transfer) -> None:
        """Move one transfer as far as it can go without blocking."""
        while True:
            if t.reads:
                states = [self.agent.poll(r) for r in t.reads]
                if "ERR" in states:
                    raise RecvError(f"NIXL READ from prefill {t.remote.engine_id} failed (peer gone or "
                                    f"memory deregistered)")
                if "PROC" in states:
                    if time.monotonic() - t.posted > self.config.transfer_timeout_s:
                        raise RecvError(f"READ from prefill {t.remote.engine_id} did not finish within "
                                        f"transfer_timeout_s={self.config.transfer_timeout_s:g}")
                    return
                t.stats.transfer_s += time.monotonic() - t.posted
                t.reads = []
                self._land_chunk(t)
            if t.next_block >= t.end_block:
                self._finish(t)
                return
            if not self._post_chunk(t):
                self._heartbeat(t)
                return

    def _post_chunk(self, t: Transfer) -> bool:
        """Post READs for the next chunk; False when staging is full (the transfer waits its turn)."""
        remote, ids = t.remote, t.remote_block_ids
        if remote.staging is None:
            first, end = t.next_block, t.end_block
            dst = [block_descs(self.local.layout, self.local.layer_addrs, t.job.local_block_ids[first:end])]
        else:
            n = min(t.end_block - t.next_block, len(remote.staging.free) or 1)
            slots = remote.staging.take(n)
            if slots is None:
                return False
            first, end = t.next_block, t.next_block + n
            t.slots = slots
            dst = [block_descs(lay, addrs, slots)
                   for lay, addrs in zip(remote.staging.layouts, remote.staging.layer_addrs)]
        t.posted = time.monotonic()
        for k, source in enumerate(remote.sources):
            src = block_descs(remote.layouts[k], source.layer_addrs, ids[first:end])
            local = dst[0] if remote.staging is None else dst[k]
            t.reads.append(self.agent.read(remote.agent_names[k], local, src, self.local.mem_type))
            t.stats.bytes += int(src[:, 1].sum())
        t.chunk, t.next_block = (first, end), end
        return True

    def _land_chunk(self, t: Transfer) -> None:
        """Translate a staged chunk into the KV cache and return its staging slots."""
        staging = t.remote.staging
        if staging is None:
            return
        bs = staging.formats[0].block_size
        first, end = t.chunk
        start = time.perf_counter()
        translate(t.remote.plan, staging.buffers, self.local.kv_caches,
                  src_block_ids=[0] * first + t.slots, dst_block_ids=t.job.local_block_ids,
                  start=max(t.job.start, first * bs), stop=min(t.job.stop, end * bs))
        t.stats.translate_s += time.perf_counter() - start
        staging.give_back(t.slots)
        t.slots = []

    def _heartbeat(self, t: Transfer) -> None:
        if time.monotonic() - t.last_pin >= self.config.heartbeat_s:
            p = t.job.params
            side_channel.call(p.remote_host, p.remote_port,
                              wire.PinRequest(request_id=p.remote_request_id,
                                              block_ids=t.remote_block_ids[t.next_block:t.end_block]),
                              self.config.handshake_timeout_s)
            t.last_pin = time.monotonic()

    # ------------------------------------------------------------------ endings
    def _finish(self, t: Transfer) -> None:
        if self.config.debug_corrupt_transfers:
            corrupt_first_block(self.local.kv_caches, t.job)
        del self.active[t.job.request_id]
        self._release(t.job.params)
        t.stats.total_s = time.monotonic() - t.started
        self.finished_stats.append(t.stats)
        self.done.add(t.job.request_id)

    def _fail(self, t: Transfer, reason: str) -> None:
        if t.remote.staging is not None and t.slots and not t.reads:
            t.remote.staging.give_back(t.slots)
        # slots of a READ still in flight are not reused: NIXL may still write into them
        self.active.pop(t.job.request_id, None)
        self._release(t.job.params)
        self._fail_job(t.job, reason)

    def _fail_job(self, job: RecvJob, reason: str) -> None:
        logger.error("KV load for request %s failed: %s", job.request_id, reason)
        self.failed[job.request_id] = reason
        bs = self.local.format.block_size
        self.bad_blocks.update(job.local_block_ids[job.start // bs: math.ceil(job.stop / bs)])

    def _release(self, params: wire.TransferParams) -> None:
        try:
            side_channel.call(params.remote_host, params.remote_port,
                              wire.ReleaseRequest(request_id=params.remote_request_id, reader=self.agent.name,
                                                  num_readers=self.num_ranks),
                              self.config.handshake_timeout_s)
        except side_channel.SideChannelError as e:
            logger.warning("could not release request %s on its prefill (its lease will expire): %s",
                           params.remote_request_id, e)

    def staging_occupancy(self) -> float:
        pools = [r.staging for r in self.remotes.values() if r.staging is not None]
        total = sum(p.formats[0].num_blocks for p in pools)
        return 1 - sum(len(p.free) for p in pools) / total if total else 0.0

    def take_bad_blocks(self) -> set[int]:
        out, self.bad_blocks = self.bad_blocks, set()
        return out


def choose_sources(ranks: list[wire.RankInfo], local: KVFormat) -> list[wire.RankInfo]:
    """The fewest remote ranks that together hold this rank's heads (first replica wins under GQA)."""
    chosen: list[wire.RankInfo] = []
    for head in range(local.head_start, local.head_start + local.num_heads):
        holder = next((r for r in ranks if r.format.head_start <= head < r.format.head_start + r.format.num_heads),
                      None)
        if holder is None:
            raise RecvError(f"no prefill rank holds KV head {head} (prefill has {ranks[0].format.num_kv_heads} "
                            f"heads, this decode needs {local.num_kv_heads}); the two run different models")
        if holder not in chosen:
            chosen.append(holder)
    return chosen


def corrupt_first_block(kv_caches: Mapping[str, torch.Tensor], job: RecvJob) -> None:
    """Negative control (``debug_corrupt_transfers``): scramble the first loaded block of layer 0."""
    first = next(iter(kv_caches.values()))
    first = first[0] if isinstance(first, tuple) else first
    block = first[job.local_block_ids[0]]
    block.copy_(block.flatten()[torch.randperm(block.numel())].view_as(block))
