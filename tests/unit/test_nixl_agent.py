"""``NixlAgent``'s handle bookkeeping against a scripted NIXL: a READ ends only when NIXL lets go of
its handle, and nothing NIXL raises while polling or cancelling escapes ``abort``."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_hetero_pd.transport.nixl_agent import Memory, NixlAgent, Read, TransferError


class ScriptedNixl:
    """The few nixl_agent calls NixlAgent makes, with scripted states and failures."""

    def __init__(self):
        self.states: list[str] = []  # what check_xfer_state returns, in order (last one repeats)
        self.check_raises = False
        self.release_raises = 0  # how many release_xfer_handle calls fail before one succeeds
        self.transfer_result = "PROC"
        self.transfer_raises = False
        self.live: set[int] = set()
        self.described: list[tuple[list, str]] = []  # (rows, mem_type) of each get_*_descs call
        self.prepared: list[tuple[str, object]] = []  # (agent, descs) of each prep_xfer_dlist call
        self.released_lists: list[int] = []
        self.picked: list[tuple] = []  # (local handle, ids, remote handle, ids) of each prepared READ
        self._next = 0

    def get_xfer_descs(self, descs, mem_type):
        self.described.append((np.asarray(descs).tolist(), mem_type))
        return descs

    def get_reg_descs(self, regions, mem_type):
        self.described.append(([list(r) for r in regions], mem_type))
        return regions

    def register_memory(self, descs):
        return object()

    def prep_xfer_dlist(self, peer, descs):
        self.prepared.append((peer, descs))
        return len(self.prepared) - 1

    def release_dlist_handle(self, handle):
        self.released_lists.append(handle)

    def make_prepped_xfer(self, op, local, local_ids, remote, remote_ids):
        self.picked.append((local, local_ids.tolist(), remote, remote_ids.tolist()))
        self._next += 1
        self.live.add(self._next)
        return self._next

    def transfer(self, handle):
        if self.transfer_raises:
            raise RuntimeError("NIXL_ERR_BACKEND")
        return self.transfer_result

    def check_xfer_state(self, handle):
        if self.check_raises:
            raise RuntimeError("nixlBackendError: transfer failed")
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def release_xfer_handle(self, handle):
        if self.release_raises:
            self.release_raises -= 1
            raise RuntimeError("NIXL_ERR_REPOST_ACTIVE: cannot cancel")
        self.live.discard(handle)


@pytest.fixture
def nixl():
    return ScriptedNixl()


@pytest.fixture
def agent(nixl):
    agent = NixlAgent.__new__(NixlAgent)  # skip __post_init__: no real NIXL
    agent.name, agent.backends, agent.backend_params, agent.progress_delay_us = "decode-tp0", ["UCX"], {}, 100
    agent._agent, agent._registered, agent._remotes, agent._lists = nixl, [], set(), []
    return agent


def post(agent: NixlAgent) -> Read:
    descs = np.array([[4096, 64]], dtype=np.uint64)
    local, remote = agent.prepare("", descs, Memory("DRAM")), agent.prepare("prefill-tp0", descs, Memory("DRAM"))
    return agent.read(local, [0], remote, [0])


def test_each_side_is_described_with_its_own_memory_type_and_device(agent, nixl):
    """NIXL matches a descriptor to a registration by (type, device, range): a VRAM decode on GPU 1
    reading a prefill's host buffer must say so on each side, not reuse one side's type or device 0."""
    local, remote = np.array([[4096, 64]], dtype=np.uint64), np.array([[8192, 64]], dtype=np.uint64)
    agent.prepare("", local, Memory("VRAM", 1))
    agent.prepare("prefill-tp0", remote, Memory("DRAM", 0))
    assert nixl.described == [([[4096, 64, 1]], "VRAM"), ([[8192, 64, 0]], "DRAM")]
    assert [peer for peer, _ in nixl.prepared] == ["NIXL_INIT_AGENT", "prefill-tp0"]
    agent.register([(1 << 20, 4096)], "VRAM", 3)
    assert nixl.described[-1] == ([[1 << 20, 4096, 3, ""]], "VRAM")


def test_a_read_picks_rows_of_prepared_lists_by_index_and_close_releases_the_lists(agent, nixl):
    rows = np.array([[4096 + 64 * i, 64] for i in range(4)], dtype=np.uint64)
    local, remote = agent.prepare("", rows, Memory("DRAM")), agent.prepare("prefill-tp0", rows, Memory("DRAM"))
    agent.read(local, np.array([3, 1]), remote, np.array([0, 2]))
    assert nixl.picked == [(local.handle, [3, 1], remote.handle, [0, 2])]
    agent.release(remote)
    agent.close()
    assert nixl.released_lists == [remote.handle, local.handle]


def test_done_read_releases_its_handle(agent, nixl):
    nixl.states = ["PROC", "DONE"]
    read = post(agent)
    assert agent.poll(read) == "PROC" and nixl.live
    assert agent.poll(read) == "DONE" and not nixl.live
    assert agent.poll(read) == "DONE"  # polling again touches nothing


def test_failed_release_after_err_keeps_the_read_outstanding(agent, nixl):
    """NIXL reports ERR but refuses to free the handle: the backend may still be writing, so the
    READ must not count as over until a release succeeds."""
    nixl.states, nixl.release_raises = ["ERR"], 3
    read = post(agent)
    with pytest.raises(RuntimeError):
        agent.poll(read)
    assert read.state == "PROC" and nixl.live
    assert agent.abort(read) is False and nixl.live  # its poll's release and its own release both fail
    assert agent.abort(read) is True and not nixl.live and read.state == "ERR"


def test_abort_never_raises_when_nixl_cannot_report_the_state(agent, nixl):
    nixl.states, nixl.check_raises = ["PROC"], True
    read = post(agent)
    with pytest.raises(RuntimeError):
        agent.poll(read)
    nixl.release_raises = 1
    assert agent.abort(read) is False and nixl.live  # NIXL could not cancel: keep waiting
    assert agent.abort(read) is True and not nixl.live and read.state == "ERR"


def test_abort_cancels_an_active_read_or_reports_that_it_cannot(agent, nixl):
    nixl.states = ["PROC"]
    read = post(agent)
    nixl.release_raises = 1
    assert agent.abort(read) is False and nixl.live and read.state == "PROC"
    assert agent.abort(read) is True and not nixl.live and read.state == "ERR"
    assert agent.abort(read) is True  # idempotent once over


@pytest.mark.parametrize("how", ["raises", "ERR"])
def test_read_that_fails_at_post_releases_its_handle(agent, nixl, how):
    if how == "raises":
        nixl.transfer_raises = True
    else:
        nixl.transfer_result = "ERR"
    with pytest.raises(TransferError, match="prefill-tp0"):
        post(agent)
    assert not nixl.live
