"""The side channel over real loopback sockets: request/reply, garbage input, unreachable peers,
and the limits that keep a client from costing the prefill's engine core unbounded time or threads."""

import socket
import struct
import threading
import time

import pytest

from vllm_hetero_pd.connector.leases import LeaseError, LeaseTable
from vllm_hetero_pd.transport import side_channel, wire


def serve_leases(table: LeaseTable):
    def handle(request):
        try:
            if isinstance(request, wire.PinRequest):
                return wire.PinReply(remaining_s=table.pin(request.request_id, request.lease_token, request.reader,
                                                           request.block_ids))
            if isinstance(request, wire.ReleaseRequest):
                table.release(request.request_id, request.lease_token, request.reader, request.num_readers)
                return wire.Ack()
            raise RuntimeError("handler bug")
        except LeaseError as e:
            return wire.Error(message=str(e))

    return handle


@pytest.fixture
def table():
    return LeaseTable(lease_s=30)


@pytest.fixture
def server(table):
    srv = side_channel.SideChannelServer("127.0.0.1", 0, serve_leases(table))
    yield srv
    # socketserver's shutdown waits up to its 0.5 s poll interval; nothing needs to wait for it.
    threading.Thread(target=srv.close, daemon=True).start()


def pin(token, block_ids=(5,), request_id="req"):
    return wire.PinRequest(request_id=request_id, lease_token=token, reader="decode-tp0", block_ids=list(block_ids))


def raw_exchange(port: int, payload: bytes, timeout=5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(struct.pack(">I", len(payload)) + payload)
        (n,) = struct.unpack(">I", _recv(s, 4))
        return _recv(s, n)


def _recv(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def dropped(s: socket.socket, within: float) -> bool:
    """Whether the server closes ``s`` within ``within`` seconds."""
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_request_reply_and_lease_errors(server, table):
    token = table.add("req", [5, 6])
    reply = side_channel.call("127.0.0.1", server.port, pin(token), 5)
    assert isinstance(reply, wire.PinReply) and reply.remaining_s > 0
    with pytest.raises(side_channel.PeerRefused, match="not leased"):
        side_channel.call("127.0.0.1", server.port, pin(token, [9]), 5)
    with pytest.raises(side_channel.PeerRefused, match="wrong lease token"):
        side_channel.call("127.0.0.1", server.port, pin("forged"), 5)
    release = wire.ReleaseRequest(request_id="req", lease_token=token, reader="decode-tp0")
    assert isinstance(side_channel.call("127.0.0.1", server.port, release, 5), wire.Ack)
    assert table.take_freed() == ["req"]


def test_handler_bug_is_an_error_reply_not_a_dead_server(server):
    with pytest.raises(side_channel.PeerRefused, match="RuntimeError: handler bug"):
        side_channel.call("127.0.0.1", server.port, wire.HandshakeRequest(), 5)
    with pytest.raises(side_channel.PeerRefused, match="holds no KV blocks"):
        side_channel.call("127.0.0.1", server.port, pin("t"), 5)


def test_release_with_zero_readers_is_malformed(server, table):
    """num_readers=0 once freed a lease at once; the wire refuses it before the lease table sees it."""
    token = table.add("req", [5])
    frame = wire.encode(wire.ReleaseRequest(request_id="req", lease_token=token, reader="x", num_readers=0))
    assert b"malformed side-channel request" in raw_exchange(server.port, frame)
    assert table.take_freed() == [] and len(table) == 1


def test_garbage_and_oversized_frames_do_not_kill_the_server(server, table):
    assert b"malformed side-channel request" in raw_exchange(server.port, b"\xff\xfe\x00\x01\x02")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(struct.pack(">I", side_channel.MAX_FRAME_BYTES + 1))
        assert dropped(s, 2), "an oversized frame must drop the connection, nothing allocated"
    token = table.add("req", [5])
    assert isinstance(side_channel.call("127.0.0.1", server.port, pin(token), 5), wire.PinReply)


def test_deeply_nested_msgpack_gets_an_error_reply(server, table):
    nested = b"\x81\xa1x" + b"\x91" * 200_000 + b"\x90"  # {"x": [[[[...]]]]}, 200k levels
    reply = wire.decode_reply(raw_exchange(server.port, nested))
    assert isinstance(reply, wire.Error) and "nests too deeply" in reply.message
    token = table.add("req", [5])
    assert isinstance(side_channel.call("127.0.0.1", server.port, pin(token), 5), wire.PinReply)


def test_slow_drip_client_is_dropped_within_the_frame_deadline(monkeypatch, server, table):
    """Each byte arrives well within any per-recv timeout, but the frame as a whole is too slow."""
    monkeypatch.setattr(side_channel, "FRAME_DEADLINE_S", 0.3)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(struct.pack(">I", 100))
        start = time.monotonic()
        closed = False
        for _ in range(40):  # 2 s of drip, one byte per 50 ms
            try:
                s.sendall(b"x")
            except OSError:
                closed = True
                break
            if dropped(s, 0.05):
                closed = True
                break
        assert closed, "a slow-drip client held the connection past FRAME_DEADLINE_S"
        assert time.monotonic() - start < 0.3 + 0.5
    token = table.add("req", [5])
    assert isinstance(side_channel.call("127.0.0.1", server.port, pin(token), 5), wire.PinReply)


def test_idle_connection_is_closed_after_idle_timeout(monkeypatch, server):
    monkeypatch.setattr(side_channel, "IDLE_TIMEOUT_S", 0.2)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        assert dropped(s, 2)


def test_connections_beyond_max_connections_are_refused(monkeypatch, table):
    monkeypatch.setattr(side_channel, "MAX_CONNECTIONS", 3)
    srv = side_channel.SideChannelServer("127.0.0.1", 0, serve_leases(table))
    token = table.add("req", [5])
    frame = wire.encode(pin(token))
    held = []
    try:
        for _ in range(3):  # three open connections, each proven served (so each holds a slot)
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            s.sendall(struct.pack(">I", len(frame)) + frame)
            (n,) = struct.unpack(">I", _recv(s, 4))
            assert isinstance(wire.decode_reply(_recv(s, n)), wire.PinReply)
            held.append(s)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as extra:
            assert dropped(extra, 2), "a fourth connection was served past MAX_CONNECTIONS=3"
        held.pop().close()  # a slot comes back once its connection ends
        deadline = time.monotonic() + 2
        while True:
            try:
                assert isinstance(side_channel.call("127.0.0.1", srv.port, pin(token), 1), wire.PinReply)
                break
            except side_channel.SideChannelError:
                assert time.monotonic() < deadline, "the closed connection's slot never came back"
                time.sleep(0.02)
    finally:
        for s in held:
            s.close()
        threading.Thread(target=srv.close, daemon=True).start()


def test_unreachable_peer_names_the_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(side_channel.SideChannelError, match=f"127.0.0.1:{port} unreachable"):
        side_channel.call("127.0.0.1", port, wire.HandshakeRequest(), 2)


def test_silent_peer_times_out_within_the_call_timeout():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        start = time.monotonic()
        with pytest.raises(side_channel.SideChannelError, match="timed out"):
            side_channel.call("127.0.0.1", listener.getsockname()[1], wire.HandshakeRequest(), 0.3)
        assert time.monotonic() - start < 1.5
