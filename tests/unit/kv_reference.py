"""Reference KV caches built the way each backend's source builds them, with plain torch ops.

Independent of the shim's stride arithmetic: each builder follows the shapes, views and
permutations in the cited source, so a test comparing it with ``shim.encode`` pins a preset
to its backend. Canonical K/V are ``[L, T, H_local, D]``; block ``block_ids[i]`` holds
positions ``[i*bs, (i+1)*bs)``.
"""

from __future__ import annotations

import torch
from vllm.v1.kv_cache_layout import KVCacheLayout  # the real enum, vLLM 0.32.0

from vllm_hetero_pd.formats import KVFormat


def _slots(fmt: KVFormat, block_ids, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.arange(num_tokens)
    return torch.tensor(list(block_ids), dtype=torch.long)[pos // fmt.block_size], pos % fmt.block_size


def era_c(fmt: KVFormat, layout: str, k: torch.Tensor, v: torch.Tensor, block_ids) -> torch.Tensor:
    """vllm/v1/worker/utils.py::create_kv_cache_views: logical [L, B, H, N, C] in the enum's
    physical order; FLASH_ATTN reads ``kv.transpose(1, 2).split(head_size, -1)`` (K then V)."""
    L, T, H, D = k.shape
    logical = torch.zeros(L, fmt.num_blocks, H, fmt.block_size, 2 * D, dtype=k.dtype)
    blk, tok = _slots(fmt, block_ids, T)
    logical[:, blk, :, tok] = torch.cat([k, v], -1).transpose(0, 1)
    order = KVCacheLayout[layout].value
    return logical.permute(order).contiguous().view(-1)


def era_c_mla(fmt: KVFormat, layout: str, k: torch.Tensor, block_ids) -> torch.Tensor:
    """MLA: logical [L, B, 1, N, latent] in the enum's physical order."""
    L, T, _, C = k.shape
    logical = torch.zeros(L, fmt.num_blocks, 1, fmt.block_size, C, dtype=k.dtype)
    blk, tok = _slots(fmt, block_ids, T)
    logical[:, blk, :, tok] = k.transpose(0, 1)
    return logical.permute(KVCacheLayout[layout].value).contiguous().view(-1)


def era_b(fmt: KVFormat, order: str, k, v, block_ids) -> torch.Tensor:
    """Era B (vLLM 0.26-0.28 flash_attn.py): logical (NB, H, BS, 2D); stride order NHD = (0, 2, 1, 3)."""
    L, T, H, D = k.shape
    logical = torch.zeros(L, fmt.num_blocks, H, fmt.block_size, 2 * D, dtype=k.dtype)
    blk, tok = _slots(fmt, block_ids, T)
    logical[:, blk, :, tok] = torch.cat([k, v], -1).transpose(0, 1)
    return (logical.permute(0, 1, 3, 2, 4) if order == "NHD" else logical).contiguous().view(-1)


def era_a2(fmt: KVFormat, order: str, k, v, block_ids) -> torch.Tensor:
    """Era A2 (vLLM 0.24-0.25): (NB, 2, BS, H, D); HND stride order keeps H before BS."""
    L, T, H, D = k.shape
    cache = torch.zeros(L, fmt.num_blocks, 2, fmt.block_size, H, D, dtype=k.dtype)
    blk, tok = _slots(fmt, block_ids, T)
    cache[:, blk, 0, tok] = k  # adjacent advanced indices keep their place: [L, T, H, D]
    cache[:, blk, 1, tok] = v
    return (cache.permute(0, 1, 2, 4, 3, 5) if order == "HND" else cache).contiguous().view(-1)


def era_a1(fmt: KVFormat, order: str, k, v, block_ids) -> torch.Tensor:
    """Era A1 FLASH_ATTN (vLLM <= 0.22): (2, NB, BS, H, D) per layer."""
    L, T, H, D = k.shape
    cache = torch.zeros(L, 2, fmt.num_blocks, fmt.block_size, H, D, dtype=k.dtype)
    blk, tok = _slots(fmt, block_ids, T)
    cache[:, 0, blk, tok] = k
    cache[:, 1, blk, tok] = v
    return (cache.permute(0, 1, 2, 4, 3, 5) if order == "HND" else cache).contiguous().view(-1)


def rocm_attn(fmt: KVFormat, k, v, block_ids) -> torch.Tensor:
    """ROCM_ATTN: [L][2][B][N*H*D] viewed per side by paged_attn.py::split_kv_cache as
    K (B, H, D/x, N, x) and V (B, H, D, N), x = 16 // element size."""
    L, T, H, D = k.shape
    x = 16 // k.element_size()
    key = torch.zeros(L, fmt.num_blocks, H, D // x, fmt.block_size, x, dtype=k.dtype)
    value = torch.zeros(L, fmt.num_blocks, H, D, fmt.block_size, dtype=k.dtype)
    blk, tok = _slots(fmt, block_ids, T)
    key.permute(0, 1, 4, 2, 3, 5)[:, blk, tok] = k.unflatten(-1, (D // x, x))
    value.permute(0, 1, 4, 2, 3)[:, blk, tok] = v
    return torch.stack([key.reshape(L, -1), value.reshape(L, -1)], 1).view(-1)


def gaudi(fmt: KVFormat, k, v, block_ids) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """vllm-gaudi: per layer key_cache and value_cache of shape ((NB + 1) * BS, H, D); slot = block*BS + t."""
    L, T, H, D = k.shape
    blk, tok = _slots(fmt, block_ids, T)
    slot = blk * fmt.block_size + tok
    layers = []
    for l in range(L):
        key = torch.zeros((fmt.num_blocks + 1) * fmt.block_size, H, D, dtype=k.dtype)
        value = torch.zeros((fmt.num_blocks + 1) * fmt.block_size, H, v.shape[-1], dtype=k.dtype)
        key[slot], value[slot] = k[l], v[l]
        layers.append((key, value))
    return layers


def cpu_amx(fmt: KVFormat, k, v, block_ids) -> torch.Tensor:
    """csrc/cpu/cpu_attn_amx.hpp::reshape_and_cache (bf16), index arithmetic as written there.

    Cache [NB, H, 2*BS, D] chunked into K and V pages of BS*D elements each. K: token t,
    4-byte quadword j (dims 2j, 2j+1) goes to int32 slot (t // 16) * 16 * (D/2) + j * 16 + t % 16.
    V: element d of token t goes to (d // 16) * BS * 16 + (t // 2) * 2 * 16 + (d % 16) * 2 + t % 2.
    """
    L, T, H, D = k.shape
    bs = fmt.block_size
    cache = torch.zeros(L, fmt.num_blocks, H, 2, bs * D, dtype=k.dtype)
    blk, tok = _slots(fmt, block_ids, T)
    t = tok.view(T, 1)
    j = torch.arange(D // 2).view(1, D // 2)
    k_slot = (t // 16) * 16 * (D // 2) + j * 16 + t % 16  # [T, D/2] int32 slots
    k_pairs = k.contiguous().view(torch.int32)  # [L, T, H, D/2]
    key_pages = cache[:, :, :, 0].view(torch.int32)  # [L, NB, H, BS*D/2]
    d = torch.arange(D).view(1, D)
    v_slot = (d // 16) * bs * 16 + (t // 2) * 32 + (d % 16) * 2 + t % 2  # [T, D]
    for h in range(H):
        for i in range(T):
            key_pages[:, blk[i], h, k_slot[i]] = k_pairs[:, i, h]
            cache[:, blk[i], h, 1, v_slot[i]] = v[:, i, h]
    return cache.view(-1)


def build(fmt: KVFormat, k, v, block_ids):
    """Dispatch on the preset name; returns buffers in the form ``translate`` accepts."""
    family, _, rest = fmt.name.partition("/")
    parts = fmt.name.split("/")
    if family == "mla":
        return era_c_mla(fmt, parts[-1], k, block_ids)
    if family == "hpu":
        return gaudi(fmt, k, v, block_ids)
    if fmt.name == "cpu/cpu_attn/amx":
        return cpu_amx(fmt, k, v, block_ids)
    if parts[-1] == "rocm_attn":
        return rocm_attn(fmt, k, v, block_ids)
    era, order = parts[-2], parts[-1]
    return {"C": era_c, "B": era_b, "A2": era_a2, "A1": era_a1}[era](fmt, order, k, v, block_ids)
