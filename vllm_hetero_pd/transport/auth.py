"""Side-channel authentication: an HMAC handshake over a secret both sides read from the environment.

Without a secret anyone who reaches a prefill's side channel learns its NIXL metadata and KV
addresses (see docs/operations.md, "Trust model"). With one, the handshake is mutual:

- the decode sends a fresh ``nonce`` and the ``target`` address it dialled, with
  ``mac = HMAC(secret, "hs-request" | nonce | target)``; the prefill answers only if the MAC is
  right and ``target`` is its own advertised address, so a relay at another address is refused;
- the prefill answers with ``HMAC(secret, "hs-reply" | nonce | target | engine id | ranks)``, so
  a fake side channel (which lacks the secret) cannot pose as a prefill, and a captured reply
  cannot be replayed to another handshake.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets


class AuthError(ValueError):
    """A handshake whose MAC is missing or wrong."""


def load_secret(env_name: str) -> bytes | None:
    """The shared secret named by ``side_channel_secret_env``; None when the key is unset."""
    if not env_name:
        return None
    value = os.environ.get(env_name, "")
    if len(value) < 16:
        raise AuthError(f"side_channel_secret_env names ${env_name}, which holds {len(value)} characters; "
                        f"export a secret of at least 16 characters on both prefill and decode")
    return value.encode()


def new_nonce() -> bytes:
    return secrets.token_bytes(16)


def mac(secret: bytes, label: str, *parts: bytes | str) -> bytes:
    """HMAC-SHA256 over length-prefixed parts, so that no two part lists give the same input."""
    h = hmac.new(secret, label.encode(), hashlib.sha256)
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big") + data)
    return h.digest()


def check(secret: bytes, expected_label: str, got: bytes, *parts: bytes | str) -> None:
    if not hmac.compare_digest(mac(secret, expected_label, *parts), got):
        raise AuthError("side-channel handshake failed authentication: the peer does not hold the secret "
                        "named by side_channel_secret_env (set the same secret on prefill and decode)")
