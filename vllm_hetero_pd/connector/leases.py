"""Prefill side: which finished requests still hold KV blocks for a decode, and until when.

Runs in the engine-core process, next to vLLM's scheduler. The side channel's threads call
``pin``/``release``; the scheduler thread calls ``add`` and ``take_freed`` once per step.

A lease is handed out in the prefill's answer together with an unguessable token; every pin and
release must present it, so a client that was not handed the answer can neither keep blocks
alive nor free them. A READ is only issued after a pin that names leased blocks, and the decode
keeps pinning while its READs run. Blocks are freed when every reader that pinned has released
and at least ``num_readers`` readers are done (each decode TP rank reads; several decode
requests may read one lease), or when the lease expires: a decode that died mid-READ costs the
prefill its blocks for at most ``lease_s``.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field

from vllm_hetero_pd.log import get_logger

logger = get_logger(__name__)


class LeaseError(LookupError):
    """A pin or release for a request, token or blocks this prefill does not hold."""


@dataclass
class Lease:
    token: str
    block_ids: frozenset[int]
    deadline: float
    reading: set[str] = field(default_factory=set)
    done: set[str] = field(default_factory=set)
    num_readers: int = 1

    def finished(self) -> bool:
        return not self.reading and len(self.done) >= self.num_readers


class LeaseTable:
    def __init__(self, lease_s: float, clock=time.monotonic):
        self.lease_s, self._clock = lease_s, clock
        self._leases: dict[str, Lease] = {}
        self._freed: list[str] = []
        self._lock = threading.Lock()

    def add(self, request_id: str, block_ids: list[int]) -> str:
        """Lease ``block_ids`` to whoever presents the returned token."""
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._leases[request_id] = Lease(token, frozenset(block_ids), self._clock() + self.lease_s)
        return token

    def pin(self, request_id: str, token: str, reader: str, block_ids: list[int]) -> float:
        """Register ``reader`` and extend the lease (a heartbeat); return the seconds left."""
        wanted = frozenset(block_ids)
        with self._lock:
            lease, now = self._lookup(request_id, token), self._clock()
            foreign = wanted - lease.block_ids
            if foreign:
                raise LeaseError(f"blocks {sorted(foreign)[:8]} are not leased to request {request_id!r}; "
                                 f"kv_transfer_params must be forwarded unchanged from the prefill answer")
            if reader in lease.done:
                raise LeaseError(f"reader {reader!r} already released request {request_id!r}")
            lease.reading.add(reader)
            lease.deadline = max(lease.deadline, now + self.lease_s)
            return lease.deadline - now

    def release(self, request_id: str, token: str, reader: str, num_readers: int) -> None:
        """``reader`` is done; free the blocks once every reader is (see the module docstring)."""
        with self._lock:
            lease = self._lookup(request_id, token)
            lease.reading.discard(reader)
            lease.done.add(reader)
            lease.num_readers = max(lease.num_readers, num_readers)
            if lease.finished():
                del self._leases[request_id]
                self._freed.append(request_id)

    def _lookup(self, request_id: str, token: str) -> Lease:
        lease = self._leases.get(request_id)
        if lease is None or lease.deadline < self._clock():
            raise LeaseError(f"request {request_id!r} holds no KV blocks on this prefill: unknown id, already "
                             f"released, or its lease expired (lease_s={self.lease_s:g}); resend the request")
        if not hmac.compare_digest(lease.token.encode(), token.encode()):
            raise LeaseError(f"wrong lease token for request {request_id!r}: kv_transfer_params must be the "
                             f"prefill's answer, unchanged")
        return lease

    def take_freed(self) -> list[str]:
        """Released requests plus expired ones, each once; their blocks may be freed now."""
        with self._lock:
            now = self._clock()
            expired = [r for r, lease in self._leases.items() if lease.deadline < now]
            for r in expired:
                lease = self._leases.pop(r)
                logger.warning("KV lease of request %s expired after %.0f s (%d reader(s) still reading, %d done); "
                               "freeing its blocks", r, self.lease_s, len(lease.reading), len(lease.done))
            freed, self._freed = self._freed + expired, []
            return freed

    def __len__(self) -> int:
        return len(self._leases)
