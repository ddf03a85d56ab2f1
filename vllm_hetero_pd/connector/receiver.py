"""Decode worker side: pull a request's KV from its prefill and land it in local blocks.

Per remote engine, one handshake fixes everything that does not change per request: which
remote ranks hold the heads this rank needs, whether their format equals ours (then blocks are
READ straight into the KV cache: the fast path), and otherwise a compiled translation plan and
a registered staging pool (READ into staging, then ``translate`` into the KV cache).

A request moves through: handshake (once per engine) -> its first pin and its first READs, posted
together -> READs chunk by chunk as staging allows, pinning again every heartbeat while any READ
runs -> translate -> release. The first READ does not wait for the pin's answer: the lease began
with the prefill's answer, so the pin only has to confirm, before the load is accepted, that the
lease still held when the READs finished. All side-channel I/O runs on the ``ControlPlane``'s
threads; ``poll`` only looks at futures and NIXL states, so it never blocks the engine step.
Descriptors are prepared once per memory area (the local cache, each staging pool, each source
rank's cache); a READ picks a request's blocks from them by index.

Guarantees, whatever the peer does:
- a load succeeds only if a pin confirmed the lease and every READ finished before the lease could
  have run out (a refused pin fails the load, whatever its READs brought);
- a failed request is reported only when NIXL holds no handle into its blocks or staging slots
  (in-flight READs are cancelled or waited out first), and its slots go back to the pool;
- any error fails that request only (reported with its blocks, so vLLM's
  ``kv_load_failure_policy`` applies), and a Release goes only to a handshaken prefill;
- pins and releases go only to the address an engine id was handshaken at.
"""

from __future__ import annotations

import enum
import hashlib
import math
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field

import msgspec
import torch

from vllm_hetero_pd.config import ConnectorConfig
from vllm_hetero_pd.connector.control import MAX_PENDING_HANDSHAKES, ControlPlane
from vllm_hetero_pd.connector.host_buffer import allocate_host
from vllm_hetero_pd.connector.metadata import RecvJob, ReleaseJob
from vllm_hetero_pd.connector.stats import TransferStats
from vllm_hetero_pd.formats.format import KVFormat, LayoutError
from vllm_hetero_pd.kv_params import TransferParams
from vllm_hetero_pd.log import get_logger
from vllm_hetero_pd.shim.plan import TranslationPlan, plan
from vllm_hetero_pd.shim.translate import allocate, translate, warm_up
from vllm_hetero_pd.transport import auth, side_channel, wire
from vllm_hetero_pd.transport.block_layout import (
    BlockLayout,
    block_descs,
    block_indices,
    block_layout,
    whole_cache_layer_addrs,
)
from vllm_hetero_pd.transport.nixl_agent import DescList, Memory, NixlAgent, Read

logger = get_logger(__name__)

READ_SPIN_S = 0.002
WAIT_NAP_S = 0.0001


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
    device_id: int = 0

    @property
    def memory(self) -> Memory:
        return Memory(self.mem_type, self.device_id)

    @property
    def device(self) -> torch.device:
        first = next(iter(self.kv_caches.values()))
        return (first[0] if isinstance(first, tuple) else first).device


@dataclass
class Staging:
    """A registered pool of blocks in the source ranks' format, handed out in slots (on the decode's
    device, or in host DRAM with ``host_staging``)."""

    formats: list[KVFormat]
    buffers: list  # per source rank: tensor (joint) or (K, V) tensors (split)
    layouts: list[BlockLayout]
    layer_addrs: list[list[list[int]]]
    free: list[int]
    registration: object
    memory: Memory
    lists: list[DescList]  # per source rank: every slot's rows, prepared

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
    lists: list[DescList]  # per source rank: every block of its cache, prepared
    users: int = 0  # transfers and releases using this engine now
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class Handshake:
    """One handshake in flight with ``host:port``; ``outcome`` is set once processed."""

    future: Future
    nonce: bytes
    target: str
    outcome: RemoteEngine | str | None = None
    started: float = field(default_factory=time.monotonic)


class Phase(enum.Enum):
    CONNECT = "waiting for the handshake"
    READ = "reading (the first pin may still be on its way)"
    DRAIN = "cancelling READs after a failure"


