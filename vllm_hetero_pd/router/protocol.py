"""The P/D request protocol: what the router reads from a client and sends to prefill and decode.

The flow (vLLM NixlConnector, pull mode; see docs/router.md):

1. prefill gets the client's request with ``max_tokens=1``, ``stream=false``, no
   ``stream_options``/``min_tokens`` and ``kv_params.prefill_request_params()``;
2. prefill answers with ``kv_transfer_params`` naming the blocks it holds for decode;
3. decode gets the client's request unchanged plus exactly those ``kv_transfer_params``.

The router treats the prefill's ``kv_transfer_params`` as an opaque dict: it checks only
``do_remote_prefill`` and forwards the dict verbatim, so upstream NixlConnector prefills (without
our ``lease_token``/``prompt_digest``) work as well as ours.

One exchange carries the KV of one prompt for one sequence: vLLM returns only prompt 0's params
for a list ``prompt``, and the ``n`` children of one request would share one lease. So a batch or
``n > 1`` is fanned out (``fan_out``) into one single-prompt, ``n=1`` request per choice, and the
answers are merged back in vLLM's format (``merge_answers``, ``merge_usage``, ``relabel_chunk``).

The router interprets only ``stream``, ``prompt``/``messages``, ``n``, ``seed``, ``best_of``,
``use_beam_search`` and ``kv_transfer_params`` (which it strips: a client must never steer a
decode engine to read arbitrary remote blocks). Every other field passes through untouched.
"""

from __future__ import annotations

import enum
import math
from typing import Any

import msgspec

from vllm_hetero_pd import kv_params

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
    """A parsed client request, or one part of a fanned-out one.

    ``body`` already lacks any client ``kv_transfer_params``. ``n`` is the validated number of
    samples per prompt. A part has ``part_label`` (e.g. ``prompt 1 of 2``, for error messages)
    and its ``sample_index`` (usage counts a prompt's tokens once, at sample 0, as vLLM does).
    """

    endpoint: Endpoint
    body: dict[str, Any]
    stream: bool
    num_prompt_tokens: int
    stripped_kv_transfer_params: bool
    n: int = 1
    part_label: str = ""
    sample_index: int = 0


