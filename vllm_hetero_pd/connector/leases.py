"""Prefill side: which finished requests still hold KV blocks for a decode, and until when.

Runs in the engine-core process, next to vLLM's scheduler. The side channel's threads call
``pin``/``release``; the scheduler thread calls ``add`` and ``take_freed`` once per step. A
READ is only ever issued after a successful ``pin`` that names exactly the leased blocks, so a
decode can neither read blocks of another request nor read blocks after their lease expired.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from vllm_hetero_pd.log import get_logger

logger = get_logger(__name__)


class LeaseError(LookupError):
    """A pin for a request or blocks this prefill does not hold."""


@dataclass
class Lease:
    block_ids: frozenset[int]
    deadline: float
    readers_done: set[str] = field(default_factory=set)


class LeaseTable:
    def __init__(self, lease_s: float, clock=time.monotonic):
        self.lease_s, self._clock = lease_s, clock
        self._leases: dict[str, Lease] = {}
        self._freed: list[str] = []
        self._lock = threading.Lock()

    def add(self, request_id: str, block_ids: list[int]) -> None:
        with self._lock:
            self._leases[request_id] = Lease(frozenset(block_ids), self._clock() + self.lease_s)

    def pin(self, request_id: str, block_ids: list[int]) -> float:
        """Extend the lease (a heartbeat); return the seconds left. Raises ``LeaseError``."""
        with self._lock:
            lease = self._leases.get(request_id)
            now = self._clock()
            if lease is None or lease.deadline < now:
                raise LeaseError(f"request {request_id!r} holds no KV blocks on this prefill: unknown id, already "
                                 f"released, or its lease expired (lease_s={self.lease_s:g}); resend the request")
            foreign = sorted(set(block_ids) - lease.block_ids)
            if foreign:
                raise LeaseError(f"blocks {foreign[:8]} are not leased to request {request_id!r}; "
                                 f"kv_transfer_params must be forwarded unchanged from the prefill answer")
            lease.deadline = max(lease.deadline, now + self.lease_s)
            return lease.deadline - now

    def release(self, request_id: str, reader: str, num_readers: int) -> None:
        """``reader`` is done. Blocks are freed once all ``num_readers`` decode ranks are done: with
        TP on the decode side several ranks read the same prefill blocks."""
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is None:
                return
            lease.readers_done.add(reader)
            if len(lease.readers_done) >= num_readers:
                del self._leases[request_id]
                self._freed.append(request_id)

    def take_freed(self) -> list[str]:
        """Released requests plus expired ones, each once; their blocks may be freed now."""
        with self._lock:
            now = self._clock()
            expired = [r for r, lease in self._leases.items() if lease.deadline < now]
            for r in expired:
                del self._leases[r]
                logger.warning("KV lease of request %s expired after %.0f s without a read; freeing its blocks",
                               r, self.lease_s)
            freed, self._freed = self._freed + expired, []
            return freed

    def __len__(self) -> int:
        return len(self._leases)
