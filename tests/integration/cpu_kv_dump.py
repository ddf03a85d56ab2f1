"""Run a vLLM CPU engine on one prompt and dump what its KV cache holds, decoded by the shim.

``python cpu_kv_dump.py MODEL_DIR OUT.pt``: starts an in-process ``vllm.LLM``, prefills one
prompt, then inside the worker detects the cache's ``KVFormat`` (connector/detect.py, CPU_ATTN
interior derived from the kernel) and decodes every block with it. Writes the format and the
decoded K/V of the first SEARCHED_BLOCKS blocks to OUT.pt for tests/integration/test_cpu_kv_memory.py.
"""

from __future__ import annotations

import sys

PROMPT_LEN = 300  # 2 full CPU blocks of 128 and a partial one
SEARCHED_BLOCKS = 16


def _dump(worker):
    import msgspec

    from vllm_hetero_pd.connector.detect import detect
    from vllm_hetero_pd.shim import decode

    context = worker.vllm_config.compilation_config.static_forward_context
    kv_caches = {}
    for name, layer in context.items():
        cache = getattr(layer, "kv_cache", None)
        cache = cache[0] if isinstance(cache, list) else cache
        if cache is not None and cache.numel():
            kv_caches[name] = cache
    fmt = detect(worker.vllm_config, kv_caches)
    searched = min(fmt.num_blocks, SEARCHED_BLOCKS)  # a fresh engine hands out low block ids first
    k, v = decode(fmt, kv_caches, range(searched), searched * fmt.block_size)
    return msgspec.to_builtins(fmt), k.clone(), v.clone()


def main(model_dir: str, out_path: str) -> None:
    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype="bfloat16", enforce_eager=True, max_model_len=1024, max_num_seqs=4,
              enable_prefix_caching=False, seed=0)
    prompt = [(7 * i + 3) % 500 + 10 for i in range(PROMPT_LEN)]
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    (fmt, k, v), *_ = llm.collective_rpc(_dump)
    torch.save({"format": fmt, "k": k, "v": v, "prompt": prompt}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