def parse_request(raw: bytes, endpoint: Endpoint) -> ClientRequest:
    """Validate what the router interprets; raise ``BadRequestError`` naming the field."""
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise BadRequestError(f"request body is not valid JSON ({exc}); send a JSON object") from None
    except RecursionError:
        raise BadRequestError(_TOO_DEEP) from None
    if not isinstance(body, dict):
        raise BadRequestError(f"request body must be a JSON object, got {type(body).__name__}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequestError(f"'stream' must be true or false, got {stream!r}")
    if endpoint is Endpoint.COMPLETIONS:
        num_tokens = sum(_count_prompt(p) for p in _prompts(body.get("prompt")))
    else:
        num_tokens = _count_messages(body.get("messages"))
    n = _num_samples(body)
    stripped = body.pop("kv_transfer_params", None) is not None
    return ClientRequest(endpoint=endpoint, body=body, stream=stream, num_prompt_tokens=num_tokens,
                         stripped_kv_transfer_params=stripped, n=n)


_TOO_DEEP = ("request body nests JSON too deeply (arrays or objects about 1000 levels deep); "
             "flatten it")


def fan_out(request: ClientRequest, max_fan_out: int) -> list[ClientRequest]:
    """One single-prompt, ``n=1`` request per choice, in vLLM's choice order; ``[request]`` if one.

    vLLM numbers the choices of a batch prompt-major: choice ``prompt_idx * n + sample_idx``
    (``vllm/entrypoints/openai/completion/serving.py``, 0.32: ``i = output.index + prompt_idx *
    num_choices``), and gives child ``i`` of a seeded ``n > 1`` request the seed ``seed + i``
    (``vllm/v1/engine/parallel_sampling.py``: ``child_sampling_params.seed = seed + index``), so
    each part's output equals the choice a monolithic engine would return.
    """
    prompts = _prompts(request.body["prompt"]) if request.endpoint is Endpoint.COMPLETIONS else [None]
    num_parts = len(prompts) * request.n
    if num_parts == 1:
        return [request]
    if num_parts > max_fan_out:
        raise BadRequestError(
            f"the request asks for {num_parts} choices ({len(prompts)} prompts x n={request.n}), more than the "
            f"router's max_fan_out ({max_fan_out}) P/D exchanges per request; split it or raise max_fan_out")
    return [_part(request, prompts, p, s) for p in range(len(prompts)) for s in range(request.n)]


def _part(request: ClientRequest, prompts: list[Any], prompt_index: int, sample_index: int) -> ClientRequest:
    body = dict(request.body)
    labels = []
    num_tokens = request.num_prompt_tokens
    if len(prompts) > 1:
        body["prompt"] = prompts[prompt_index]
        num_tokens = _count_prompt(prompts[prompt_index])
        labels.append(f"prompt {prompt_index} of {len(prompts)}")
    if request.n > 1:
        body["n"] = 1
        body.pop("best_of", None)
        if body.get("seed") is not None:
            body["seed"] += sample_index
        labels.append(f"sample {sample_index} of n={request.n}")
    return msgspec.structs.replace(request, body=body, num_prompt_tokens=num_tokens, n=1,
                                   part_label=", ".join(labels), sample_index=sample_index)


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The prefill leg of ``body``: one token, not streamed, its KV kept for a remote decode."""
    out = {k: v for k, v in body.items() if k not in ("stream_options", "min_tokens")}
    out.update(max_tokens=1, stream=False, kv_transfer_params=kv_params.prefill_request_params())
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    return out


def report_reused_blocks(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` asking vLLM to publish a ``BlockStored`` for every prefix block it reuses, not only
    for new ones (``vllm_xargs.kv_cache_report_mode = "full"``), so the router's KV event index
    refills from traffic after it was cleared. A client's other ``vllm_xargs`` are kept."""
    xargs = body.get("vllm_xargs")
    if xargs is not None and not isinstance(xargs, dict):
        return body
    return {**body, "vllm_xargs": {**(xargs or {}), "kv_cache_report_mode": "full"}}


def encode_body(body: dict[str, Any]) -> bytes:
    """JSON for an upstream call; a body too deep to encode is the client's fault (400)."""
    try:
        return msgspec.json.encode(body)
    except RecursionError:
        raise BadRequestError(_TOO_DEEP) from None


def decode_body(request: ClientRequest, kv_transfer_params: dict[str, Any] | None) -> bytes:
    """The client's request, plus prefill's ``kv_transfer_params`` (None: decode prefills locally)."""
    if kv_transfer_params is None:
        return encode_body(request.body)
    return encode_body({**request.body, "kv_transfer_params": kv_transfer_params})


class _PrefillAnswer(msgspec.Struct):
    """The one field the router reads from a prefill's answer; decoding skips the rest (choices,
    usage ...) without building Python objects for them."""

    kv_transfer_params: Any = None


_PREFILL_ANSWER = msgspec.json.Decoder(_PrefillAnswer)


def read_kv_transfer_params(raw: bytes, url: str) -> dict[str, Any]:
    """Extract prefill's ``kv_transfer_params``; a missing dict means the instance is misconfigured."""
    try:
        params = _PREFILL_ANSWER.decode(raw).kv_transfer_params
    except (msgspec.DecodeError, RecursionError):  # msgspec.ValidationError (not an object) is a DecodeError
        raise PrefillError(f"prefill {url} answered with a body that is not a JSON object") from None
    if not isinstance(params, dict) or not params.get("do_remote_prefill"):
        raise PrefillError(
            f"prefill {url} returned no kv_transfer_params with do_remote_prefill=true; start it with "
            "--kv-transfer-config '{\"kv_connector\": ..., \"kv_role\": \"kv_producer\"}'"
        )
    return params


def merge_answers(parts: list[ClientRequest], answers: list[dict[str, Any]]) -> dict[str, Any]:
    """The parts' non-streamed answers as the one answer vLLM gives the whole request.

    id, created and model are the first part's; choices are re-indexed in order; usage is
    ``merge_usage``. Per-request ``metrics`` are dropped: vLLM omits them for a batch or ``n > 1``.
    """
    merged = {k: v for k, v in answers[0].items() if k != "metrics"}
    choices = (choice for answer in answers for choice in answer["choices"])
    merged["choices"] = [{**choice, "index": i} for i, choice in enumerate(choices)]
    usage = merge_usage(parts, [answer.get("usage") for answer in answers])
    if usage is not None:
        merged["usage"] = usage
    return merged


def merge_usage(parts: list[ClientRequest], usages: list[Any]) -> dict[str, Any] | None:
    """Summed usage as vLLM reports it: each prompt's tokens once (not once per sample), all completions."""
    present = [(part, usage) for part, usage in zip(parts, usages) if isinstance(usage, dict)]
    if not present:
        return None
    prompt_tokens = sum(u.get("prompt_tokens") or 0 for part, u in present if part.sample_index == 0)
    completion_tokens = sum(u.get("completion_tokens") or 0 for _, u in present)
    return {**present[0][1], "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def relabel_chunk(chunk: dict[str, Any], choice_index: int, first: dict[str, Any]) -> dict[str, Any]:
    """A part's stream chunk as a chunk of the merged stream: its choice at ``choice_index``, and the
    id and created of the merged stream's ``first`` chunk (one stream has one id, as in vLLM)."""
    chunk["id"], chunk["created"] = first.get("id"), first.get("created")
    for choice in chunk.get("choices") or ():
        choice["index"] = choice_index
    return chunk


def is_usage_chunk(chunk: dict[str, Any]) -> bool:
    """The final ``include_usage`` chunk of a stream: no choices, only usage."""
    return not chunk.get("choices") and isinstance(chunk.get("usage"), dict)


def _prompts(prompt: Any) -> list[Any]:
    """The separate prompts of a completions ``prompt``: a string or one token-id list is one prompt."""
    if isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt)
                                                or all(isinstance(p, list) for p in prompt)):
        return prompt
    return [prompt]


