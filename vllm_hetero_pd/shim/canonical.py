"""Canonical K/V tensors ``[layers, tokens, heads, head_size]`` to and from any format.

The reference the tests compare against, and how a caller reads a live cache back (for
example to check vLLM's CPU cache against a reference forward pass). Both directions go
through ``translate`` with a plain token-major format on the canonical side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec
import torch

from vllm_hetero_pd.formats.format import KVFormat
from vllm_hetero_pd.shim.fp8 import STORAGE_DTYPES, TORCH_DTYPES
from vllm_hetero_pd.shim.plan import plan
from vllm_hetero_pd.shim.translate import KVBuffers, translate


def canonical_format(fmt: KVFormat, num_tokens: int) -> KVFormat:
    """``fmt``'s geometry and dtype, stored as separate ``[L, tokens, H, D]`` K and V tensors."""
    num_blocks = max(1, math.ceil(num_tokens / fmt.block_size))
    return msgspec.structs.replace(
        fmt, name="canonical", storage="split", outer="L", k_inner="BNHD", v_inner="BNHD" if fmt.head_size_v else "",
        num_blocks=num_blocks, num_pad_blocks=0,
    )


def empty_canonical(fmt: KVFormat, num_tokens: int,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed canonical K and V (V has head_size_v columns, possibly 0), rounded up to whole blocks."""
    canon = canonical_format(fmt, num_tokens)
    tokens = canon.num_blocks * fmt.block_size
    shape = (fmt.num_layers, tokens, fmt.num_heads)
    dtype = TORCH_DTYPES[fmt.dtype]
    return (torch.zeros(*shape, fmt.head_size, dtype=dtype, device=device),
            torch.zeros(*shape, fmt.head_size_v, dtype=dtype, device=device))


def decode(fmt: KVFormat, buffers: KVBuffers, block_ids: Sequence[int],
           num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read positions ``[0, num_tokens)`` of one request out of a cache in format ``fmt``."""
    device = _device(buffers)
    k, v = empty_canonical(fmt, num_tokens, device)
    canon = canonical_format(fmt, num_tokens)
    translate(plan([fmt], canon), [buffers], (_raw(k), _raw(v)), src_block_ids=block_ids,
              dst_block_ids=range(canon.num_blocks), stop=num_tokens)
    return k[:, :num_tokens], v[:, :num_tokens]


def encode(fmt: KVFormat, buffers: KVBuffers, block_ids: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
    """Write canonical ``k``/``v`` (``[L, tokens, H, D]``) into a cache in format ``fmt``."""
    num_tokens = k.shape[1]
    canon = canonical_format(fmt, num_tokens)
    k_full, v_full = empty_canonical(fmt, num_tokens, k.device)
    k_full[:, :num_tokens], v_full[:, :num_tokens] = k, v
    translate(plan([canon], fmt), [(_raw(k_full), _raw(v_full))], buffers, src_block_ids=range(canon.num_blocks),
              dst_block_ids=block_ids, stop=num_tokens)


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.view(STORAGE_DTYPES[next(n for n, d in TORCH_DTYPES.items() if d == t.dtype)])


def _device(buffers: KVBuffers) -> torch.device:
    while not isinstance(buffers, torch.Tensor):
        buffers = next(iter(buffers.values())) if isinstance(buffers, dict) else buffers[0]
    return buffers.device
