"""The decode's ``Receiver`` against a real prefill side in this process, in milliseconds.

The prefill is a real ``ConnectorScheduler`` (its lease table and its side-channel server on a
loopback port) whose rank points into a CPU tensor of known KV bytes; the decode is a real
``Receiver`` with a real ``ControlPlane``. NIXL is ``FakeNixlAgent``, which copies the bytes and
can hold, fail or refuse to cancel READs. Hostile peers are raw TCP servers that answer frames
with whatever a test wants. Every ``poll()`` is timed: the worker's step must never block.
"""

from __future__ import annotations

import math
import random
import socket
import struct
import threading
import time
from types import SimpleNamespace

import msgspec
import pytest
import torch
from vllm.v1.request import RequestStatus

from vllm_hetero_pd import kv_params
from vllm_hetero_pd.config import ConnectorConfig
from vllm_hetero_pd.connector.control import ControlPlane
from vllm_hetero_pd.connector.metadata import RankHandshake, RecvJob, ReleaseJob
from vllm_hetero_pd.connector.receiver import LocalCache, Receiver
from vllm_hetero_pd.connector.scheduler import ConnectorScheduler
from vllm_hetero_pd.formats.presets import preset
from vllm_hetero_pd.ports import free_port
from vllm_hetero_pd.shim import allocate, decode
from vllm_hetero_pd.transport import wire
from vllm_hetero_pd.transport.block_layout import block_layout, whole_cache_layer_addrs
from vllm_hetero_pd.transport.nixl_agent import Memory

import fake_nixl
from fake_nixl import FakeNixlAgent

# A side-channel call made inside poll would block it for up to handshake_timeout_s (1 s here); the
# bound leaves room for a loaded 2-core box (vLLM engines of other tests running next door).
MAX_POLL_S = 0.25
SECRET_ENV = "HETERO_PD_TEST_SECRET"


def fmt(name="cuda/flash_attn/C/LBNHC", *, bs=16, num_blocks=16, layers=2, heads=2, head_size=32, **kw):
    return preset(name).build(num_layers=layers, num_blocks=num_blocks, num_kv_heads=heads, head_size=head_size,
                              dtype="float32", block_size=bs, **kw)


PREFILL_FMT = fmt()
DIRECT_FMT = fmt(num_blocks=12)  # same bytes per block as the prefill: READ straight into the cache
STAGED_FMT = fmt("cpu/cpu_attn/vec", bs=32, num_blocks=8)  # other layout and block size: stage + translate
# 6 layers x 8 heads x 128 dims x bs 16 x fp32 = 768 KiB per staging slot: staging_mib=1 holds one slot.
BIG_PREFILL_FMT = fmt(num_blocks=12, layers=6, heads=8, head_size=128)
BIG_STAGED_FMT = fmt("cpu/cpu_attn/vec", bs=32, num_blocks=8, layers=6, heads=8, head_size=128)


# The fake NIXL checks each descriptor against the memory type and device id it was registered
# with, as NIXL does: a READ built with the wrong side's type or device 0 fails these tests.
GPU_1, HOST = Memory("VRAM", 1), Memory("DRAM")


# ---------------------------------------------------------------------------------------------- prefill
class Prefill:
    """A prefill engine: KV bytes in a CPU tensor, its NIXL agent, and its real ConnectorScheduler."""

    def __init__(self, engine_id: str, kv_fmt=PREFILL_FMT, *, lease_s=5.0, secret_env="", memory=HOST):
        self.engine_id, self.fmt = engine_id, kv_fmt
        self.buffer = allocate(kv_fmt)
        self.buffer.copy_(torch.randint(-2**31, 2**31 - 1, self.buffer.shape, dtype=torch.int32))
        self.agent = FakeNixlAgent(f"{engine_id}-tp0")
        self.agent.register([(self.buffer.data_ptr(), self.buffer.nbytes)], memory.mem_type, memory.device_id)
        self.rank = wire.RankInfo(tp_rank=0, agent_name=self.agent.name, agent_metadata=self.agent.metadata(),
                                  format=kv_fmt, layer_addrs=whole_cache_layer_addrs(kv_fmt, [self.buffer.data_ptr()]),
                                  mem_type=memory.mem_type, device_id=memory.device_id)
        config = ConnectorConfig(side_channel_host="127.0.0.1", side_channel_port=free_port(), lease_s=lease_s,
                                 heartbeat_s=min(0.1, lease_s / 2), side_channel_secret_env=secret_env)
        vllm_config = SimpleNamespace(cache_config=SimpleNamespace(block_size=kv_fmt.block_size),
                                      parallel_config=SimpleNamespace(tensor_parallel_size=1, data_parallel_rank=0))
        self.sched = ConnectorScheduler(vllm_config, config, engine_id, is_producer=True, is_consumer=False)
        self.sched.set_xfer_handshake_metadata({0: RankHandshake([wire.encode(self.rank)])})
        self.port = self.sched.server.port
        self._free_blocks = random.Random(engine_id).sample(range(kv_fmt.num_blocks), kv_fmt.num_blocks)
        self.freed: list[str] = []

    def lease(self, request_id: str, num_tokens: int) -> kv_params.TransferParams:
        """Finish a ``do_remote_decode`` request on scattered blocks; return the params it answers with."""
        n = math.ceil(num_tokens / self.fmt.block_size)
        blocks, self._free_blocks = self._free_blocks[:n], self._free_blocks[n:]
        request = SimpleNamespace(request_id=request_id, kv_transfer_params=kv_params.prefill_request_params(),
                                  status=RequestStatus.FINISHED_LENGTH_CAPPED,
                                  prompt_token_ids=list(range(1000, 1000 + num_tokens)))
        delay, params = self.sched.request_finished(request, blocks)
        assert delay
        return kv_params.parse_transfer_params(params)

    def take_freed(self) -> list[str]:
        self.freed += self.sched.leases.take_freed()
        return self.freed

    def close(self) -> None:
        # socketserver's shutdown waits up to its 0.5 s poll interval; nothing needs to wait for it.
        threading.Thread(target=self.sched.shutdown, daemon=True).start()


