"""Everything that crosses a process boundary, as typed, versioned msgspec messages.

Side-channel frames are one tagged union decoded with a strict msgpack decoder: a malformed or
foreign frame raises ``msgspec`` errors that we turn into an ``Error`` reply; nothing is ever
unpickled. ``TransferParams`` is the typed view of the ``kv_transfer_params`` a client (through
the router) hands to the decode engine, so that wrong types fail before any transfer starts.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

from vllm_hetero_pd.formats.format import KVFormat

WIRE_VERSION = 1
# History: 1 = first version (handshake with KVFormat per rank, lease pin/release).


class RankInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One prefill rank as a reader needs it: who to READ from, where, and in which format."""

    tp_rank: int
    agent_name: str
    agent_metadata: bytes
    format: KVFormat
    layer_addrs: list[list[int]]  # per buffer part (one for joint storage, K and V for split), per layer
    mem_type: str  # "DRAM" or "VRAM"


class HandshakeRequest(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    version: int = WIRE_VERSION


class HandshakeReply(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    version: int
    engine_id: str
    ranks: list[RankInfo]


class PinRequest(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Extend the lease on a request's blocks; also proves the blocks are still held before a READ."""

    request_id: str
    block_ids: list[int]


class PinReply(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    remaining_s: float


class ReleaseRequest(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """One reader is done (or gave up); the prefill frees the blocks when all readers are."""

    request_id: str
    reader: str = ""  # the decode rank's NIXL agent name
    num_readers: int = 1  # decode ranks that read this request (the decode's TP size)


class Ack(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    pass


class Error(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    message: str


Request = Union[HandshakeRequest, PinRequest, ReleaseRequest]
Reply = Union[HandshakeReply, PinReply, Ack, Error]

_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode_request(frame: bytes) -> Request:
    return _decode(_request_decoder, frame)


def decode_reply(frame: bytes) -> Reply:
    return _decode(_reply_decoder, frame)


def _decode(decoder: msgspec.msgpack.Decoder, frame: bytes):
    """msgspec raises ``UnicodeDecodeError`` for a bad string inside a frame; report it like any bad frame."""
    try:
        return decoder.decode(frame)
    except UnicodeDecodeError as e:
        raise msgspec.DecodeError(f"invalid UTF-8 in frame: {e}") from None


def decode_rank_info(frame: bytes) -> RankInfo:
    return msgspec.msgpack.decode(frame, type=RankInfo)


class TransferParams(msgspec.Struct, frozen=True, kw_only=True):
    """The ``kv_transfer_params`` a prefill returns and its decode receives (pull mode)."""

    do_remote_prefill: bool
    remote_engine_id: str
    remote_request_id: str
    remote_host: str
    remote_port: int
    remote_block_ids: list[int]
    remote_num_tokens: int
    tp_size: int = 1
    do_remote_decode: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.remote_port < 65536:
            raise ValueError(f"remote_port {self.remote_port} is not a TCP port")
        if self.remote_num_tokens < 1:
            raise ValueError(f"remote_num_tokens must be >= 1, got {self.remote_num_tokens}")
        if any(b < 0 for b in self.remote_block_ids):
            raise ValueError("remote_block_ids must be non-negative")
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {self.tp_size}")


def parse_transfer_params(params: dict[str, Any]) -> TransferParams:
    """Typed ``kv_transfer_params``; raises ``ValueError`` naming the bad field."""
    try:
        return msgspec.convert(params, TransferParams)
    except msgspec.ValidationError as e:
        raise ValueError(f"malformed kv_transfer_params: {e}") from None