@dataclass
class Transfer:
    job: RecvJob
    reader: str
    phase: Phase = Phase.CONNECT
    remote: RemoteEngine | None = None
    next_block: int = 0  # first remote block (index into the prompt's blocks) not yet posted
    end_block: int = 0
    reads: list[Read] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    chunk: tuple[int, int] = (0, 0)
    started: float = field(default_factory=time.monotonic)
    posted: float = 0.0
    pin: Future | None = None
    pin_sent: float = 0.0
    pinned: bool = False  # a pin reached the prefill: this reader must release
    lease_deadline: float = 0.0  # local time before which the prefill is known to hold the blocks
    next_pin: float = 0.0
    failure: str = ""
    stats: TransferStats = field(default_factory=TransferStats)

    @property
    def params(self) -> TransferParams:
        return self.job.params


@dataclass
class PendingRelease:
    job: ReleaseJob
    reader: str
    started: float = field(default_factory=time.monotonic)


class Receiver:
    def __init__(self, agent: NixlAgent, config: ConnectorConfig, local: LocalCache, num_ranks: int,
                 control: ControlPlane):
        self.agent, self.config, self.local, self.control = agent, config, local, control
        self.secret = auth.load_secret(config.side_channel_secret_env)
        self.num_ranks = num_ranks  # every decode rank reads and releases each request
        self.remotes: dict[str, RemoteEngine] = {}
        self.handshakes: dict[tuple[str, int], Handshake] = {}
        self.active: dict[str, Transfer] = {}
        self.releases: list[PendingRelease] = []
        self.done: set[str] = set()
        self.failed: dict[str, str] = {}
        self.bad_blocks: set[int] = set()
        self.finished_stats: list[TransferStats] = []
        self.handshake_failures = 0
        rows = block_descs(local.layout, local.layer_addrs, list(range(local.format.num_blocks)))
        self.local_list = agent.prepare("", rows, local.memory)
        warm_up(plan([local.format], local.format))  # the copy loops compile at engine start, not in a step

    # ------------------------------------------------------------------ admission
    def add(self, job: RecvJob) -> None:
        transfer = Transfer(job=job, reader=self._reader(job.request_id))
        if job.error:  # malformed or misapplied params: touch nothing, release nothing
            self._report_failure(job, job.error)
            return
        if job.request_id in self.active:  # vLLM hands each load over once; never run two for one request
            logger.warning("request %s is already loading; ignoring a second load job", job.request_id)
            return
        self.active[job.request_id] = transfer
        self._advance(transfer)

    def add_release(self, job: ReleaseJob) -> None:
        """A request that will not read its lease: tell its prefill, once the prefill is verified."""
        self.releases.append(PendingRelease(job, self._reader(job.request_id)))

    def _reader(self, request_id: str) -> str:
        """This rank reading one decode request (a digest: request ids may be long or client-chosen)."""
        return f"{self.agent.name}/{hashlib.blake2b(request_id.encode(), digest_size=8).hexdigest()}"

    # ------------------------------------------------------------------ progress
    def poll(self) -> tuple[set[str], dict[str, str]]:
        """Advance every transfer; return (loaded, failed -> reason) since the last call."""
        for transfer in list(self.active.values()):
            self._advance(transfer)
        self._send_releases()
        self._forget_handshakes()
        self._evict_idle()
        done, failed = self.done, self.failed
        self.done, self.failed = set(), {}
        return done, failed

    def wait(self, budget_s: float) -> tuple[set[str], dict[str, str]]:
        """``poll`` until a load ends or ``budget_s`` passes: the step has nothing else to do, and a load
        that ends now is then reported now rather than one idle step later. A READ posted in the last
        ``READ_SPIN_S`` is polled without pause (one request's READ takes a fraction of a millisecond);
        otherwise (a pin on its way, a stalled READ) the wait naps ``WAIT_NAP_S`` between polls."""
        deadline = time.monotonic() + budget_s
        done: set[str] = set()
        failed: dict[str, str] = {}
        while self.active and not (done or failed) and (now := time.monotonic()) < deadline:
            if not any(t.reads and now - t.posted < READ_SPIN_S for t in self.active.values()):
                time.sleep(WAIT_NAP_S)
            done, failed = self.poll()
        return done, failed

    def _advance(self, t: Transfer) -> None:
        """Move one transfer as far as it can go without blocking; any error fails it alone."""
        try:
            if t.phase is Phase.DRAIN:
                self._drain(t)
            elif t.phase is Phase.CONNECT:
                self._connect_step(t)
            else:
                self._read_step(t)
        except RecvError as e:
            self._fail(t, str(e))
        except Exception as e:  # a peer or NIXL error we did not foresee must not reach the engine
            logger.exception("unexpected error while loading request %s", t.job.request_id)
            self._fail(t, f"{type(e).__name__}: {e}")

    def _connect_step(self, t: Transfer) -> None:
        remote = self._resolve(t.params)
        if remote is None:
            if time.monotonic() - t.started > 3 * self.config.handshake_timeout_s + 1:
                raise RecvError(f"no handshake with prefill {t.params.remote_host}:{t.params.remote_port} within "
                                f"{3 * self.config.handshake_timeout_s + 1:g} s")
            return
        t.remote, remote.users = remote, remote.users + 1
        bs = remote.sources[0].format.block_size
        t.next_block, t.end_block = t.job.start // bs, math.ceil(t.job.stop / bs)
        ids = t.params.remote_block_ids
        if len(ids) < t.end_block:
            raise RecvError(f"kv_transfer_params.remote_block_ids has {len(ids)} blocks but {t.job.stop} prompt "
                            f"tokens need {t.end_block} of size {bs}; forward the prefill's params unchanged")
        num_remote = remote.sources[0].format.num_blocks
        bad = [b for b in ids[t.next_block:t.end_block] if b >= num_remote]
        if bad:
            raise RecvError(f"remote block ids {bad[:8]} are outside the prefill's {num_remote} blocks")
        t.phase = Phase.READ
        self._send_pin(t)
        self._read_step(t)

    def _read_step(self, t: Transfer) -> None:
        confirmed = self._pin_answered(t)
        while True:
            now = time.monotonic()
            if confirmed and now >= t.lease_deadline:
                raise RecvError(f"the lease on request {t.params.remote_request_id} at prefill "
                                f"{t.remote.engine_id} ran out before its READ finished (no pin confirmed it in "
                                f"time); the blocks may have been reused, so the load fails")
            if t.reads:
                states = [self.agent.poll(r) for r in t.reads]
                if "ERR" in states:
                    raise RecvError(f"NIXL READ from prefill {t.remote.engine_id} failed (peer gone or "
                                    f"memory deregistered)")
                if "PROC" in states:
                    if now - t.posted > self.config.transfer_timeout_s:
                        raise RecvError(f"READ from prefill {t.remote.engine_id} did not finish within "
                                        f"transfer_timeout_s={self.config.transfer_timeout_s:g}")
                    self._maybe_pin(t)
                    return
                t.stats.transfer_s += now - t.posted
                t.reads = []
                self._land_chunk(t)
            if t.next_block >= t.end_block:
                if confirmed:  # else every READ is done and the first pin has yet to confirm the lease
                    self._finish(t)
                return
            if not self._post_chunk(t):
                self._maybe_pin(t)
                return

    # ------------------------------------------------------------------ handshake
    def _resolve(self, params: TransferParams) -> RemoteEngine | None:
        """The verified engine ``params`` name, or None while its handshake runs."""
        remote = self.remotes.get(params.remote_engine_id)
        if remote is not None:
            if (remote.host, remote.port) != (params.remote_host, params.remote_port):
                raise RecvError(f"kv_transfer_params place engine {params.remote_engine_id!r} at "
                                f"{params.remote_host}:{params.remote_port}, but it was handshaken at "
                                f"{remote.host}:{remote.port}; refusing forged or stale params")
            remote.last_used = time.monotonic()
            return remote
        key = (params.remote_host, params.remote_port)
        pending = self.handshakes.get(key) or self._start_handshake(*key)
        if pending.outcome is None and pending.future.done():
            pending.outcome = self._complete_handshake(pending, params)
        if isinstance(pending.outcome, str):
            raise RecvError(pending.outcome)
        if pending.outcome is not None and pending.outcome.engine_id != params.remote_engine_id:
            raise RecvError(f"the side channel at {params.remote_host}:{params.remote_port} belongs to engine "
                            f"{pending.outcome.engine_id!r}, not {params.remote_engine_id!r} named in "
                            f"kv_transfer_params")
        return pending.outcome

    def _start_handshake(self, host: str, port: int) -> Handshake:
        if len(self.handshakes) >= MAX_PENDING_HANDSHAKES:
            raise RecvError(f"{MAX_PENDING_HANDSHAKES} handshakes already in flight; refusing another "
                            f"(prefill {host}:{port})")
        nonce, target = auth.new_nonce(), f"{host}:{port}"
        mac = auth.mac(self.secret, "hs-request", nonce, target) if self.secret else b""
        request = wire.HandshakeRequest(nonce=nonce, target=target, mac=mac)
        pending = Handshake(self.control.handshake(host, port, request), nonce, target)
        self.handshakes[(host, port)] = pending
        return pending

    def _complete_handshake(self, pending: Handshake, params: TransferParams) -> RemoteEngine | str:
        """Verify the reply and connect; a string is the reason it failed (counted once)."""
        start = time.perf_counter()
        try:
            reply = pending.future.result()
            remote = self._verified_remote(reply, pending, params)
        except (RecvError, side_channel.SideChannelError, auth.AuthError, LayoutError, ValueError) as e:
            self.handshake_failures += 1
            return f"handshake with prefill {pending.target} failed: {e}"
        except Exception as e:
            logger.exception("handshake with prefill %s failed", pending.target)
            self.handshake_failures += 1
            return f"handshake with prefill {pending.target} failed: {type(e).__name__}: {e}"
        logger.info("handshake with prefill %s (%s) in %.1f ms: %d source rank(s), format %s block %d -> %s "
                    "block %d, %s", remote.engine_id, pending.target, 1000 * (time.perf_counter() - start),
                    len(remote.sources), remote.sources[0].format.name, remote.sources[0].format.block_size,
                    self.local.format.name or "local", self.local.format.block_size, describe_path(remote))
        return remote

    def _verified_remote(self, reply: wire.Reply, pending: Handshake, params: TransferParams) -> RemoteEngine:
        if not isinstance(reply, wire.HandshakeReply):
            raise RecvError(f"answered the handshake with {type(reply).__name__}")
        if reply.version != wire.WIRE_VERSION:
            raise RecvError(f"speaks wire version {reply.version}, this decode {wire.WIRE_VERSION}; run the same "
                            f"vllm-hetero-pd release on both sides")
        if self.secret:
            auth.check(self.secret, "hs-reply", reply.mac, pending.nonce, pending.target, reply.engine_id,
                       wire.encode_ranks(reply.ranks))
        for r in reply.ranks:
            if not r.agent_name.startswith(f"{reply.engine_id}-"):
                raise RecvError(f"rank agent {r.agent_name!r} does not belong to engine {reply.engine_id!r}")
        host, port = params.remote_host, params.remote_port
        known = self.remotes.get(reply.engine_id)
        if known is not None and (known.host, known.port) == (host, port):
            return known  # the params named another engine id at this engine's address
        if known is not None:
            raise RecvError(f"{host}:{port} claims engine {reply.engine_id!r}, which is connected at "
                            f"{known.host}:{known.port}; refusing an impostor or stale params")
        for other in [r for r in self.remotes.values() if (r.host, r.port) == (host, port)]:
            self._evict(other, "its address now serves another engine (the prefill restarted)")
        self._make_room(reply.engine_id)
        remote = self._connect(reply.engine_id, host, port, reply.ranks)
        self.remotes[reply.engine_id] = remote
        return remote

    def _make_room(self, engine_id: str) -> None:
        if len(self.remotes) < self.config.max_remote_engines:
            return
        idle = [r for r in self.remotes.values() if r.users == 0]
        if not idle:
            raise RecvError(f"this decode already reads from max_remote_engines={self.config.max_remote_engines} "
                            f"busy prefill engines; raise max_remote_engines to add {engine_id!r}")
        self._evict(min(idle, key=lambda r: r.last_used), "least recently used, to make room")

    def _connect(self, engine_id: str, host: str, port: int, ranks: list[wire.RankInfo]) -> RemoteEngine:
        sources = choose_sources(ranks, self.local.format)
        try:
            checked = plan([r.format for r in sources], self.local.format)  # before any agent or staging exists
            direct = len(sources) == 1 and checked.is_identity and not self.config.host_staging
            layouts = [block_layout(r.format) for r in sources]
        except LayoutError as e:
            raise RecvError(f"prefill engine {engine_id!r} is incompatible with this decode: {e}") from None
        for r, layout in zip(sources, layouts):
            if len(r.layer_addrs) != len(layout.block_len) or any(len(a) != r.format.num_layers
                                                                 for a in r.layer_addrs):
                raise RecvError(f"rank {r.tp_rank} of engine {engine_id!r} sent layer addresses that do not match "
                                f"its format ({len(layout.block_len)} part(s) x {r.format.num_layers} layers)")
        added: dict[str, str] = {}  # export shards of one prefill rank share its NIXL agent
        lists: list[DescList] = []
        staging = None
        try:
            for r in sources:
                if r.agent_name not in added:
                    added[r.agent_name] = self._add_agent(r)
            staging = None if direct else self._staging([r.format for r in sources])
            for r, layout in zip(sources, layouts):  # NIXL refuses rows outside what the peer registered
                rows = block_descs(layout, r.layer_addrs, list(range(r.format.num_blocks)))
                lists.append(self.agent.prepare(added[r.agent_name], rows, Memory(r.mem_type, r.device_id)))
        except Exception:
            self._disconnect(lists, added.values(), staging)
            raise
        compiled = None if direct else plan(staging.formats, self.local.format)
        if compiled is not None:
            warm_up(compiled)  # a dtype conversion's loop, once per process (then numba's disk cache)
        return RemoteEngine(engine_id, host, port, sources, [added[r.agent_name] for r in sources], layouts,
                            compiled, staging, lists)

    def _disconnect(self, lists: list[DescList], agents, staging: Staging | None) -> None:
        """Give NIXL back what connecting to one engine took: prepared lists first, then agents and staging."""
        for dlist in lists + (staging.lists if staging is not None else []):
            self.agent.release(dlist)
        for name in set(agents):
            self.agent.remove_remote(name)
        if staging is not None:
            self.agent.deregister(staging.registration)

    def _add_agent(self, rank: wire.RankInfo) -> str:
        if any(rank.agent_name in r.agent_names for r in self.remotes.values()):
            raise RecvError(f"NIXL agent {rank.agent_name!r} is already connected for another engine")
        name = self.agent.add_remote(rank.agent_metadata)
        if name != rank.agent_name:
            self.agent.remove_remote(name)
            raise RecvError(f"agent metadata names {name!r}, but the rank claims {rank.agent_name!r}")
        return name

    def _staging(self, formats: list[KVFormat]) -> Staging:
        per_slot = sum(f.nbytes_per_block * f.num_layers for f in formats)
        if per_slot > self.config.staging_mib * 2**20:  # the peer picks its block size: bound the pool anyway
            raise RecvError(f"one staging slot for this prefill's blocks ({formats[0].block_size} tokens) needs "
                            f"{per_slot / 2**20:.1f} MiB, more than staging_mib={self.config.staging_mib}; raise it")
        capacity = max(1, self.config.staging_mib * 2**20 // per_slot)
        formats = [msgspec.structs.replace(f, num_blocks=capacity, num_pad_blocks=0) for f in formats]
        host = self.config.host_staging
        buffers = [allocate_host(f) if host else allocate(f, self.local.device) for f in formats]
        memory = Memory("DRAM") if host else self.local.memory
        tensors = [t for b in buffers for t in (b if isinstance(b, tuple) else (b,))]
        registration = self.agent.register([(t.data_ptr(), t.nbytes) for t in tensors], memory.mem_type,
                                           memory.device_id)
        addrs = [whole_cache_layer_addrs(f, [t.data_ptr() for t in (b if isinstance(b, tuple) else (b,))])
                 for f, b in zip(formats, buffers)]
        layouts = [block_layout(f) for f in formats]
        try:
            lists = [self.agent.prepare("", block_descs(lay, a, list(range(capacity))), memory)
                     for lay, a in zip(layouts, addrs)]
        except Exception:
            self.agent.deregister(registration)
            raise
        logger.info("staging pool in %s: %d blocks x %d source rank(s) (%.1f MiB)", memory.mem_type, capacity,
                    len(formats), capacity * per_slot / 2**20)
        return Staging(formats, buffers, layouts, addrs, list(range(capacity)), registration, memory, lists)

    def _forget_handshakes(self) -> None:
        """Processed handshakes served every waiter of this poll; the next request starts afresh.
        An answer nobody waits for any more is dropped after a while, so the table stays bounded."""
        stale = time.monotonic() - 4 * self.config.handshake_timeout_s - 1
        self.handshakes = {k: h for k, h in self.handshakes.items()
                           if h.outcome is None and not (h.future.done() and h.started < stale)}

    def _evict(self, remote: RemoteEngine, why: str) -> None:
        if remote.users:
            return  # still in use: it goes once idle
        logger.info("disconnecting prefill engine %s (%s:%d): %s", remote.engine_id, remote.host, remote.port, why)
        self.remotes.pop(remote.engine_id, None)
        self._disconnect(remote.lists, remote.agent_names, remote.staging)

    def _evict_idle(self) -> None:
        cutoff = time.monotonic() - self.config.remote_idle_s
        for remote in [r for r in self.remotes.values() if r.users == 0 and r.last_used < cutoff]:
            self._evict(remote, f"idle for remote_idle_s={self.config.remote_idle_s:g}")

    # ------------------------------------------------------------------ lease
    def _send_pin(self, t: Transfer) -> None:
        p = t.params
        request = wire.PinRequest(request_id=p.remote_request_id, lease_token=p.lease_token, reader=t.reader,
                                  block_ids=p.remote_block_ids[t.next_block:t.end_block])
        t.pin_sent, t.pin = time.monotonic(), self.control.lease(t.remote.host, t.remote.port, request)

    def _pin_answered(self, t: Transfer) -> bool:
        """Take a pin's answer if it came; True once the first pin confirmed the lease."""
        if t.pin is not None and t.pin.done():
            future, t.pin = t.pin, None
            t.pinned = True  # it may have reached the prefill even if the answer did not come back
            try:
                remaining = future.result().remaining_s
            except side_channel.PeerRefused as e:
                raise RecvError(f"the prefill refused the lease: {e}") from None
            except side_channel.SideChannelError as e:
                if t.lease_deadline == 0:
                    raise RecvError(f"could not pin the lease: {e}") from None
                logger.warning("heartbeat for request %s failed (will retry): %s", t.job.request_id, e)
                t.next_pin = time.monotonic() + min(self.config.heartbeat_s, 1.0)
            else:
                t.lease_deadline = t.pin_sent + remaining
                t.next_pin = time.monotonic() + min(self.config.heartbeat_s, remaining / 3)
                return True
        return t.lease_deadline > 0

    def _maybe_pin(self, t: Transfer) -> None:
        if t.pin is None and time.monotonic() >= t.next_pin:
            self._send_pin(t)

    # ------------------------------------------------------------------ chunks
    def _post_chunk(self, t: Transfer) -> bool:
        """Post READs for the next chunk; False when staging is full (the transfer waits its turn)."""
        remote, ids, staging = t.remote, t.params.remote_block_ids, t.remote.staging
        if staging is None:
            first, end = t.next_block, t.end_block
            dst = [(self.local_list, self.local.format.num_blocks, t.job.local_block_ids[first:end])]
        else:
            n = min(t.end_block - t.next_block, len(staging.free) or 1)
            slots = staging.take(n)
            if slots is None:
                return False
            first, end = t.next_block, t.next_block + n
            t.slots = slots
            dst = [(dlist, f.num_blocks, slots) for dlist, f in zip(staging.lists, staging.formats)]
        t.posted = time.monotonic()
        t.chunk, t.next_block = (first, end), end
        for (local, num_local, local_ids), source, src in zip(dst, remote.sources, remote.lists):
            src_ids = block_indices(len(src.rows), source.format.num_blocks, ids[first:end])
            t.reads.append(self.agent.read(local, block_indices(len(local.rows), num_local, local_ids), src, src_ids))
            t.stats.bytes += int(src.rows[src_ids, 1].sum())
        return True

    def _land_chunk(self, t: Transfer) -> None:
        """Translate a staged chunk into the KV cache, then return its staging slots."""
        staging = t.remote.staging
        if staging is None:
            return
        bs = staging.formats[0].block_size
        first, end = t.chunk
        start = time.perf_counter()
        translate(t.remote.plan, staging.buffers, self.local.kv_caches,
                  src_block_ids=[0] * first + t.slots, dst_block_ids=t.job.local_block_ids,
                  start=max(t.job.start, first * bs), stop=min(t.job.stop, end * bs))
        wait_for_device(self.local.device)  # the next READ into these slots must not race the copy
        t.stats.translate_s += time.perf_counter() - start
        staging.give_back(t.slots)
        t.slots = []

    # ------------------------------------------------------------------ endings
    def _finish(self, t: Transfer) -> None:
        if self.config.debug_corrupt_transfers:
            corrupt_first_block(self.local.kv_caches, t.job)
        self._end(t)
        t.stats.total_s = time.monotonic() - t.started
        self.finished_stats.append(t.stats)
        self.done.add(t.job.request_id)

    def _fail(self, t: Transfer, reason: str) -> None:
        if not t.failure:
            logger.error("KV load for request %s failed: %s", t.job.request_id, reason)
            t.failure, t.phase = reason, Phase.DRAIN
        self._drain(t)

    def _drain(self, t: Transfer) -> None:
        """Report the failure once NIXL can no longer write into the request's blocks or slots."""
        t.reads = [r for r in t.reads if not self.agent.abort(r)]
        if t.reads:
            return
        self._end(t)
        self._report_failure(t.job, t.failure)

    def _end(self, t: Transfer) -> None:
        """Give back what the transfer holds and release its lease (only to a verified prefill)."""
        self.active.pop(t.job.request_id, None)
        remote = t.remote
        if remote is None:
            return
        if remote.staging is not None and t.slots:
            remote.staging.give_back(t.slots)
            t.slots = []
        if t.pinned or t.pin is not None:
            self._release(remote, t.params, t.reader)
        remote.users -= 1
        remote.last_used = time.monotonic()

    def _report_failure(self, job: RecvJob, reason: str) -> None:
        self.failed[job.request_id] = reason
        bs = self.local.format.block_size
        self.bad_blocks.update(job.local_block_ids[job.start // bs: math.ceil(job.stop / bs)])

    def _release(self, remote: RemoteEngine, params: TransferParams, reader: str) -> None:
        request = wire.ReleaseRequest(request_id=params.remote_request_id, lease_token=params.lease_token,
                                      reader=reader, num_readers=self.num_ranks)
        self.control.lease(remote.host, remote.port, request).add_done_callback(_log_release_failure)

    def _send_releases(self) -> None:
        """Releases of requests that read nothing wait for their prefill's handshake like a READ does."""
        waiting = []
        for pending in self.releases:
            try:
                remote = self._resolve(pending.job.params)
            except RecvError as e:
                logger.warning("not releasing request %s on an unverified prefill: %s", pending.job.request_id, e)
                continue
            if remote is None:
                waiting.append(pending)
            else:
                self._release(remote, pending.job.params, pending.reader)
        self.releases = waiting

    def staging_occupancy(self) -> float:
        pools = [r.staging for r in self.remotes.values() if r.staging is not None]
        total = sum(p.formats[0].num_blocks for p in pools)
        return 1 - sum(len(p.free) for p in pools) / total if total else 0.0

    def take_bad_blocks(self) -> set[int]:
        out, self.bad_blocks = self.bad_blocks, set()
        return out


def describe_path(remote: RemoteEngine) -> str:
    """How this engine's KV reaches the cache, for the handshake log (the demo prints it)."""
    source = f"from {remote.sources[0].mem_type}"
    if remote.staging is None:
        return f"direct READ {source} into the KV cache (same format)"
    step = "copy" if remote.plan.is_identity else "translate"
    return f"READ {source} into {remote.staging.memory.mem_type} staging, then {step} into the KV cache"


def _log_release_failure(future: Future) -> None:
    error = future.exception()
    if error is not None:
        logger.warning("could not release a lease on its prefill (it will expire): %s", error)


def wait_for_device(device: torch.device) -> None:
    """Block until queued copies on ``device`` are done (CUDA/ROCm streams, HPU lazy graphs; CPU: no-op)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    elif device.type == "hpu":
        torch.hpu.synchronize()


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
