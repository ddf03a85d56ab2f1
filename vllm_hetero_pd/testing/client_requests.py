"""The requests real OpenAI clients send, and how to compare two deployments' answers to them.

``request_kinds`` is the set that broke the P/D path in review (``prompt_logprobs``, ``echo`` with
``logprobs``, a batch whose second prompt is shorter, ``n=2`` with a seed, chat, streaming);
``differences`` compares a P/D answer with a monolithic one: text and token ids exactly,
logprobs within ``LOGPROB_TOLERANCE``. Used by the end-to-end tests and ``bench soak``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from vllm_hetero_pd.testing.compare import LOGPROB_TOLERANCE

IGNORED_KEYS = {"id", "created", "system_fingerprint", "kv_transfer_params", "service_tier"}
CHAT_TEXT = "Tell me about the history of the printing press and how it changed Europe. " * 6


def request_kinds(prompts: list[list[int]]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Name -> (endpoint, body), built from prompts of rising length (``testing.prompts``)."""
    long, short = prompts[5], prompts[1]
    if len(short) >= len(long):
        raise ValueError("request_kinds needs prompts of rising length (testing.prompts.make_prompts)")
    greedy = {"temperature": 0.0, "max_tokens": 12, "ignore_eos": True}
    return {
        "prompt_logprobs": ("/v1/completions", {**greedy, "prompt": prompts[2], "logprobs": 2, "prompt_logprobs": 2}),
        "echo_logprobs": ("/v1/completions", {**greedy, "prompt": prompts[3], "logprobs": 2, "echo": True}),
        "batch_second_shorter": ("/v1/completions", {**greedy, "prompt": [long, short], "logprobs": 2,
                                                     "return_token_ids": True}),
        "n2_seeded": ("/v1/completions", {"prompt": prompts[4], "max_tokens": 12, "ignore_eos": True, "n": 2,
                                          "temperature": 1.0, "seed": 1234, "logprobs": 1}),
        "n2_greedy_refused_or_equal": ("/v1/completions", {**greedy, "prompt": prompts[0], "n": 2}),
        "chat": ("/v1/chat/completions", {**greedy, "messages": [{"role": "user", "content": CHAT_TEXT}],
                                          "logprobs": True, "top_logprobs": 2}),
        "stream": ("/v1/completions", {**greedy, "prompt": prompts[6], "stream": True, "logprobs": 1}),
        "stream_chat": ("/v1/chat/completions", {**greedy, "messages": [{"role": "user", "content": CHAT_TEXT}],
                                                 "stream": True, "stream_options": {"include_usage": True}}),
    }


def send(url: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """(status, parsed answer); a stream is folded into per-choice text, finish reasons and usage."""
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            raw = resp.read().decode()
            return resp.status, fold_stream(raw) if body.get("stream") else json.loads(raw)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode() or "{}")


def fold_stream(raw: str) -> dict[str, Any]:
    """What a streaming client assembles: text per choice index, finish reasons, usage, error events,
    and whether ``[DONE]`` came."""
    text: dict[int, str] = {}
    finish: dict[int, Any] = {}
    usage, done, errors = None, False, []
    for line in raw.splitlines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:  # an in-stream error event (HTTP 200 was already sent)
            errors.append(chunk["error"])
            continue
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            i = choice["index"]
            piece = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
            text[i] = text.get(i, "") + (piece or "")
            if choice.get("finish_reason"):
                finish[i] = choice["finish_reason"]
    return {"text": text, "finish": finish, "usage": usage, "done": done, "errors": errors}


def differences(ref: Any, got: Any, path: str = "") -> list[str]:
    """Every place where ``got`` differs from ``ref``: floats within the tolerance, all else exactly."""
    if _is_top_logprobs(ref) and _is_top_logprobs(got) and set(ref) != set(got):
        return _top_logprobs_differences(ref, got, path)
    if isinstance(ref, dict) and isinstance(got, dict):
        keys = (set(ref) | set(got)) - IGNORED_KEYS
        return [d for k in sorted(keys, key=str) for d in differences(ref.get(k), got.get(k), f"{path}.{k}")]
    if isinstance(ref, list) and isinstance(got, list):
        if len(ref) != len(got):
            return [f"{path}: {len(ref)} items vs {len(got)}"]
        return [d for i, (a, b) in enumerate(zip(ref, got)) for d in differences(a, b, f"{path}[{i}]")]
    if isinstance(ref, float) and isinstance(got, float):
        return [] if abs(ref - got) <= LOGPROB_TOLERANCE else [f"{path}: {ref} vs {got}"]
    return [] if ref == got else [f"{path}: {ref!r} vs {got!r}"]


def _is_top_logprobs(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, float) for v in value.values())


def _top_logprobs_differences(ref: dict[str, float], got: dict[str, float], path: str) -> list[str]:
    """Top-k sets may swap their k-th entry on a near-tie (batching changes bf16 rounding); the top-1
    must agree and every shared entry must be within the tolerance (``testing.compare``'s rule)."""
    if max(ref, key=ref.get) != max(got, key=got.get):
        return [f"{path}: top-1 {max(ref, key=ref.get)!r} vs {max(got, key=got.get)!r}"]
    return [f"{path}.{k}: {ref[k]} vs {got[k]}" for k in sorted(set(ref) & set(got))
            if abs(ref[k] - got[k]) > LOGPROB_TOLERANCE]
