"""The side channel over real loopback sockets: lease semantics, garbage input, unreachable peers."""

import socket
import struct

import pytest

from vllm_hetero_pd.connector.leases import LeaseError, LeaseTable
from vllm_hetero_pd.transport import side_channel, wire


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_lease_pin_extends_and_expiry_frees():
    clock = Clock()
    table = LeaseTable(lease_s=10, clock=clock)
    table.add("r1", [1, 2])
    clock.now = 8
    assert table.pin("r1", [2]) == pytest.approx(10)  # heartbeat: deadline moves to 18
    clock.now = 15
    assert table.take_freed() == []
    with pytest.raises(LeaseError, match="not leased"):
        table.pin("r1", [3])
    clock.now = 19
    assert table.take_freed() == ["r1"]
    with pytest.raises(LeaseError, match="lease expired"):
        table.pin("r1", [1])


def test_release_frees_once_after_every_reader():
    table = LeaseTable(lease_s=10)
    table.add("r", [0])
    table.release("r", "decode-tp0", 2)
    table.release("r", "decode-tp0", 2)  # a repeated release from the same rank does not count twice
    assert table.take_freed() == []
    assert table.pin("r", [0]) > 0  # the other rank may still read
    table.release("r", "decode-tp1", 2)
    table.release("r", "decode-tp1", 2)
    assert table.take_freed() == ["r"] and table.take_freed() == []


@pytest.fixture
def server():
    table = LeaseTable(lease_s=30)
    table.add("req", [5, 6])

    def handle(request):
        if isinstance(request, wire.PinRequest):
            return wire.PinReply(remaining_s=table.pin(request.request_id, request.block_ids))
        return wire.Ack()

    srv = side_channel.SideChannelServer("127.0.0.1", 0, handle)
    yield srv
    srv.close()


def test_request_reply_and_handler_errors(server):
    reply = side_channel.call("127.0.0.1", server.port, wire.PinRequest(request_id="req", block_ids=[5]), 5)
    assert isinstance(reply, wire.PinReply)
    with pytest.raises(side_channel.SideChannelError, match="not leased"):
        side_channel.call("127.0.0.1", server.port, wire.PinRequest(request_id="req", block_ids=[9]), 5)


def test_garbage_and_oversized_frames_do_not_kill_the_server(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(struct.pack(">I", 5) + b"\xff\xfe\x00\x01\x02")
        (n,) = struct.unpack(">I", s.recv(4))
        assert b"malformed side-channel request" in s.recv(n)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(struct.pack(">I", side_channel.MAX_FRAME_BYTES + 1))
        assert s.recv(4) == b""  # connection dropped, nothing allocated
    assert isinstance(side_channel.call("127.0.0.1", server.port, wire.ReleaseRequest(request_id="req"), 5), wire.Ack)


def test_unreachable_peer_names_the_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(side_channel.SideChannelError, match=f"127.0.0.1:{port} unreachable"):
        side_channel.call("127.0.0.1", port, wire.HandshakeRequest(), 2)
