"""Baseline: vLLM's own NixlConnector between two local CPU engines equals the monolithic engine.

This pins the flow our own connector must match: same greedy ids, top-5 logprobs within the
stated tolerance, and the decode engine computing no prompt tokens itself (they all arrive as
``external_kv_transfer``). Across releases (a 0.32 prefill, a 0.28 decode: the pair
HeteroNixlConnector serves in ``test_cross_release_pd.py``) it records what upstream does.
"""

from pathlib import Path

import psutil
import pytest

from vllm_hetero_pd.launch.cluster import LocalCluster
from vllm_hetero_pd.launch.greedy import run_disaggregated
from vllm_hetero_pd.launch.instance import InstanceSpec
from vllm_hetero_pd.launch.request import RequestFailed
from vllm_hetero_pd.testing.compare import LOGPROB_TOLERANCE, compare, max_logprob_delta
from vllm_hetero_pd.testing.metrics import prompt_tokens_by_source

from pd_helpers import log_of

PYTHON_028 = Path(__file__).resolve().parents[2] / ".venv-028" / "bin" / "python"


def process_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def nixl(role: str, extra: dict | None = None) -> dict:
    return {"kv_connector": "NixlConnector", "kv_role": role, "kv_buffer_device": "cpu",
            "kv_connector_extra_config": extra or {}}


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


@pytest.mark.skipif(not PYTHON_028.exists(), reason="needs .venv-028 (make setup-028) for the 0.28 decode")
def test_upstream_nixl_refuses_a_0_32_prefill_for_a_0_28_decode(tiny_model, prompts, log_dir):
    """Upstream fails every request of this pair with HTTP 500 and moves no KV: by default at its
    compatibility hash (it includes the vLLM version); with the check off, at its block-size rule."""
    specs = [InstanceSpec(role="prefill", model=tiny_model, block_size=128, kv_transfer_config=nixl("kv_producer")),
             InstanceSpec(role="decode", model=tiny_model, block_size=32, python=str(PYTHON_028),
                          kv_transfer_config=nixl("kv_consumer")),
             InstanceSpec(role="decode", model=tiny_model, block_size=32, python=str(PYTHON_028),
                          kv_transfer_config=nixl("kv_consumer", {"enforce_handshake_compat": False}))]
    with LocalCluster(specs, log_dir) as cluster:
        prefill, strict, lax = cluster.instances
        for decode in (strict, lax):
            with pytest.raises(RequestFailed, match="HTTP 500"):
                run_disaggregated(prefill.url, decode.url, prompts[:1])
            assert prompt_tokens_by_source(decode.url)["external_kv_transfer"] == 0
        assert all(inst.is_healthy() for inst in cluster.instances), "upstream fails the request, not the engine"
        logs = {inst.name: log_of(inst) for inst in (strict, lax)}
    assert "NIXL compatibility hash mismatch" in logs[strict.name]
    assert "is not divisible by remote block size" in logs[lax.name]