GREEDY_TEMPERATURE = 1e-5  # vLLM's _SAMPLING_EPS: below it, sampling is greedy


def _num_samples(body: dict[str, Any]) -> int:
    """``n``, checked together with the fields whose meaning fan-out would change."""
    n = 1 if body.get("n") is None else body["n"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise BadRequestError(f"'n' must be a positive integer, got {n!r}")
    best_of = body.get("best_of")
    if best_of not in (None, 1, n):
        raise BadRequestError(f"'best_of' {best_of!r} is not supported unless it equals n ({n}): vLLM's V1 engine "
                              "ignores best_of; ask for n choices and pick the best yourself")
    if n > 1 and body.get("use_beam_search"):
        raise BadRequestError(f"'use_beam_search' with n={n} is not supported through the P/D router: the beams "
                              "of one search cannot be split into independent exchanges; send n=1")
    temperature = body.get("temperature")
    if n > 1 and isinstance(temperature, (int, float)) and temperature < GREEDY_TEMPERATURE:
        # vLLM refuses this itself (SamplingParams._verify_greedy_sampling); fanned out, each child would
        # be accepted and the client would get n identical choices instead of the same 400
        raise BadRequestError(f"n must be 1 when using greedy sampling, got {n}.")
    seed = body.get("seed")
    if n > 1 and seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise BadRequestError(f"'seed' must be an integer, got {seed!r}")
    return n


def _count_prompt(prompt: Any) -> int:
    if isinstance(prompt, str):
        return _text_tokens(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        return len(prompt)
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
