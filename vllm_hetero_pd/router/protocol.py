"""The P/D request protocol: what the router reads from a client and sends to prefill and decode.

The flow (vLLM NixlConnector, pull mode; see docs/router.md):

1. prefill gets the client's request with ``max_tokens=1``, ``stream=false``, no
   ``stream_options``/``min_tokens`` and ``kv_transfer_params={"do_remote_decode": true, ...}``;
2. prefill answers with ``kv_transfer_params`` naming the blocks it holds for decode;
3. decode gets the client's request unchanged plus exactly those ``kv_transfer_params``.

The router interprets only ``stream``, ``prompt``/``messages`` (to estimate prompt length) and
``kv_transfer_params`` (which it strips: a client must never steer a decode engine to read
arbitrary remote blocks). Every other field passes through untouched.
"""

from __future__ import annotations

import enum
import math
from typing import Any

import msgspec

# Upstream NixlConnector's request for a prefill that will be decoded elsewhere.
REMOTE_DECODE_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}

# Prompt length is estimated without a tokenizer: BPE vocabularies average about 4 characters
# of English text per token. Token-id prompts are counted exactly. The estimate only ranks
# instances against each other and gates --min-disagg-tokens, so a constant bias is harmless.
CHARS_PER_TOKEN = 4


class Endpoint(str, enum.Enum):
    COMPLETIONS = "/v1/completions"
    CHAT = "/v1/chat/completions"


class BadRequestError(ValueError):
    """The client's request cannot be routed; the message says what to change."""


class PrefillError(RuntimeError):
    """A prefill instance answered 2xx but not with usable ``kv_transfer_params``."""


class ClientRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A parsed client request. ``body`` already lacks any client ``kv_transfer_params``."""

    endpoint: Endpoint
    body: dict[str, Any]
    stream: bool
    num_prompt_tokens: int
    stripped_kv_transfer_params: bool


def parse_request(raw: bytes, endpoint: Endpoint) -> ClientRequest:
    """Validate what the router interprets; raise ``BadRequestError`` naming the field."""
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise BadRequestError(f"request body is not valid JSON ({exc}); send a JSON object") from None
    if not isinstance(body, dict):
        raise BadRequestError(f"request body must be a JSON object, got {type(body).__name__}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequestError(f"'stream' must be true or false, got {stream!r}")
    if endpoint is Endpoint.COMPLETIONS:
        num_tokens = _count_prompt(body.get("prompt"))
    else:
        num_tokens = _count_messages(body.get("messages"))
    stripped = body.pop("kv_transfer_params", None) is not None
    return ClientRequest(
        endpoint=endpoint, body=body, stream=stream, num_prompt_tokens=num_tokens, stripped_kv_transfer_params=stripped
    )


def prefill_body(request: ClientRequest) -> bytes:
    body = dict(request.body)
    body["max_tokens"] = 1
    if "max_completion_tokens" in body:
        body["max_completion_tokens"] = 1
    body["stream"] = False
    body.pop("stream_options", None)
    body.pop("min_tokens", None)
    body["kv_transfer_params"] = REMOTE_DECODE_PARAMS
    return msgspec.json.encode(body)


def decode_body(request: ClientRequest, kv_transfer_params: dict[str, Any] | None) -> bytes:
    """The client's request, plus prefill's ``kv_transfer_params`` (None: decode prefills locally)."""
    if kv_transfer_params is None:
        return msgspec.json.encode(request.body)
    return msgspec.json.encode({**request.body, "kv_transfer_params": kv_transfer_params})


def read_kv_transfer_params(raw: bytes, url: str) -> dict[str, Any]:
    """Extract prefill's ``kv_transfer_params``; a missing dict means the instance is misconfigured."""
    try:
        params = msgspec.json.decode(raw).get("kv_transfer_params")
    except (msgspec.DecodeError, AttributeError):
        raise PrefillError(f"prefill {url} answered with a body that is not a JSON object") from None
    if not isinstance(params, dict) or not params.get("do_remote_prefill"):
        raise PrefillError(
            f"prefill {url} returned no kv_transfer_params with do_remote_prefill=true; start it with "
            "--kv-transfer-config '{\"kv_connector\": ..., \"kv_role\": \"kv_producer\"}'"
        )
    return params


def _count_prompt(prompt: Any) -> int:
    if isinstance(prompt, str):
        return _text_tokens(prompt)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return sum(_text_tokens(p) for p in prompt)
        if all(isinstance(p, int) for p in prompt):
            return len(prompt)
        if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
            return sum(len(p) for p in prompt)
    raise BadRequestError(
        "'prompt' must be a non-empty string, list of strings, list of token ids or list of token-id lists"
    )


def _count_messages(messages: Any) -> int:
    if not isinstance(messages, list) or not messages:
        raise BadRequestError("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    total = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise BadRequestError(f"messages[{i}] must be an object with a 'role'")
        total += _count_content(message.get("content"), i)
    return total


def _count_content(content: Any, index: int) -> int:
    """Text parts are estimated; non-text parts (images, audio) are not counted."""
    if content is None:
        return 0
    if isinstance(content, str):
        return _text_tokens(content)
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return sum(_text_tokens(text) for text in texts if isinstance(text, str))
    raise BadRequestError(f"messages[{index}].content must be a string, a list of parts or null")


def _text_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))
