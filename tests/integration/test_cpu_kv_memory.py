"""Real vLLM memory: the CPU_ATTN KVFormat reads a live vLLM CPU engine's cache correctly.

A vLLM 0.32 CPU engine prefills one prompt of the tiny model (bf16); inside its worker
``connector.detect`` describes the cache and ``shim.decode`` reads the blocks back. Those K/V
must equal the keys (after RoPE) and values of a transformers forward pass of the same
weights (``past_key_values``), within a bf16 tolerance: per layer, max |vLLM - reference| <=
10 % of that layer's max |reference| (vLLM computes in bf16, the reference in fp32, and the error
grows with depth: measured 0.6 % at layer 0, worst 5.2 % at layer 3 of the 4-layer model). A wrong
interior (K not transposed, K and V swapped, wrong block) misses by more than 100 % and fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_hetero_pd.testing.tiny_model import build_tiny_model

pytestmark = pytest.mark.engine
TOLERANCE = 0.10  # of the layer's max |reference|


def _reference(model_dir: Path, prompt: list[int]):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        cache = model(torch.tensor([prompt]), use_cache=True).past_key_values
    layers = [(layer.keys, layer.values) for layer in cache.layers]  # each [1, H, T, D]
    k = torch.stack([kl[0].transpose(0, 1) for kl, _ in layers])  # [L, T, H, D]
    v = torch.stack([vl[0].transpose(0, 1) for _, vl in layers])
    return k, v


def test_cpu_attn_format_decodes_live_vllm_cache(tmp_path):
    model_dir = build_tiny_model("llama-gqa-d32", "bfloat16")
    out = tmp_path / "dump.pt"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    script = Path(__file__).with_name("cpu_kv_dump.py")
    run = subprocess.run([sys.executable, str(script), str(model_dir), str(out)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    dump = torch.load(out)
    fmt, prompt = dump["format"], dump["prompt"]
    assert (fmt["outer"], fmt["k_inner"], fmt["v_inner"]) == ("LBH", "DN", "ND")  # derived from the kernel
    assert fmt["name"] == "detected/CPU_ATTN/LBHNC" and fmt["dtype"] == "bfloat16"
    bs = fmt["block_size"]
    ref_k, ref_v = _reference(model_dir, prompt)
    got_k, got_v = dump["k"].float(), dump["v"].float()  # [L, searched blocks * bs, H, D]

    def close(a, b):  # [L, n, H, D]
        err = (a - b).abs().amax(dim=(1, 2, 3))
        return bool((err <= TOLERANCE * b.abs().amax(dim=(1, 2, 3))).all())

    worst = 0.0
    for i in range(0, len(prompt), bs):  # find the block holding each chunk of the prompt
        n = min(bs, len(prompt) - i)
        want_k, want_v = ref_k[:, i : i + n], ref_v[:, i : i + n]
        hits = [b for b in range(got_k.shape[1] // bs)
                if close(got_k[:, b * bs : b * bs + n], want_k) and close(got_v[:, b * bs : b * bs + n], want_v)]
        assert len(hits) == 1, f"prompt block {i // bs}: matching cache blocks {hits}"
        b = hits[0]
        for got, want in ((got_k, want_k), (got_v, want_v)):
            rel = (got[:, b * bs : b * bs + n] - want).abs().amax(dim=(1, 2, 3)) / want.abs().amax(dim=(1, 2, 3))
            worst = max(worst, float(rel.max()))
    print(f"worst per-layer max error: {100 * worst:.2f} % of max |reference| (tolerance {100 * TOLERANCE:.0f} %)")
