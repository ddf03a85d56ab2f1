"""The side channel: a small TCP request/reply service next to each prefill engine.

It carries the handshake (agent metadata and formats of every rank) and the lease traffic
(pin before a READ, release after it). Frames are a 4-byte big-endian length followed by one
msgpack message from ``wire``; frames above ``MAX_FRAME_BYTES`` are refused before they are
read, so a stray client cannot make the server allocate unbounded memory.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from collections.abc import Callable

import msgspec

from vllm_hetero_pd.transport import wire
from vllm_hetero_pd.log import get_logger

MAX_FRAME_BYTES = 16 * 1024 * 1024
logger = get_logger(__name__)


class SideChannelError(RuntimeError):
    """The peer could not be reached, timed out, or answered with an error."""


def _send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack(">I", len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, remaining = [], n
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            raise ConnectionError("peer closed the connection mid-frame")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _recv_frame(sock: socket.socket) -> bytes:
    (length,) = struct.unpack(">I", _recv_exact(sock, 4))
    if length > MAX_FRAME_BYTES:
        raise ConnectionError(f"frame of {length} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return _recv_exact(sock, length)


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
        self._thread = threading.Thread(target=self._server.serve_forever, name="hetero-pd-side-channel", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def _serve_connection(self, sock: socket.socket) -> None:
        sock.settimeout(60)
        try:
            while True:
                frame = _recv_frame(sock)
                _send_frame(sock, wire.encode(self._reply(frame)))
        except (ConnectionError, OSError):
            return  # client went away or sent garbage framing: drop the connection only

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
            reply = wire.decode_reply(_recv_frame(sock))
    except (OSError, ConnectionError) as e:
        raise SideChannelError(f"side channel {host}:{port} unreachable or timed out after {timeout_s} s ({e}); "
                               f"is the prefill instance up and is its side-channel port reachable?") from e
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise SideChannelError(f"side channel {host}:{port} sent a malformed reply ({e}); "
                               f"are both sides running the same vllm-hetero-pd wire version {wire.WIRE_VERSION}?") from e
    if isinstance(reply, wire.Error):
        raise SideChannelError(f"prefill at {host}:{port} refused {type(request).__name__}: {reply.message}")
    return reply
