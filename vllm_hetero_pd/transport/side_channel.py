"""The side channel: a small TCP request/reply service next to each prefill engine.

It carries the handshake (agent metadata and formats of every rank) and the lease traffic
(pin before and during a READ, release after it). Frames are a 4-byte big-endian length followed
by one msgpack message from ``wire``. The server runs in the prefill's engine-core process, so
nothing a client does may cost it unbounded memory, threads or time:

- frames above ``MAX_FRAME_BYTES`` are refused before they are read;
- each frame must arrive whole within ``FRAME_DEADLINE_S`` (a slow-drip client is dropped), and
  an idle connection is closed after ``IDLE_TIMEOUT_S``;
- at most ``MAX_CONNECTIONS`` connections are served at once; more are closed on accept.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable

import msgspec

from vllm_hetero_pd.log import get_logger
from vllm_hetero_pd.transport import wire

MAX_FRAME_BYTES = 16 * 1024 * 1024
FRAME_DEADLINE_S = 10.0
IDLE_TIMEOUT_S = 60.0
MAX_CONNECTIONS = 64
logger = get_logger(__name__)


class SideChannelError(RuntimeError):
    """The peer could not be reached, timed out, or answered with an error."""


class PeerRefused(SideChannelError):
    """The peer answered, with an ``Error`` reply: retrying the same request will not help."""


def _send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack(">I", len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    chunks, remaining = [], n
    while remaining:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("frame not received within its deadline")
        sock.settimeout(left)
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            raise ConnectionError("peer closed the connection mid-frame")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _recv_frame(sock: socket.socket, first_byte_s: float, frame_s: float) -> bytes:
    """One frame: its first byte within ``first_byte_s``, all of it within ``frame_s`` after that."""
    sock.settimeout(first_byte_s)
    first = sock.recv(1)
    if not first:
        raise ConnectionError("peer closed the connection")
    deadline = time.monotonic() + frame_s
    (length,) = struct.unpack(">I", first + _recv_exact(sock, 3, deadline))
    if length > MAX_FRAME_BYTES:
        raise ConnectionError(f"frame of {length} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return _recv_exact(sock, length, deadline)


Handler = Callable[[wire.Request], wire.Reply]


class SideChannelServer:
    """Serves ``handler`` on ``host:port`` from daemon threads until ``close``."""

    def __init__(self, host: str, port: int, handler: Handler):
        serve = self._serve_connection

        class _Connection(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                serve(self.request)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        try:
            self._server = socketserver.ThreadingTCPServer((host, port), _Connection)
        except OSError as e:
            raise SideChannelError(f"cannot bind the side channel to {host}:{port} ({e}); set a free port with "
                                   f"kv_connector_extra_config.side_channel_port or VLLM_NIXL_SIDE_CHANNEL_PORT") from e
        self._server.daemon_threads = True
        self._handler = handler
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._thread = threading.Thread(target=self._server.serve_forever, name="hetero-pd-side-channel", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def _serve_connection(self, sock: socket.socket) -> None:
        if not self._slots.acquire(blocking=False):
            logger.warning("side channel: %d connections open, refusing one more", MAX_CONNECTIONS)
            return
        try:
            while True:
                frame = _recv_frame(sock, IDLE_TIMEOUT_S, FRAME_DEADLINE_S)
                sock.settimeout(FRAME_DEADLINE_S)
                _send_frame(sock, wire.encode(self._reply(frame)))
        except (ConnectionError, OSError):
            return  # client went away, stalled or sent garbage framing: drop the connection only
        finally:
            self._slots.release()

    def _reply(self, frame: bytes) -> wire.Reply:
        try:
            request = wire.decode_request(frame)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            return wire.Error(message=f"malformed side-channel request: {e}")
        try:
            return self._handler(request)
        except Exception as e:  # a handler bug must not kill the engine's side channel
            logger.exception("side-channel handler failed on %s", type(request).__name__)
            return wire.Error(message=f"{type(e).__name__}: {e}")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def call(host: str, port: int, request: msgspec.Struct, timeout_s: float) -> wire.Reply:
    """One request/reply exchange; raises ``SideChannelError`` on any failure, incl. an ``Error`` reply."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            _send_frame(sock, wire.encode(request))
            reply = wire.decode_reply(_recv_frame(sock, timeout_s, timeout_s))
    except (OSError, ConnectionError) as e:
        raise SideChannelError(f"side channel {host}:{port} unreachable or timed out after {timeout_s} s ({e}); "
                               f"is the prefill instance up and is its side-channel port reachable?") from e
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise SideChannelError(f"side channel {host}:{port} sent a malformed reply ({e}); "
                               f"are both sides running the same vllm-hetero-pd wire version "
                               f"{wire.WIRE_VERSION}?") from e
    if isinstance(reply, wire.Error):
        raise PeerRefused(f"prefill at {host}:{port} refused {type(request).__name__}: {reply.message}")
    return reply
