"""vLLM's CPU_ATTN packing op, bound to the shim's probe (``shim/cpu_attn.py``).

The probe that names CPU_ATTN's packed interior is pure torch; what needs vLLM is the op it
probes, ``torch.ops._C.cpu_attn_reshape_and_cache``. That op lives here, next to ``detect``
which calls it, so ``shim`` stays free of vLLM. Only call this where vLLM's CPU build is installed.
"""

from __future__ import annotations

import torch

from vllm_hetero_pd.shim import cpu_attn


def pack_reference(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor,
                   isa: str) -> None:
    """Write ``key``/``value`` ``[T, H, D]`` into a ``[NB, H, N, 2D]`` cache the way vLLM does."""
    from vllm import _custom_ops as ops

    num_blocks, num_heads, block_size, _ = kv_cache.shape
    key_cache, value_cache = kv_cache.view(num_blocks, num_heads, 2 * block_size, -1).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)


def derive_inner(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> tuple[str, str]:
    """``(k_inner, v_inner)`` of this host's CPU_ATTN ``isa`` kernel, probed through the real op."""
    return cpu_attn.derive_inner(pack_reference, isa, dtype, block_size, head_size)
