"""``kv_transfer_params``: the one typed protocol between a prefill's answer, the router and a decode.

The flow is vLLM's pull mode. The router asks a prefill with ``prefill_request_params()``; the
prefill answers with a ``TransferParams`` dict naming the blocks it holds under a lease; the
decode receives exactly that dict. Two fields make a forged or misapplied dict harmless:

- ``lease_token`` is unguessable and issued by the prefill with the lease; the prefill checks it
  on every pin and release, so nobody can pin or release a lease they were not handed;
- ``prompt_digest`` is a hash of the prompt token ids the prefill computed; the decode refuses
  to load KV for a prompt with another digest (e.g. the second prompt of a batch that was sent
  with the first prompt's params).

This module is a leaf (msgspec and the standard library only): the router imports it without
pulling in torch, vLLM or NIXL.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence
from typing import Any

import msgspec


def prefill_request_params() -> dict[str, Any]:
    """What a prefill is sent: keep the KV for a remote decode (the upstream NixlConnector shape)."""
    return {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
            "remote_block_ids": None, "remote_host": None, "remote_port": None}


class TransferParams(msgspec.Struct, frozen=True, kw_only=True):
    """The ``kv_transfer_params`` a prefill returns and its decode receives."""

    do_remote_prefill: bool
    remote_engine_id: str
    remote_request_id: str
    remote_host: str
    remote_port: int
    remote_block_ids: list[int]
    remote_num_tokens: int
    lease_token: str
    prompt_digest: str
    do_remote_decode: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.remote_port < 65536:
            raise ValueError(f"remote_port {self.remote_port} is not a TCP port")
        if self.remote_num_tokens < 1:
            raise ValueError(f"remote_num_tokens must be >= 1, got {self.remote_num_tokens}")
        if any(b < 0 or b >= 2**63 for b in self.remote_block_ids):
            raise ValueError("remote_block_ids must be non-negative 64-bit integers")
        if not self.lease_token or not self.prompt_digest:
            raise ValueError("lease_token and prompt_digest must be set: forward the prefill's params unchanged")


def parse_transfer_params(params: dict[str, Any]) -> TransferParams:
    """Typed ``kv_transfer_params``; raises ``ValueError`` naming the bad field."""
    try:
        return msgspec.convert(params, TransferParams)
    except msgspec.ValidationError as e:
        raise ValueError(f"malformed kv_transfer_params: {e}; forward the prefill's answer unchanged") from None


def to_dict(params: TransferParams) -> dict[str, Any]:
    """The JSON-ready dict vLLM returns to the client as ``kv_transfer_params``."""
    return msgspec.to_builtins(params)


def prompt_digest(token_ids: Sequence[int]) -> str:
    """A digest of the prompt's token ids, equal on both sides iff the prompts are equal."""
    packed = array("q", token_ids)
    if sys.byteorder == "big":
        packed.byteswap()
    return hashlib.blake2b(packed.tobytes(), digest_size=16).hexdigest()
