"""Everything that crosses a process boundary, as typed, versioned msgspec messages.

Side-channel frames are one tagged union decoded with a strict msgpack decoder: a malformed or
foreign frame raises ``msgspec`` errors that we turn into an ``Error`` reply; nothing is ever
unpickled. Every field has a bound (lengths, address ranges), so a hostile peer's reply fails
validation instead of crashing or exhausting the reader. ``kv_transfer_params`` are typed in
``vllm_hetero_pd.kv_params``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from vllm_hetero_pd.formats.format import KVFormat

WIRE_VERSION = 3
# History: 1 = first version (handshake with KVFormat per rank, lease pin/release).
#          2 = lease tokens on pin/release, reader identity per decode request, optional
#              HMAC-authenticated handshake bound to the address the decode dialled.
#          3 = each rank's NIXL device id (a GPU other than 0, or host DRAM when staging).

Address = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]  # NIXL takes uint64; user space is below 2**63
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
Token = Annotated[str, msgspec.Meta(max_length=128)]
Mac = Annotated[bytes, msgspec.Meta(max_length=64)]
BlockIds = Annotated[list[Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]], msgspec.Meta(max_length=1 << 20)]


class RankInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One prefill rank as a reader needs it: who to READ from, where, and in which format."""

    tp_rank: Annotated[int, msgspec.Meta(ge=0, lt=1 << 16)]
    agent_name: Name
    agent_metadata: Annotated[bytes, msgspec.Meta(max_length=1 << 22)]
    format: KVFormat
    layer_addrs: list[list[Address]]  # per buffer part (one for joint storage, K and V for split), per layer
    mem_type: Literal["DRAM", "VRAM"]
    device_id: Annotated[int, msgspec.Meta(ge=0, lt=1 << 16)] = 0  # NIXL's device id of the memory above


class HandshakeRequest(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """``target`` is the ``host:port`` the decode dialled; with a shared secret, ``mac`` proves the
    decode knows it (over ``nonce`` and ``target``), and the reply's ``mac`` proves the prefill does."""

    version: int = WIRE_VERSION
    nonce: Mac = b""
    target: Annotated[str, msgspec.Meta(max_length=300)] = ""
    mac: Mac = b""


class HandshakeReply(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    version: int
    engine_id: Name
    ranks: Annotated[list[RankInfo], msgspec.Meta(min_length=1, max_length=1024)]
    mac: Mac = b""


class PinRequest(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Extend the lease on a request's blocks and register ``reader`` as reading them; the lease
    token proves the caller was handed this lease by the prefill's answer."""

    request_id: Name
    lease_token: Token
    reader: Name
    block_ids: BlockIds


class PinReply(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    remaining_s: float


class ReleaseRequest(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """``reader`` is done (or gave up, or never needed the KV); the prefill frees the blocks once
    ``num_readers`` distinct readers are done and none is still reading."""

    request_id: Name
    lease_token: Token
    reader: Name
    num_readers: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 1  # decode ranks that read (its TP size)


class Ack(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    pass


class Error(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    message: Annotated[str, msgspec.Meta(max_length=4096)]


Request = HandshakeRequest | PinRequest | ReleaseRequest
Reply = HandshakeReply | PinReply | Ack | Error

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
    """msgspec raises ``UnicodeDecodeError`` for a bad string and ``RecursionError`` for deep nesting
    inside a frame; report both like any bad frame."""
    try:
        return decoder.decode(frame)
    except UnicodeDecodeError as e:
        raise msgspec.DecodeError(f"invalid UTF-8 in frame: {e}") from None
    except RecursionError:
        raise msgspec.DecodeError("frame nests too deeply") from None


def encode_ranks(ranks: list[RankInfo]) -> bytes:
    """The bytes a handshake MAC covers: what the prefill sent is what the decode will use."""
    return _encoder.encode(ranks)


def decode_rank_info(frame: bytes) -> RankInfo:
    return msgspec.msgpack.decode(frame, type=RankInfo)
