"""Hostile and broken side-channel peers, as real TCP servers on loopback, for fault tests.

Each serves our frame format (4-byte length + msgpack) from a daemon thread and records what it
was sent, so a test can check that the decode never pinned or released on it.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable

import msgspec

from vllm_hetero_pd.formats.presets import preset
from vllm_hetero_pd.transport import side_channel, wire

Answer = Callable[[bytes], bytes | None]  # request frame -> reply frame (None: never answer)


class FakePeer:
    def __init__(self, answer: Answer):
        self.answer, self.received = answer, []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    (length,) = struct.unpack(">I", _read(conn, 4))
                    frame = _read(conn, length)
                    self.received.append(frame)
                    reply = self.answer(frame)
                    if reply is None:
                        threading.Event().wait(3600)  # a black hole: hold the connection, say nothing
                    conn.sendall(struct.pack(">I", len(reply)) + reply)
            except (ConnectionError, OSError, struct.error):
                return

    def kinds(self) -> list[str]:
        """The message types it was sent (those that decode)."""
        out = []
        for frame in self.received:
            try:
                out.append(type(wire.decode_request(frame)).__name__)
            except (msgspec.DecodeError, msgspec.ValidationError):
                out.append("?")
        return out

    def close(self) -> None:
        self._sock.close()


def _read(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def impostor(real_host: str, real_port: int) -> FakePeer:
    """Relays the real prefill's handshake (so it looks genuine) and acks every pin and release."""
    def answer(frame: bytes) -> bytes:
        request = wire.decode_request(frame)
        if isinstance(request, wire.HandshakeRequest):
            return wire.encode(side_channel.call(real_host, real_port, wire.HandshakeRequest(), 5))
        if isinstance(request, wire.PinRequest):
            return wire.encode(wire.PinReply(remaining_s=30.0))
        return wire.encode(wire.Ack())
    return FakePeer(answer)


def garbage() -> FakePeer:
    return FakePeer(lambda frame: b"\xc1\xff not msgpack \x00" * 8)


def black_hole() -> FakePeer:
    return FakePeer(lambda frame: None)


def older_release(engine_id: str) -> FakePeer:
    """A prefill of an older vllm-hetero-pd release: a well-formed handshake reply of the previous wire version."""
    fmt = preset("cpu/cpu_attn/vec").build(num_layers=4, num_blocks=8, num_kv_heads=4, head_size=32)
    rank = wire.RankInfo(tp_rank=0, agent_name=f"{engine_id}-tp0", agent_metadata=b"nixl", format=fmt,
                         layer_addrs=[[4096] * fmt.num_layers], mem_type="DRAM")
    reply = wire.encode(wire.HandshakeReply(version=wire.WIRE_VERSION - 1, engine_id=engine_id, ranks=[rank]))
    return FakePeer(lambda frame: reply)


def empty_ranks(engine_id: str) -> FakePeer:
    """A handshake reply naming the engine but no ranks (msgspec alone would accept ``[]``)."""
    reply = msgspec.msgpack.encode({"type": "HandshakeReply", "version": wire.WIRE_VERSION,
                                    "engine_id": engine_id, "ranks": []})
    return FakePeer(lambda frame: reply)
