"""Baseline: vLLM's own NixlConnector between two local CPU engines equals the monolithic engine.

This pins the flow our own connector must match: same greedy ids, top-5 logprobs within the
stated tolerance, and the decode engine computing no prompt tokens itself (they all arrive as
``external_kv_transfer``).
"""

import psutil

from vllm_hetero_pd.launch.cluster import LocalCluster
from vllm_hetero_pd.launch.greedy import run_disaggregated
from vllm_hetero_pd.launch.instance import InstanceSpec
from vllm_hetero_pd.testing.compare import LOGPROB_TOLERANCE, compare, max_logprob_delta
from vllm_hetero_pd.testing.metrics import prompt_tokens_by_source


def process_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def nixl(role: str) -> dict:
    return {"kv_connector": "NixlConnector", "kv_role": role, "kv_buffer_device": "cpu"}


def test_upstream_nixl_pd_matches_monolithic(tiny_model, prompts, reference, log_dir):
    specs = [InstanceSpec(role="prefill", model=tiny_model, kv_transfer_config=nixl("kv_producer")),
             InstanceSpec(role="decode", model=tiny_model, kv_transfer_config=nixl("kv_consumer"))]
    with LocalCluster(specs, log_dir) as cluster:
        prefill, decode = cluster.instances
        procs = [p for inst in cluster.instances for p in process_tree(inst.process.pid)]
        assert len(procs) >= 4, "expected an API server and an engine-core process per instance"
        got = run_disaggregated(prefill.url, decode.url, prompts)
        on_decode = prompt_tokens_by_source(decode.url)
        on_prefill = prompt_tokens_by_source(prefill.url)
    alive = psutil.wait_procs(procs, timeout=10)[1]
    assert not alive, f"the launcher left processes behind: {[p.pid for p in alive]}"

    assert compare(reference, got, LOGPROB_TOLERANCE) == []
    print("max logprob delta:", max(max_logprob_delta(r, g) for r, g in zip(reference, got)))
    total = sum(len(p) for p in prompts)
    assert on_prefill["local_compute"] == total
    # decode computed (almost) nothing itself: the prompt KV came over NIXL
    assert on_decode["local_compute"] <= len(prompts)
    assert on_decode["external_kv_transfer"] >= total - len(prompts)
