"""The router in front of a real prefill/decode pair (HeteroNixlConnector): output equals monolithic.

The router runs as its own process (``vllm-hetero-pd proxy``) on a free port; greedy completions
through it must equal the monolithic engine's, streamed text must equal non-streamed text, and
the decode must have loaded the prompt KV rather than computed it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest

from vllm_hetero_pd.launch.request import post_json
from vllm_hetero_pd.ports import free_port
from vllm_hetero_pd.testing.compare import LOGPROB_TOLERANCE, compare, greedy_body, parse_completion
from vllm_hetero_pd.testing.metrics import prompt_tokens_by_source


@pytest.fixture(scope="module")
def router(hetero_cluster):
    prefill, decode, _ = hetero_cluster.instances
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vllm_hetero_pd.cli", "proxy", "--port", str(port),
                             "--prefill", prefill.url, "--decode", decode.url],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    assert "router listening on" in line, line
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def stream_text(url: str, body: dict) -> str:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    text = []
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert resp.status == 200
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                text += [c["text"] for c in json.loads(line[6:])["choices"]]
    return "".join(text)


def test_router_output_equals_monolithic(router, hetero_cluster, prompts, reference):
    decode = hetero_cluster.instances[1]
    before = prompt_tokens_by_source(decode.url)
    got = [parse_completion(post_json(router + "/v1/completions", greedy_body(p), f"router-{i}", 300))
           for i, p in enumerate(prompts[:4])]
    assert compare(reference[:4], got, LOGPROB_TOLERANCE) == []
    after = prompt_tokens_by_source(decode.url)
    assert after["external_kv_transfer"] - before["external_kv_transfer"] >= sum(len(p) - 1 for p in prompts[:4])
    assert after["local_compute"] - before["local_compute"] <= 4


def test_router_streaming_matches_non_streaming(router, prompts):
    body = {**greedy_body(prompts[2]), "logprobs": None, "return_tokens_as_token_ids": False}
    whole = post_json(router + "/v1/completions", body, "router-whole", 300)["choices"][0]["text"]
    assert stream_text(router, body) == whole