# ---------------------------------------------------------------------------------------------- decode
def local_cache(kv_fmt, memory=HOST) -> tuple[torch.Tensor, LocalCache]:
    """A zeroed cache as vLLM hands it to register_kv_caches: one view per layer into one allocation."""
    whole = allocate(kv_fmt)
    layout = block_layout(kv_fmt)
    step = layout.layer_stride[0] // whole.element_size()
    views = {f"model.layers.{l}.attn": whole[l * step:(l + 1) * step] for l in range(kv_fmt.num_layers)}
    return whole, LocalCache(kv_fmt, views, layout, [[v.data_ptr() for v in views.values()]], memory.mem_type,
                             memory.device_id)


class Decode:
    def __init__(self, kv_fmt=DIRECT_FMT, *, name="decode-tp0", num_ranks=1, max_poll_s=MAX_POLL_S,
                 memory=HOST, **config):
        self.fmt, self.max_poll_s = kv_fmt, max_poll_s
        self.agent = FakeNixlAgent(name)
        self.whole, self.local = local_cache(kv_fmt, memory)
        self.agent.register([(self.whole.data_ptr(), self.whole.nbytes)], memory.mem_type, memory.device_id)
        config = {"handshake_timeout_s": 1.0, "transfer_timeout_s": 2.0, "heartbeat_s": 0.1, "staging_mib": 1,
                  **config}
        self.config = ConnectorConfig(**config)
        self.control = ControlPlane(self.config.handshake_timeout_s)
        self.receiver = Receiver(self.agent, self.config, self.local, num_ranks, self.control)
        self.done: set[str] = set()
        self.failed: dict[str, str] = {}
        self.slowest_poll = 0.0
        self._next_block = 0

    def job(self, prefill: Prefill, request_id: str, num_tokens: int, *, start=0,
            params: kv_params.TransferParams | None = None) -> RecvJob:
        params = params or prefill.lease(request_id, num_tokens)
        n = math.ceil(num_tokens / self.fmt.block_size)
        ids = [(self._next_block + i) % self.fmt.num_blocks for i in range(n)][::-1]  # scattered, descending
        self._next_block += n
        return RecvJob(f"decode-{request_id}", ids, start, num_tokens, params)

    def poll(self) -> None:
        start = time.perf_counter()
        done, failed = self.receiver.poll()
        elapsed = time.perf_counter() - start
        self.slowest_poll = max(self.slowest_poll, elapsed)
        assert elapsed < self.max_poll_s, f"Receiver.poll blocked the engine step for {elapsed * 1000:.0f} ms"
        assert not (done & set(failed)), "a request reported both loaded and failed"
        assert not (done & self.done) and not (set(failed) & set(self.failed)), "a request reported twice"
        self.done |= done
        self.failed.update(failed)

    def run(self, until, timeout=3.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if until():
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s: done={self.done} failed={self.failed}")
            time.sleep(0.002)

    def finish(self, *jobs: RecvJob, timeout=3.0) -> None:
        ids = {j.request_id for j in jobs}
        self.run(lambda: ids <= self.done | set(self.failed), timeout)

    def idle(self, seconds: float) -> None:
        """Keep polling (as the engine does every step) for ``seconds``."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.poll()
            time.sleep(0.002)

    def close(self) -> None:
        self.control.shutdown()


# ---------------------------------------------------------------------------------------------- fakes
def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


class RawServer:
    """A fake side channel on a loopback port: ``respond(request bytes)`` returns the bytes to send
    back (framing included), or None to never answer (a black hole). Records every request."""

    def __init__(self, respond):
        self.respond, self.requests = respond, []
        self._stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(5)
                while True:
                    header = _recv_exact(conn, 4)
                    payload = _recv_exact(conn, struct.unpack(">I", header)[0])
                    try:
                        self.requests.append(wire.decode_request(payload))
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        self.requests.append(payload)
                    reply = self.respond(payload)
                    if reply is None:
                        self._stop.wait(10)
                        return
                    conn.sendall(reply)
            except OSError:
                return

    def kinds(self) -> list[str]:
        return [type(r).__name__ for r in self.requests]

    def close(self) -> None:
        self._stop.set()
        self._sock.close()


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


class Proxy:
    """A TCP relay: whatever dials it talks to ``target_port``."""

    def __init__(self, target_port: int):
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port, self.target = self._sock.getsockname()[1], target_port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    def close(self) -> None:
        self._sock.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def shadow_rank(engine_id: str, kv_fmt=PREFILL_FMT, agent_suffix="tp0") -> wire.RankInfo:
    """A rank a fake prefill advertises: real (registered) memory, so only the protocol is fake."""
    agent = FakeNixlAgent(f"{engine_id}-{agent_suffix}")
    buffer = allocate(kv_fmt)
    agent.register([(buffer.data_ptr(), buffer.nbytes)], "DRAM")
    agent.buffer = buffer  # keep it alive as long as the agent
    return wire.RankInfo(tp_rank=0, agent_name=agent.name, agent_metadata=agent.metadata(), format=kv_fmt,
                         layer_addrs=whole_cache_layer_addrs(kv_fmt, [buffer.data_ptr()]), mem_type="DRAM")


def forged_params(engine_id: str, port: int, *, num_tokens=32, blocks=(0, 1),
                  request_id="victim") -> kv_params.TransferParams:
    return kv_params.TransferParams(do_remote_prefill=True, remote_engine_id=engine_id, remote_request_id=request_id,
                                    remote_host="127.0.0.1", remote_port=port, remote_block_ids=list(blocks),
                                    remote_num_tokens=num_tokens, lease_token="forged-token", prompt_digest="0" * 32)


ACK = object()


def answering(handshake: bytes | None, pin=ACK, release=ACK):
    """A ``respond`` for RawServer by request kind (None: never answer that kind; ACK: say yes)."""
    pin = frame(wire.encode(wire.PinReply(remaining_s=30.0))) if pin is ACK else pin
    release = frame(wire.encode(wire.Ack())) if release is ACK else release

    def respond(payload: bytes):
        try:
            request = wire.decode_request(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return frame(wire.encode(wire.Error(message="bad request")))
        return {wire.HandshakeRequest: handshake, wire.PinRequest: pin, wire.ReleaseRequest: release}[type(request)]

    return respond


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def world():
    """Factories whose prefills, decodes and fake servers are closed after the test."""
    made = []

    def keep(obj):
        made.append(obj)
        return obj

    yield SimpleNamespace(prefill=lambda *a, **kw: keep(Prefill(*a, **kw)),
                          decode=lambda *a, **kw: keep(Decode(*a, **kw)),
                          server=lambda respond: keep(RawServer(respond)),
                          proxy=lambda port: keep(Proxy(port)))
    for obj in reversed(made):
        obj.close()
    fake_nixl.close_all()


def assert_loaded_exactly(decode_side: Decode, prefill: Prefill, job: RecvJob) -> None:
    """Poll until ``job`` ends; it must have loaded, and exactly."""
    decode_side.finish(job)
    assert job.request_id in decode_side.done, decode_side.failed.get(job.request_id)
    assert_exact(decode_side, prefill, job)


def assert_exact(decode_side: Decode, prefill: Prefill, job: RecvJob) -> None:
    """The decode's blocks hold exactly the prefill's KV for positions [start, stop), zeros before."""
    n = job.stop
    k_ref, v_ref = decode(prefill.fmt, prefill.buffer, job.params.remote_block_ids, n)
    k, v = decode(decode_side.fmt, decode_side.whole, job.local_block_ids, n)
    assert torch.equal(k[:, job.start:].view(torch.int32), k_ref[:, job.start:].view(torch.int32))
    assert torch.equal(v[:, job.start:].view(torch.int32), v_ref[:, job.start:].view(torch.int32))
    assert not k[:, :job.start].view(torch.int32).any(), "positions before start must stay untouched"


def assert_untouched(decode_side: Decode, busy_blocks) -> None:
    """Blocks no job owned are still zero: nothing was written out of bounds."""
    others = [b for b in range(decode_side.fmt.num_blocks) if b not in set(busy_blocks)]
    k, v = decode(decode_side.fmt, decode_side.whole, others, len(others) * decode_side.fmt.block_size)
    assert not k.view(torch.int32).any() and not v.view(torch.int32).any()


def wait_freed(prefill: Prefill, request_id: str, timeout=2.0) -> None:
    deadline = time.monotonic() + timeout
    while request_id not in prefill.take_freed():
        assert time.monotonic() < deadline, f"prefill never freed {request_id}: leases={len(prefill.sched.leases)}"
        time.sleep(0.005)


def staging_of(d: Decode, prefill: Prefill):
    return d.receiver.remotes[prefill.engine_id].staging


# ---------------------------------------------------------------------------------------------- happy paths
def test_direct_path_lands_the_bytes_exactly_and_releases_the_lease(world):
    prefill, d = world.prefill("prefill-a"), world.decode(DIRECT_FMT)
    job = d.job(prefill, "r1", 40)  # 3 blocks, the last one partial
    d.receiver.add(job)
    d.finish(job)
    assert d.done == {job.request_id} and not d.failed
    assert d.receiver.remotes["prefill-a"].staging is None, "identical formats must READ straight into the cache"
    assert_exact(d, prefill, job)
    assert_untouched(d, job.local_block_ids)
    wait_freed(prefill, "r1")
    assert len(prefill.sched.leases) == 0 and d.agent.outstanding == 0 and not d.receiver.active
    assert d.receiver.take_bad_blocks() == set()


def test_staged_path_translates_exactly_across_block_size_and_layout(world):
    prefill, d = world.prefill("prefill-a"), world.decode(STAGED_FMT)
    jobs = [d.job(prefill, "r1", 70), d.job(prefill, "r2", 50, start=32)]  # r2: a local prefix hit of 32 tokens
    for job in jobs:
        d.receiver.add(job)
    d.finish(*jobs)
    assert d.done == {j.request_id for j in jobs}
    for job in jobs:
        assert_exact(d, prefill, job)
    assert_untouched(d, [b for j in jobs for b in j.local_block_ids])
    staging = staging_of(d, prefill)
    assert staging is not None and len(staging.free) == staging.formats[0].num_blocks
    for rid in ("r1", "r2"):
        wait_freed(prefill, rid)


@pytest.mark.parametrize("prefill_mem, decode_mem", [(HOST, GPU_1), (GPU_1, HOST), (Memory("VRAM", 2), GPU_1)],
                         ids=["host-to-gpu1", "gpu1-to-host", "gpu2-to-gpu1"])
def test_descriptors_carry_each_sides_memory_type_and_device(world, prefill_mem, decode_mem):
    prefill = world.prefill("prefill-a", memory=prefill_mem)
    d = world.decode(DIRECT_FMT, memory=decode_mem)
    job = d.job(prefill, "r1", 40)
    d.receiver.add(job)
    d.finish(job)
    assert d.done == {job.request_id} and not d.failed, d.failed
    assert_exact(d, prefill, job)


@pytest.mark.parametrize("kv_fmt", [DIRECT_FMT, STAGED_FMT], ids=["same-format", "translated"])
def test_host_staging_reads_into_host_dram_then_lands_exactly(world, kv_fmt):
    """A staging decode never READs into its (device) cache, even when formats are equal."""
    prefill = world.prefill("prefill-a", memory=GPU_1)
    d = world.decode(kv_fmt, memory=Memory("VRAM", 0), host_staging=True)
    jobs = [d.job(prefill, "r1", 70), d.job(prefill, "r2", 50, start=32)]
    for job in jobs:
        d.receiver.add(job)
    d.finish(*jobs)
    assert d.done == {j.request_id for j in jobs} and not d.failed, d.failed
    staging = staging_of(d, prefill)
    assert staging is not None and staging.memory == HOST
    assert d.agent.registered[staging.registration][1] == HOST
    for job in jobs:
        assert_exact(d, prefill, job)
    assert len(staging.free) == staging.formats[0].num_blocks
    for rid in ("r1", "r2"):
        wait_freed(prefill, rid)


def test_back_pressure_on_a_one_slot_staging_pool(world):
    """Three requests of three blocks each share one staging slot: they take turns, chunk by chunk."""
    prefill = world.prefill("prefill-big", BIG_PREFILL_FMT)
    # A fake READ completes at once, so one poll lands every chunk: 7 MB of translation, not I/O.
    d = world.decode(BIG_STAGED_FMT, staging_mib=1, max_poll_s=2.0)
    jobs = [d.job(prefill, f"r{i}", 40) for i in range(3)]
    for job in jobs:
        d.receiver.add(job)
    d.finish(*jobs)
    assert d.done == {j.request_id for j in jobs} and not d.failed
    staging = staging_of(d, prefill)
    assert staging.formats[0].num_blocks == 1, "the geometry is meant to give a one-slot pool"
    assert staging.free == [0] and d.receiver.staging_occupancy() == 0
    assert d.agent.reads_posted == 9  # one READ per chunk of one block
    for job in jobs:
        assert_exact(d, prefill, job)
        wait_freed(prefill, job.params.remote_request_id)


def test_heartbeats_hold_the_lease_through_a_read_longer_than_lease_s(world):
    prefill = world.prefill("prefill-a", lease_s=0.5)
    d = world.decode(DIRECT_FMT, heartbeat_s=0.05)
    job = d.job(prefill, "r1", 32)
    d.agent.hold = True
    d.receiver.add(job)
    d.idle(1.2)  # 2.4 x lease_s with the READ in flight
    assert prefill.take_freed() == [], "the prefill freed blocks that a READ was still reading"
    d.agent.release_held()
    d.finish(job)
    assert d.done == {job.request_id}
    assert_exact(d, prefill, job)
    wait_freed(prefill, "r1")


def test_two_decode_ranks_share_one_lease(world):
    """Each TP rank of the decode reads and releases; the prefill frees only after the last one."""
    prefill = world.prefill("prefill-a")
    ranks = [world.decode(DIRECT_FMT, name=f"decode-tp{i}", num_ranks=2) for i in range(2)]
    params = prefill.lease("r1", 32)
    jobs = [d.job(prefill, "r1", 32, params=params) for d in ranks]
    ranks[1].agent.hold = True
    for d, job in zip(ranks, jobs):
        d.receiver.add(job)
    ranks[0].finish(jobs[0])
    ranks[1].idle(0.2)
    assert prefill.take_freed() == [], "the first rank's release freed blocks the second still reads"
    ranks[1].agent.release_held()
    ranks[1].finish(jobs[1])
    wait_freed(prefill, "r1")
    for d, job in zip(ranks, jobs):
        assert d.done == {job.request_id}
        assert_exact(d, prefill, job)


# ---------------------------------------------------------------------------------------------- READ faults
def _assert_failed_cleanly(d: Decode, prefill: Prefill, job: RecvJob, match: str) -> None:
    assert job.request_id in d.failed and job.request_id not in d.done
    assert match in d.failed[job.request_id], d.failed[job.request_id]
    assert d.receiver.take_bad_blocks() == set(job.local_block_ids)
    assert d.agent.outstanding == 0 and not d.receiver.active
    for remote in d.receiver.remotes.values():
        assert remote.users == 0
        if remote.staging is not None:
            assert sorted(remote.staging.free) == list(range(remote.staging.formats[0].num_blocks)), "slots leaked"
    wait_freed(prefill, job.params.remote_request_id)


def _report_watcher(d: Decode):
    """Record NIXL's outstanding handles at the moment each failure is reported."""
    seen = {}
    poll = d.receiver.poll

    def watched():
        done, failed = poll()
        for rid in failed:
            seen[rid] = d.agent.outstanding
        return done, failed

    d.receiver.poll = watched
    return seen


@pytest.mark.parametrize("kv_fmt", [DIRECT_FMT, STAGED_FMT], ids=["direct", "staged"])
def test_read_timeout_fails_after_nixl_lets_go_and_returns_everything(world, kv_fmt):
    prefill, d = world.prefill("prefill-a"), world.decode(kv_fmt, transfer_timeout_s=0.2)
    seen = _report_watcher(d)
    job = d.job(prefill, "r1", 40)
    d.agent.hold = True
    d.receiver.add(job)
    start = time.monotonic()
    d.finish(job)
    assert time.monotonic() - start >= 0.2
    _assert_failed_cleanly(d, prefill, job, "did not finish within transfer_timeout_s=0.2")
    assert seen[job.request_id] == 0 and d.agent.reads_aborted >= 1
    # The pool is not wedged: the next request goes through.
    d.agent.release_held()
    again = d.job(prefill, "r2", 40)
    d.receiver.add(again)
    d.finish(again)
    assert again.request_id in d.done
    assert_exact(d, prefill, again)


@pytest.mark.parametrize("kv_fmt", [DIRECT_FMT, STAGED_FMT], ids=["direct", "staged"])
@pytest.mark.parametrize("fault", ["fail", "fail_post"])
def test_read_error_fails_that_request_and_returns_everything(world, kv_fmt, fault):
    prefill, d = world.prefill("prefill-a"), world.decode(kv_fmt)
    job = d.job(prefill, "r1", 70)
    setattr(d.agent, fault, True)
    d.receiver.add(job)
    d.finish(job)
    _assert_failed_cleanly(d, prefill, job, "NIXL READ from prefill prefill-a failed" if fault == "fail"
                           else "could not be posted")
    setattr(d.agent, fault, False)
    again = d.job(prefill, "r2", 70)
    d.receiver.add(again)
    d.finish(again)
    assert again.request_id in d.done
    assert_exact(d, prefill, again)


def test_nixl_raising_while_polling_fails_that_request_only(world):
    prefill, d = world.prefill("prefill-a"), world.decode(STAGED_FMT)
    bad = d.job(prefill, "r1", 40)
    d.agent.hold = True
    d.receiver.add(bad)
    d.run(lambda: d.agent.outstanding == 1)
    d.agent.poll_raises = True
    d.finish(bad)
    d.agent.poll_raises = d.agent.hold = False
    _assert_failed_cleanly(d, prefill, bad, "fake check_xfer_state failure")
    again = d.job(prefill, "r2", 40)
    d.receiver.add(again)
    d.finish(again)
    assert again.request_id in d.done


def test_uncancellable_read_is_reported_only_once_it_has_completed(world):
    """Reporting a failure lets vLLM free and reuse the blocks: NIXL must not write into them after."""
    prefill, d = world.prefill("prefill-a"), world.decode(DIRECT_FMT, transfer_timeout_s=0.1)
    seen = _report_watcher(d)
    job = d.job(prefill, "r1", 40)
    d.agent.hold = d.agent.uncancellable = True
    d.receiver.add(job)
    d.idle(0.5)  # well past the timeout
    assert not d.failed and not d.done, "a failure was reported while NIXL could still write into the blocks"
    assert d.agent.outstanding == 1
    d.agent.release_held()
    d.finish(job)
    assert job.request_id in d.failed and "transfer_timeout_s" in d.failed[job.request_id]
    assert seen[job.request_id] == 0 and len(d.agent.writes) == 1  # the late write landed before the report
    assert d.receiver.take_bad_blocks() == set(job.local_block_ids)
    wait_freed(prefill, "r1")


# ---------------------------------------------------------------------------------------------- lease loss
def test_lease_lost_while_a_read_runs_fails_and_never_succeeds(world):
    """The prefill becomes unreachable mid-READ: heartbeats fail, its lease expires there, and the
    READ (which NIXL cannot cancel) completes afterwards. The load must fail, not succeed."""
    prefill = world.prefill("prefill-a", lease_s=0.4)
    d = world.decode(DIRECT_FMT, heartbeat_s=0.05, transfer_timeout_s=5.0)
    job = d.job(prefill, "r1", 32)
    d.agent.hold = d.agent.uncancellable = True
    d.receiver.add(job)
    d.run(lambda: d.agent.outstanding == 1 and d.receiver.active[job.request_id].lease_deadline > 0)
    prefill.sched.shutdown()  # the prefill's side channel goes away: heartbeats now fail
    d.idle(0.8)
    wait_freed(prefill, "r1")  # the prefill expired the lease: the blocks may be reused
    assert not d.done and not d.failed  # failed, but NIXL still holds the READ
    d.agent.release_held()
    d.finish(job)
    assert job.request_id in d.failed and job.request_id not in d.done
    assert "ran out" in d.failed[job.request_id], d.failed[job.request_id]
    assert d.receiver.take_bad_blocks() == set(job.local_block_ids) and d.agent.outstanding == 0


def test_lease_expired_on_the_prefill_is_refused_at_the_next_heartbeat(world):
    prefill = world.prefill("prefill-a", lease_s=5.0)
    d = world.decode(DIRECT_FMT, heartbeat_s=0.05, transfer_timeout_s=10.0)
    job = d.job(prefill, "r1", 32)
    d.agent.hold = True
    d.receiver.add(job)
    d.run(lambda: d.agent.outstanding == 1)
    table = prefill.sched.leases
    table._clock = lambda: time.monotonic() + 60  # the prefill's view: the lease ran out long ago
    start = time.monotonic()
    d.finish(job)
    assert time.monotonic() - start < 2.0
    assert "refused the lease" in d.failed[job.request_id] and "expired" in d.failed[job.request_id]
    assert d.receiver.take_bad_blocks() == set(job.local_block_ids) and d.agent.outstanding == 0


# ---------------------------------------------------------------------------------------------- stalls
def test_black_holed_pins_fail_within_the_deadline_and_never_block_poll(world):
    prefill = world.prefill("prefill-a")
    rank = shadow_rank("blackhole")
    hole = world.server(answering(frame(wire.encode(wire.HandshakeReply(version=wire.WIRE_VERSION,
                                                                        engine_id="blackhole", ranks=[rank]))),
                                  pin=None, release=None))
    d = world.decode(DIRECT_FMT)
    stuck = RecvJob("decode-stuck", [10, 11], 0, 32, forged_params("blackhole", hole.port))
    normal = d.job(prefill, "r1", 40)
    start = time.monotonic()
    d.receiver.add(stuck)
    d.receiver.add(normal)
    d.finish(normal)
    assert normal.request_id in d.done and time.monotonic() - start < 0.8, "a black hole delayed a normal load"
    d.finish(stuck)
    elapsed = time.monotonic() - start
    assert "could not pin the lease" in d.failed[stuck.request_id] and elapsed < 2 * d.config.handshake_timeout_s + 0.5
    assert "PinRequest" in hole.kinds()
    assert d.slowest_poll < MAX_POLL_S
    assert_exact(d, prefill, normal)


def test_black_holed_handshake_fails_within_its_deadline(world):
    hole = world.server(lambda payload: None)
    d = world.decode(DIRECT_FMT, handshake_timeout_s=0.2)
    job = RecvJob("decode-x", [0, 1], 0, 32, forged_params("nobody", hole.port))
    start = time.monotonic()
    d.receiver.add(job)
    d.finish(job)
    assert time.monotonic() - start < 3 * 0.2 + 1.5
    assert "handshake with prefill" in d.failed[job.request_id] and d.receiver.handshake_failures == 1
    assert hole.kinds() == ["HandshakeRequest"]


# ---------------------------------------------------------------------------------------------- hostile peers
def _reply(engine_id="evil", ranks=None, **kw) -> bytes:
    ranks = [shadow_rank(engine_id)] if ranks is None else ranks
    return frame(wire.encode(wire.HandshakeReply(version=kw.pop("version", wire.WIRE_VERSION), engine_id=engine_id,
                                                 ranks=ranks, **kw)))


def _raw_reply(mutate) -> bytes:
    reply = msgspec.to_builtins(wire.HandshakeReply(version=wire.WIRE_VERSION, engine_id="evil",
                                                    ranks=[shadow_rank("evil")]), builtin_types=(bytes,))
    mutate(reply)
    return frame(msgspec.msgpack.encode(reply))


def _rank(engine_id="evil", **changes) -> wire.RankInfo:
    return msgspec.structs.replace(shadow_rank(engine_id), **changes)


def _doubled_layer_addrs() -> wire.RankInfo:
    rank = shadow_rank("evil")
    return msgspec.structs.replace(rank, layer_addrs=rank.layer_addrs * 2)


HOSTILE = {
    "ranks_empty": (lambda: _raw_reply(lambda r: r.update(ranks=[])), "length >= 1 - at `$.ranks`"),
    "garbage_frame": (lambda: frame(b"\xc1\xc1 not msgpack"), "malformed reply"),
    "garbage_framing": (lambda: struct.pack(">I", 2**31) + b"x", "exceeds"),
    "address_over_2_63": (lambda: _raw_reply(lambda r: r["ranks"][0]["layer_addrs"][0].__setitem__(0, 2**64 - 1)),
                          "layer_addrs"),
    "extra_layer_addrs": (lambda: _reply(ranks=[_doubled_layer_addrs()]), "layer addresses that do not match"),
    "wrong_engine_id": (lambda: _reply(engine_id="someone-else"), "belongs to engine 'someone-else'"),
    "foreign_agent": (lambda: _reply(ranks=[shadow_rank("victim")]), "does not belong to engine 'evil'"),
    "metadata_of_another_agent": (lambda: _reply(ranks=[_rank(agent_metadata=shadow_rank("evil", agent_suffix="x")
                                                              .agent_metadata)]), "agent metadata names"),
    "nixl_rejects_metadata": (lambda: _reply(ranks=[_rank(agent_metadata=b"junk")]), "NIXL refused"),
    "error_reply": (lambda: frame(wire.encode(wire.Error(message="go away"))), "go away"),
    "old_wire_version": (lambda: _reply(version=1), "wire version 1"),
    "missing_heads": (lambda: _reply(ranks=[_rank(format=fmt(tp_rank=1, tp_size=2))]), "holds KV head 0"),
    "other_model": (lambda: _reply(ranks=[_rank(format=fmt(head_size=64))]), "incompatible"),
    "pin_reply_to_handshake": (lambda: frame(wire.encode(wire.PinReply(remaining_s=1.0))), "PinReply"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_handshake_fails_only_that_request(world, case):
    build, match = HOSTILE[case]
    prefill = world.prefill("prefill-a")
    hostile = world.server(answering(build()))
    d = world.decode(STAGED_FMT)
    bad = RecvJob("decode-bad", [6, 7], 0, 64, forged_params("evil", hostile.port, num_tokens=64, blocks=range(4)))
    normal = d.job(prefill, "r1", 40)
    d.receiver.add(bad)
    d.receiver.add(normal)
    d.finish(bad, normal)
    d.idle(0.1)  # give any (wrong) release time to arrive
    assert normal.request_id in d.done, d.failed
    assert_exact(d, prefill, normal)
    assert bad.request_id in d.failed and match in d.failed[bad.request_id], d.failed[bad.request_id]
    assert d.receiver.take_bad_blocks() == {6, 7}
    assert set(hostile.kinds()) == {"HandshakeRequest"}, "a pin or release went to an unverified peer"
    if case != "wrong_engine_id":
        assert "handshake with prefill" in d.failed[bad.request_id]
        assert d.receiver.handshake_failures == 1
        assert d.agent.remotes == {"prefill-a-tp0"}, "a failed handshake left a NIXL remote behind"
        assert len(d.agent.registered) == 2, "a failed handshake left a staging pool registered"


def test_failed_handshake_sends_no_release_for_a_release_only_job(world):
    hostile = world.server(answering(frame(b"garbage")))
    d = world.decode(DIRECT_FMT)
    d.receiver.add_release(ReleaseJob("decode-x", forged_params("evil", hostile.port)))
    d.run(lambda: d.receiver.handshake_failures == 1 and not d.receiver.releases)
    d.idle(0.1)
    assert hostile.kinds() == ["HandshakeRequest"] and not d.failed and not d.done


def test_incompatible_second_rank_leaks_no_remote_or_staging(world):
    """Two ranks split the heads; the second is of another model. The handshake fails and leaves
    no NIXL remote and no registered staging pool behind (a hostile peer could repeat it)."""
    ranks = [msgspec.structs.replace(shadow_rank("evil", fmt(tp_rank=0, tp_size=2), "tp0"), tp_rank=0),
             msgspec.structs.replace(shadow_rank("evil", fmt(tp_rank=1, tp_size=2, head_size=64), "tp1"), tp_rank=1)]
    hostile = world.server(answering(_reply(ranks=ranks)))
    d = world.decode(STAGED_FMT)
    job = RecvJob("decode-x", [0], 0, 32, forged_params("evil", hostile.port))
    d.receiver.add(job)
    d.finish(job)
    assert "handshake with prefill" in d.failed[job.request_id] and "head_size" in d.failed[job.request_id]
    assert d.agent.remotes == set() and len(d.agent.registered) == 1 and d.agent.prepared == 1


def test_hostile_block_size_cannot_make_staging_exceed_staging_mib(world):
    """A peer's block size is only checked to be a multiple of ours: a huge one must not buy a
    staging slot far beyond staging_mib (64 MiB here, against 1 MiB)."""
    hostile = world.server(answering(_reply(ranks=[_rank(format=fmt(bs=16 * 2048, num_blocks=1))])))
    d = world.decode(STAGED_FMT, staging_mib=1)
    job = RecvJob("decode-x", [0], 0, 32, forged_params("evil", hostile.port))
    d.receiver.add(job)
    d.finish(job)
    assert "staging_mib" in d.failed[job.request_id], d.failed[job.request_id]
    assert d.agent.remotes == set() and len(d.agent.registered) == 1


# ---------------------------------------------------------------------------------------------- forged params
def test_known_engine_named_at_another_address_is_refused_before_any_pin(world):
    prefill = world.prefill("prefill-a")
    acker = world.server(answering(_reply(engine_id="prefill-a", ranks=[prefill.rank])))
    d = world.decode(DIRECT_FMT)
    first = d.job(prefill, "r1", 32)
    d.receiver.add(first)
    d.finish(first)
    # The attacker names the real prefill's engine id and blocks, but its own side channel.
    real = prefill.lease("r2", 32)
    forged = RecvJob("decode-forged", [8, 9], 0, 32, msgspec.structs.replace(real, remote_port=acker.port))
    d.receiver.add(forged)
    d.finish(forged)
    assert "handshaken at" in d.failed[forged.request_id]
    assert acker.requests == [] and d.agent.reads_posted == 1
    assert d.receiver.take_bad_blocks() == {8, 9}


def test_impostor_claiming_a_connected_engine_is_refused(world):
    prefill = world.prefill("prefill-a")
    impostor = world.server(answering(_reply(engine_id="prefill-a", ranks=[prefill.rank])))
    d = world.decode(DIRECT_FMT)
    first = d.job(prefill, "r1", 32)
    d.receiver.add(first)
    d.finish(first)
    real = prefill.lease("r2", 32)
    forged = RecvJob("decode-forged", [8, 9], 0, 32,
                     msgspec.structs.replace(real, remote_engine_id="fresh-id", remote_port=impostor.port))
    d.receiver.add(forged)
    d.finish(forged)
    assert "claims engine 'prefill-a'" in d.failed[forged.request_id]
    assert impostor.kinds() == ["HandshakeRequest"] and d.agent.reads_posted == 1


def test_wrong_lease_token_is_refused_by_the_prefill_and_frees_nothing(world):
    """The first READ is posted beside the first pin, so the bytes may land; the refused pin must
    still fail the load and hand its blocks to vLLM as bad, so nothing it read is ever used."""
    prefill, d = world.prefill("prefill-a"), world.decode(DIRECT_FMT)
    real = prefill.lease("r1", 32)
    forged = RecvJob("decode-forged", [8, 9], 0, 32, msgspec.structs.replace(real, lease_token="guessed"))
    d.receiver.add(forged)
    d.finish(forged)
    assert "wrong lease token" in d.failed[forged.request_id] and forged.request_id not in d.done
    assert d.receiver.take_bad_blocks() == {8, 9} and d.agent.outstanding == 0
    d.idle(0.1)
    assert prefill.take_freed() == [] and len(prefill.sched.leases) == 1, "a forged release freed the lease"
    job = d.job(prefill, "r1", 32, params=real)
    d.receiver.add(job)
    d.finish(job)
    assert job.request_id in d.done
    assert_exact(d, prefill, job)


def test_block_ids_outside_the_lease_are_refused_by_the_prefill(world):
    prefill, d = world.prefill("prefill-a"), world.decode(DIRECT_FMT)
    real = prefill.lease("r1", 32)
    other = [b for b in range(prefill.fmt.num_blocks) if b not in real.remote_block_ids][:2]
    forged = RecvJob("decode-forged", [8, 9], 0, 32, msgspec.structs.replace(real, remote_block_ids=other))
    d.receiver.add(forged)
    d.finish(forged)
    assert "not leased" in d.failed[forged.request_id] and forged.request_id not in d.done
    assert d.receiver.take_bad_blocks() == {8, 9} and d.agent.outstanding == 0


def test_block_ids_beyond_the_prefill_cache_are_refused_before_a_pin(world):
    prefill, d = world.prefill("prefill-a"), world.decode(DIRECT_FMT)
    real = prefill.lease("r1", 32)
    forged = RecvJob("decode-forged", [8, 9], 0, 32, msgspec.structs.replace(real, remote_block_ids=[0, 10**6]))
    d.receiver.add(forged)
    d.finish(forged)
    assert "outside the prefill's 16 blocks" in d.failed[forged.request_id] and d.agent.reads_posted == 0


def test_job_with_a_scheduler_error_touches_neither_nixl_nor_the_prefill(world):
    prefill, d = world.prefill("prefill-a"), world.decode(DIRECT_FMT)
    real = prefill.lease("r1", 32)
    d.receiver.add(RecvJob("decode-x", [3, 4], 0, 32, real, error="kv_transfer_params belong to another prompt"))
    d.idle(0.1)
    assert d.failed == {"decode-x": "kv_transfer_params belong to another prompt"}
    assert d.receiver.take_bad_blocks() == {3, 4} and d.receiver.handshakes == {} and d.agent.reads_posted == 0
    assert prefill.take_freed() == [] and len(prefill.sched.leases) == 1


# ---------------------------------------------------------------------------------------------- HMAC
def test_same_secret_on_both_sides_handshakes(world, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "s" * 32)
    prefill = world.prefill("prefill-a", secret_env=SECRET_ENV)
    d = world.decode(DIRECT_FMT, side_channel_secret_env=SECRET_ENV)
    job = d.job(prefill, "r1", 40)
    d.receiver.add(job)
    d.finish(job)
    assert job.request_id in d.done
    assert_exact(d, prefill, job)


@pytest.mark.parametrize("prefill_secret, decode_secret", [("a" * 32, "b" * 32), ("a" * 32, None), (None, "b" * 32)],
                         ids=["mismatch", "prefill-only", "decode-only"])
def test_secret_mismatch_fails_the_handshake_naming_the_secret(world, monkeypatch, prefill_secret, decode_secret):
    if prefill_secret:
        monkeypatch.setenv("PREFILL_SECRET", prefill_secret)
    if decode_secret:
        monkeypatch.setenv("DECODE_SECRET", decode_secret)
    prefill = world.prefill("prefill-a", secret_env="PREFILL_SECRET" if prefill_secret else "")
    d = world.decode(DIRECT_FMT, side_channel_secret_env="DECODE_SECRET" if decode_secret else "")
    job = d.job(prefill, "r1", 32)
    d.receiver.add(job)
    d.finish(job)
    assert "side_channel_secret_env" in d.failed[job.request_id], d.failed[job.request_id]
    assert d.receiver.handshake_failures == 1 and d.agent.reads_posted == 0 and d.agent.remotes == set()
    d.idle(0.1)
    assert len(prefill.sched.leases) == 1 and prefill.take_freed() == []  # no pin, no release reached it


def test_relayed_handshake_is_refused_with_a_secret(world, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "s" * 32)
    prefill = world.prefill("prefill-a", secret_env=SECRET_ENV)
    relay = world.proxy(prefill.port)
    d = world.decode(DIRECT_FMT, side_channel_secret_env=SECRET_ENV)
    real = prefill.lease("r1", 32)
    job = RecvJob("decode-x", [0, 1], 0, 32, msgspec.structs.replace(real, remote_port=relay.port))
    d.receiver.add(job)
    d.finish(job)
    assert "relayed handshake" in d.failed[job.request_id], d.failed[job.request_id]
    assert d.agent.remotes == set() and d.agent.reads_posted == 0


# ---------------------------------------------------------------------------------------------- releases, eviction
def test_release_only_job_frees_the_prefill_lease(world):
    prefill, d = world.prefill("prefill-a"), world.decode(DIRECT_FMT)
    params = prefill.lease("r1", 32)
    d.receiver.add_release(ReleaseJob("decode-r1", params))
    d.run(lambda: "r1" in prefill.take_freed())
    assert not d.done and not d.failed and d.agent.reads_posted == 0 and not d.receiver.releases


def test_max_remote_engines_evicts_the_idle_prefill(world):
    a, b = world.prefill("prefill-a"), world.prefill("prefill-b")
    d = world.decode(STAGED_FMT, max_remote_engines=1)
    first = d.job(a, "r1", 40)
    d.receiver.add(first)
    d.finish(first)
    staging_a = d.receiver.remotes["prefill-a"].staging.registration
    second = d.job(b, "r2", 40)
    d.receiver.add(second)
    d.finish(second)
    assert d.done == {first.request_id, second.request_id}
    assert set(d.receiver.remotes) == {"prefill-b"}
    assert d.agent.remotes == {"prefill-b-tp0"} and "prefill-a-tp0" in d.agent.removed_remotes
    assert staging_a not in d.agent.registered and len(d.agent.registered) == 2  # local cache + b's staging
    assert_exact(d, a, first)
    assert_exact(d, b, second)


def test_busy_remotes_are_not_evicted_and_the_newcomer_is_refused(world):
    a, b = world.prefill("prefill-a"), world.prefill("prefill-b")
    d = world.decode(STAGED_FMT, max_remote_engines=1)
    d.agent.hold = True
    busy = d.job(a, "r1", 40)
    d.receiver.add(busy)
    d.run(lambda: d.agent.outstanding == 1)
    refused = d.job(b, "r2", 40)
    d.receiver.add(refused)
    d.finish(refused)
    assert "max_remote_engines=1" in d.failed[refused.request_id]
    d.agent.release_held()
    d.finish(busy)
    assert busy.request_id in d.done and set(d.receiver.remotes) == {"prefill-a"}


def test_idle_remote_is_disconnected_after_remote_idle_s(world):
    prefill = world.prefill("prefill-a")
    d = world.decode(STAGED_FMT, remote_idle_s=0.2)
    job = d.job(prefill, "r1", 40)
    d.receiver.add(job)
    d.finish(job)
    assert set(d.receiver.remotes) == {"prefill-a"}
    d.run(lambda: not d.receiver.remotes, timeout=2.0)
    assert d.agent.remotes == set() and len(d.agent.registered) == 1 and d.agent.deregistered == 1
    again = d.job(prefill, "r2", 40)  # reconnects on demand
    d.receiver.add(again)
    assert_loaded_exactly(d, prefill, again)


def test_first_read_goes_out_with_the_first_pin_and_the_load_waits_for_its_answer(world):
    """The pin is off the critical path: the READ is posted before the pin is answered, and the load
    is reported only once the answer confirms the lease."""
    prefill, d = world.prefill("prefill-a"), world.decode(DIRECT_FMT)
    warm = d.job(prefill, "warm", 32)  # handshake first, so that only the pin is slow
    d.receiver.add(warm)
    d.finish(warm)
    pin = prefill.sched.leases.pin
    prefill.sched.leases.pin = lambda *a, **kw: (time.sleep(0.3), pin(*a, **kw))[1]
    job = d.job(prefill, "r1", 40)
    d.receiver.add(job)
    assert d.agent.reads_posted == 2 and job.request_id not in d.done
    d.idle(0.1)
    assert job.request_id not in d.done and d.agent.outstanding == 0, "loaded before the pin confirmed the lease"
    assert_loaded_exactly(d, prefill, job)


def test_wait_reports_a_load_as_it_ends_and_keeps_to_its_budget_otherwise(world):
    """An empty step waits on its loads: an ending is reported by that step's wait, and a stalled
    READ costs the step no more than its budget."""
    prefill, d = world.prefill("prefill-a"), world.decode(DIRECT_FMT)
    job = d.job(prefill, "r1", 40)
    d.receiver.add(job)
    done, failed = d.receiver.wait(2.0)
    assert done == {job.request_id} and not failed
    assert_exact(d, prefill, job)
    d.agent.hold = True
    stalled = d.job(prefill, "r2", 40)
    d.receiver.add(stalled)
    start = time.monotonic()
    assert d.receiver.wait(0.05) == (set(), {}) and 0.05 <= time.monotonic() - start < 1.0
    d.agent.release_held()
    d.finish(stalled)
    assert stalled.request_id in d.done


def test_prepared_lists_go_with_the_engine_they_describe(world):
    """Each connected engine holds one prepared list per source rank and its staging pool one per
    rank; disconnecting returns them all, leaving only the local cache's list."""
    prefill = world.prefill("prefill-a")
    d = world.decode(STAGED_FMT, remote_idle_s=0.2)
    assert d.agent.prepared == 1
    job = d.job(prefill, "r1", 40)
    d.receiver.add(job)
    d.finish(job)
    assert d.agent.prepared == 3
    d.run(lambda: not d.receiver.remotes, timeout=2.0)
    assert d.agent.prepared == 1
