"""What real OpenAI clients send, through the router to a prefill bs32 -> decode bs128 pair.

Each request kind is sent once to a monolithic engine and once through the router; the answers
must be equal (text and token ids exactly, logprobs within ``LOGPROB_TOLERANCE``), or both must be
the same 4xx where vLLM itself refuses the request. Afterwards both engines are alive and hold
no KV blocks. The kinds are the ones that broke the P/D path in review: ``prompt_logprobs`` and
``echo`` with ``logprobs`` (vLLM skips the prefix cache, so the decode loads nothing and must
release the prefill's lease without reporting a load), a batch whose second prompt is shorter
(vLLM returns only prompt 0's ``kv_transfer_params``), ``n=2`` with a fixed seed, chat, and
streaming.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import pytest

from vllm_hetero_pd.launch.cluster import LocalCluster
from vllm_hetero_pd.launch.instance import InstanceSpec
from vllm_hetero_pd.launch.instance import hetero_kv_config as hetero
from vllm_hetero_pd.ports import free_port
from vllm_hetero_pd.testing.compare import LOGPROB_TOLERANCE

from pd_helpers import kv_usage, wait_until

IGNORED_KEYS = {"id", "created", "system_fingerprint", "kv_transfer_params", "service_tier"}
CHAT_TEXT = "Tell me about the history of the printing press and how it changed Europe. " * 6


def request_kinds(prompts: list[list[int]]) -> dict[str, tuple[str, dict[str, Any]]]:
    long, short = prompts[5], prompts[1]
    assert len(short) < len(long)
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
    """What a streaming client assembles: text per choice index, finish reasons, usage, and [DONE] seen."""
    text: dict[int, str] = {}
    finish: dict[int, Any] = {}
    usage, done = None, False
    for line in raw.splitlines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            continue
        chunk = json.loads(line[6:])
        assert "error" not in chunk, chunk
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            i = choice["index"]
            piece = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
            text[i] = text.get(i, "") + (piece or "")
            if choice.get("finish_reason"):
                finish[i] = choice["finish_reason"]
    return {"text": text, "finish": finish, "usage": usage, "done": done}


def differences(ref: Any, got: Any, path: str = "") -> list[str]:
    """Every place where ``got`` differs from ``ref``: floats within the tolerance, all else exactly."""
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


@pytest.fixture(scope="module")
def monolithic_answers(tiny_model, prompts, tmp_path_factory) -> dict[str, tuple[int, Any]]:
    kinds = request_kinds(prompts)
    with LocalCluster([InstanceSpec(role="monolithic", model=tiny_model, block_size=128)],
                      tmp_path_factory.mktemp("mono-clients")) as cluster:
        url = cluster.instances[0].url
        return {name: send(url, path, body) for name, (path, body) in kinds.items()}


@pytest.fixture(scope="module")
def pd_router(tiny_model, monolithic_answers, tmp_path_factory):
    """prefill bs32 -> decode bs128 (translated path) behind the router, as separate processes."""
    specs = [InstanceSpec(role="prefill", model=tiny_model, block_size=32,
                          kv_transfer_config=hetero("kv_producer", {"lease_s": 6.0, "heartbeat_s": 1.0})),
             InstanceSpec(role="decode", model=tiny_model, block_size=128,
                          kv_transfer_config=hetero("kv_consumer"))]
    with LocalCluster(specs, tmp_path_factory.mktemp("pd-clients")) as cluster:
        port = free_port()
        prefill, decode = cluster.instances
        proc = subprocess.Popen([sys.executable, "-m", "vllm_hetero_pd.cli", "proxy", "--port", str(port),
                                 "--prefill", prefill.url, "--decode", decode.url],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = proc.stdout.readline()
        assert "router listening on" in line, line
        try:
            yield f"http://127.0.0.1:{port}", cluster
        finally:
            proc.terminate()
            proc.wait(10)


@pytest.mark.parametrize("kind", ["prompt_logprobs", "echo_logprobs", "batch_second_shorter", "n2_seeded",
                                  "n2_greedy_refused_or_equal", "chat", "stream", "stream_chat"])
def test_request_through_pd_equals_monolithic(kind, pd_router, monolithic_answers, prompts):
    router, cluster = pd_router
    path, body = request_kinds(prompts)[kind]
    ref_status, ref = monolithic_answers[kind]
    status, got = send(router, path, body)
    if ref_status >= 400:  # vLLM refuses it: the router must refuse it the same way, not crash anything
        assert 400 <= status < 500, (status, got)
    else:
        assert status == 200, got
        assert differences(ref, got) == []
        if body.get("stream"):
            assert got["done"], "a complete stream ends with [DONE]"
    for instance in cluster.instances:
        assert instance.is_healthy(), f"{instance.name} died serving {kind}"
        assert wait_until(lambda i=instance: kv_usage(i.url) == 0.0, 20), f"{instance.name} holds KV after {kind}"
