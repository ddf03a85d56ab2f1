"""``FakeNixlAgent``: ``NixlAgent``'s interface over plain process memory, for millisecond unit tests.

A READ really copies bytes (``ctypes.memmove`` from the remote descriptors' addresses to the
local ones): "remote" memory is just another tensor in this process, registered with the
remote's own ``FakeNixlAgent``. Like NIXL, a list is refused at ``prepare`` unless its rows lie
inside memory the named agent registered and that agent was added from its metadata, and a READ
is refused when its indices fall outside the lists or the two sides' lengths differ.

Knobs, taken by each READ when it is posted:

- ``hold``: the READ stays "PROC" (no bytes land) until ``release_held()``;
- ``fail``: the READ ends "ERR" at its first poll, no bytes land;
- ``uncancellable``: ``abort`` returns False (NIXL refused to cancel) until ``release_held()``;
- ``fail_post``: ``read`` raises ``TransferError`` (NIXL refused the descriptors);
- ``poll_raises``: ``poll`` raises (as NIXL's ``check_xfer_state`` may for a broken peer); ``abort``
  then cancels by releasing the handle, as ``NixlAgent.abort`` does.

``prepared`` counts the lists not yet released; ``outstanding`` is the number of READ handles NIXL
still holds (posted, neither finished and polled nor aborted); ``writes`` records every landed
READ's local descriptors in order, so a test can tell whether bytes landed after a failure was
reported.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
from dataclasses import dataclass, field

import numpy as np

from vllm_hetero_pd.transport.nixl_agent import DescList, Memory, Read, TransferError

_AGENTS: dict[str, FakeNixlAgent] = {}  # every live fake agent by name: what add_remote resolves
_METADATA_PREFIX = b"fake-nixl-agent:"
_ids = itertools.count()


@dataclass(eq=False)
class FakeXfer:
    """One posted READ: descriptor pairs still to copy and the knobs it was posted with."""

    agent: FakeNixlAgent
    local: np.ndarray
    remote: np.ndarray
    held: bool
    fail: bool
    cancellable: bool
    id: int = field(default_factory=lambda: next(_ids))


class FakeNixlAgent:
    def __init__(self, name: str):
        if name in _AGENTS:
            raise ValueError(f"a fake NIXL agent named {name!r} already exists; close it first")
        self.name = name
        self.registered: dict[int, tuple[list[tuple[int, int]], str]] = {}
        self.remotes: set[str] = set()
        self.handles: set[FakeXfer] = set()
        self.lists: list[DescList] = []
        self.hold = self.fail = self.uncancellable = self.fail_post = self.poll_raises = False
        self.fail_add_remote = False
        self.reads_posted = self.reads_aborted = 0
        self.writes: list[np.ndarray] = []
        self.removed_remotes: list[str] = []
        self.deregistered = 0
        self._next_handle = itertools.count(1)
        self._lock = threading.Lock()
        _AGENTS[name] = self

    # ------------------------------------------------------------------ NixlAgent API
    def metadata(self) -> bytes:
        return _METADATA_PREFIX + self.name.encode()

    def register(self, regions: list[tuple[int, int]], mem_type: str, device_id: int = 0) -> object:
        handle = next(self._next_handle)
        self.registered[handle] = ([(int(a), int(n)) for a, n in regions], Memory(mem_type, device_id))
        return handle

    def deregister(self, handle: object) -> None:
        if handle not in self.registered:
            raise TransferError(f"fake NIXL: deregister of unknown handle {handle!r}")
        del self.registered[handle]
        self.deregistered += 1

    def add_remote(self, metadata: bytes) -> str:
        if self.fail_add_remote or not metadata.startswith(_METADATA_PREFIX):
            raise TransferError("NIXL refused the peer's agent metadata: fake NIXL cannot parse it")
        name = metadata[len(_METADATA_PREFIX):].decode()
        if name not in _AGENTS:
            raise TransferError(f"NIXL refused the peer's agent metadata: no agent {name!r} to connect to")
        self.remotes.add(name)
        return name

    def remove_remote(self, name: str) -> None:
        if name in self.remotes:
            self.remotes.discard(name)
            self.removed_remotes.append(name)

    def prepare(self, peer: str, rows: np.ndarray, memory: Memory) -> DescList:
        rows = np.asarray(rows, dtype=np.uint64)
        if peer and peer not in self.remotes:
            raise TransferError(f"fake NIXL: cannot prepare rows of {peer!r}, which was never added (or was removed)")
        owner = _AGENTS.get(peer) if peer else self
        if owner is None:
            raise TransferError(f"fake NIXL: remote agent {peer!r} is gone")
        _check_inside(owner, rows, memory, "remote" if peer else "local")
        dlist = DescList(object(), peer, memory, rows)
        self.lists.append(dlist)
        return dlist

    def release(self, dlist: DescList) -> None:
        self.lists.remove(dlist)

    def read(self, local: DescList, local_ids: np.ndarray, remote: DescList, remote_ids: np.ndarray) -> Read:
        if remote.peer not in self.remotes:
            raise TransferError(f"fake NIXL: READ from {remote.peer!r}, which was never added (or was removed)")
        if not all(any(d is x for x in self.lists) for d in (local, remote)):
            raise TransferError("fake NIXL: READ through a list that was released or never prepared here")
        local_ids, remote_ids = np.asarray(local_ids, dtype=np.int64), np.asarray(remote_ids, dtype=np.int64)
        for dlist, ids in ((local, local_ids), (remote, remote_ids)):
            if ids.size and (ids.min() < 0 or ids.max() >= len(dlist.rows)):
                raise TransferError(f"fake NIXL: indices outside a prepared list of {len(dlist.rows)} rows")
        local_rows, remote_descs = local.rows[local_ids], remote.rows[remote_ids]
        if local_rows.shape != remote_descs.shape or not np.array_equal(local_rows[:, 1], remote_descs[:, 1]):
            raise TransferError(f"fake NIXL: descriptor lists differ ({local_rows.shape} vs {remote_descs.shape})")
        if _AGENTS.get(remote.peer) is None:
            raise TransferError(f"fake NIXL: remote agent {remote.peer!r} is gone")
        if self.fail_post:
            raise TransferError(f"NIXL READ from {remote.peer} could not be posted (fake fail_post)")
        xfer = FakeXfer(self, local_rows, remote_descs, self.hold, self.fail, not self.uncancellable)
        with self._lock:
            self.handles.add(xfer)
            self.reads_posted += 1
        return Read(handle=xfer, state="PROC")

    def poll(self, read: Read) -> str:
        if read.state == "PROC":
            if self.poll_raises:
                raise RuntimeError("nixlBackendError: fake check_xfer_state failure")
            xfer: FakeXfer = read.handle
            if xfer.fail:
                read.state = "ERR"
            elif not xfer.held:
                for (dst, n), (src, _) in zip(xfer.local.tolist(), xfer.remote.tolist()):
                    ctypes.memmove(dst, src, n)
                self.writes.append(xfer.local)
                read.state = "DONE"
            if read.state != "PROC":
                with self._lock:
                    self.handles.discard(xfer)
        return read.state

    def abort(self, read: Read) -> bool:
        try:
            if self.poll(read) != "PROC":
                return True
        except RuntimeError:
            pass  # state unknown: cancel by releasing, as NixlAgent.abort does
        xfer: FakeXfer = read.handle
        if not xfer.cancellable:
            return False
        with self._lock:
            self.handles.discard(xfer)
            self.reads_aborted += 1
        read.state = "ERR"
        return True

    def close(self) -> None:
        self.remotes.clear()
        self.registered.clear()
        _AGENTS.pop(self.name, None)

    # ------------------------------------------------------------------ test controls
    @property
    def prepared(self) -> int:
        """Prepared lists not yet released."""
        return len(self.lists)

    @property
    def outstanding(self) -> int:
        """READ handles NIXL still holds: while > 0, bytes may still land in the destination."""
        return len(self.handles)

    def release_held(self) -> None:
        """Let every held READ finish (at its next poll) and make them cancellable again."""
        self.hold = self.uncancellable = False
        with self._lock:
            for xfer in self.handles:
                xfer.held, xfer.cancellable = False, True


def _check_inside(agent: FakeNixlAgent, descs: np.ndarray, memory: Memory, side: str) -> None:
    """Like NIXL, a descriptor must name the memory type and device id its region was registered with."""
    regions = [r for regs, mem in agent.registered.values() if mem == memory for r in regs]
    for addr, n in descs.tolist():
        if not any(base <= addr and addr + n <= base + size for base, size in regions):
            raise TransferError(f"fake NIXL: {side} descriptor [{addr:#x}, +{n}) is outside {agent.name}'s "
                                f"registered {memory.mem_type} memory on device {memory.device_id}")


def close_all() -> None:
    """Forget every fake agent (between tests)."""
    for agent in list(_AGENTS.values()):
        agent.close()
