"""The tiny models must make wrong KV visible: varied, context-dependent greedy output.

These run the saved weights through transformers (the same files vLLM loads), so they check the
model itself; the end-to-end tests check vLLM on top.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from vllm_hetero_pd.testing.prompts import make_prompts
from vllm_hetero_pd.testing.tiny_model import PRESETS, build_tiny_model

NUM_NEW = 32


def greedy(model, prompt: list[int], corrupt=None) -> list[int]:
    """Greedy decode; ``corrupt(cache)`` may rewrite the prompt's KV cache before decoding."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out.past_key_values
        if corrupt is not None:
            corrupt(cache)
        tokens = [int(out.logits[0, -1].argmax())]
        for _ in range(NUM_NEW - 1):
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def kv_tensors(cache):
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


@pytest.fixture(scope="module", params=sorted(PRESETS))
def model_and_prompts(request, tmp_path_factory):
    path = build_tiny_model(request.param, "float32", cache_dir=tmp_path_factory.mktemp("models"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, make_prompts(path, (50, 200, 400))


def test_greedy_output_is_varied_and_prompt_dependent(model_and_prompts):
    model, prompts = model_and_prompts
    outputs = [greedy(model, p) for p in prompts]
    for out in outputs:
        assert len(set(out)) >= 10, f"degenerate continuation: {out}"
    assert len({tuple(o) for o in outputs}) == len(outputs), "different prompts gave the same continuation"


@pytest.mark.parametrize("corruption", ["zero", "shuffle_tokens"])
def test_corrupted_kv_changes_output(model_and_prompts, corruption):
    model, prompts = model_and_prompts
    prompt = prompts[1]
    clean = greedy(model, prompt)

    def corrupt(cache):
        gen = torch.Generator().manual_seed(0)
        for t in kv_tensors(cache):  # [batch, kv_heads, tokens, head_dim]
            if corruption == "zero":
                t.zero_()
            else:
                t.copy_(t[:, :, torch.randperm(t.shape[2], generator=gen)])

    assert greedy(model, prompt, corrupt) != clean


def test_build_is_deterministic_and_cached(tmp_path):
    a = build_tiny_model("llama-gqa-d32", "bfloat16", cache_dir=tmp_path / "a")
    b = build_tiny_model("llama-gqa-d32", "bfloat16", cache_dir=tmp_path / "b")
    assert a.name == b.name
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert build_tiny_model("llama-gqa-d32", "bfloat16", cache_dir=tmp_path / "a") == a
    assert "chat_template" in (a / "tokenizer_config.json").read_text()


def test_unknown_model_or_dtype_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny model"):
        build_tiny_model("gpt-5", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown dtype"):
        build_tiny_model("llama-gqa-d32", "int3", cache_dir=tmp_path)
