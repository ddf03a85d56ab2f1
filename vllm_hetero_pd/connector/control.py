"""The decode's control plane: side-channel calls on background threads, polled by the worker.

vLLM calls the worker once per engine step for every running stream, so a side-channel call
made inline (up to ``handshake_timeout_s`` per connect and reply) would freeze every stream on
the decode while one prefill is slow or black-holed. Calls here return futures instead.

Two pools keep an unverified peer from starving verified ones: handshakes go to whatever
address a request names (so a forged request can point them at a black hole), while pins and
releases only ever go to prefills whose handshake succeeded.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import msgspec

from vllm_hetero_pd.transport import side_channel, wire

HANDSHAKE_THREADS = 4
LEASE_THREADS = 4
MAX_PENDING_HANDSHAKES = 32


class ControlPlane:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._handshakes = ThreadPoolExecutor(HANDSHAKE_THREADS, thread_name_prefix="hetero-pd-handshake")
        self._leases = ThreadPoolExecutor(LEASE_THREADS, thread_name_prefix="hetero-pd-lease")

    def handshake(self, host: str, port: int, request: wire.HandshakeRequest) -> Future:
        return self._handshakes.submit(side_channel.call, host, port, request, self.timeout_s)

    def lease(self, host: str, port: int, request: msgspec.Struct) -> Future:
        """A pin or release to a verified prefill."""
        return self._leases.submit(side_channel.call, host, port, request, self.timeout_s)

    def shutdown(self) -> None:
        for pool in (self._handshakes, self._leases):
            pool.shutdown(wait=False, cancel_futures=True)
