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

import subprocess
import sys
from typing import Any

import pytest

from vllm_hetero_pd.launch.cluster import LocalCluster
from vllm_hetero_pd.launch.instance import InstanceSpec
from vllm_hetero_pd.launch.instance import hetero_kv_config as hetero
from vllm_hetero_pd.ports import free_port
from vllm_hetero_pd.testing.client_requests import differences, request_kinds, send

from pd_helpers import kv_usage, wait_until


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
