"""CPU_ATTN's block interior, derived by probing a packing function rather than assumed.

vLLM's CPU attention views each ``[N, 2D]`` (block, head) page as ``[2N, D]``, hands the
first half to ``cpu_attn_reshape_and_cache`` as the key cache and the second half as the
value cache, and the kernel writes each half in an ISA-specific packed order. There is no
unpack op upstream. ``derive_inner`` writes known bit patterns through a packing function,
records where each (token, dim) element lands, and names the layout in ``KVFormat``'s axis
language.

This module is pure torch: the packing function is a parameter. ``connector/cpu_attn.py``
passes vLLM's real op (the only part that needs vLLM); unit tests pass reference packers.
On an AVX2 machine (isa ``vec`` / ``vec16``) every dtype, block size and head size gives
K transposed ``[D][N]`` then V ``[N][D]`` (preset ``cpu/cpu_attn/vec``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from vllm_hetero_pd.formats.format import LayoutError

Pack = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str], None]
"""``pack(key, value, kv_cache, slots, isa)``: write ``[T, H, D]`` K/V into a ``[NB, H, N, 2D]``
cache at ``slots`` the way CPU_ATTN's ``isa`` kernel does (``cpu_attn_reshape_and_cache``)."""

_SPLITS = (1, 2, 4, 8, 16, 32)


def observe(pack: Pack, isa: str, dtype: torch.dtype, block_size: int,
            head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Element offsets ``[N, D]`` of K and of V inside one ``(block, head)`` page.

    Two passes write the low and high part of each element's index as distinct, finite bit
    patterns (so any element size works), through a two-block, two-head cache.
    """
    int_dtype = {2: torch.int16, 4: torch.int32}[torch.empty(0, dtype=dtype).element_size()]
    heads = 2
    n = block_size * heads * head_size  # one full block (block 1 of 2) of K, and of V
    index = torch.arange(2 * n)
    parts = []
    for code in (index % 4096, index // 4096):
        cache = torch.full((2, heads, block_size, 2 * head_size), -1, dtype=int_dtype)
        values = (code + 0x100).to(int_dtype).view(dtype).view(2, block_size, heads, head_size)
        pack(values[0], values[1], cache.view(dtype), torch.arange(block_size) + block_size, isa)
        parts.append(cache.view(-1).to(torch.int64) - 0x100)
    written = parts[0] >= 0
    if int(written.sum()) != 2 * n:
        raise LayoutError(f"cpu_attn_reshape_and_cache({isa}) wrote {int(written.sum())} of {2 * n} elements")
    where = torch.empty(2 * n, dtype=torch.int64)
    where[parts[0][written] + 4096 * parts[1][written]] = torch.nonzero(written).squeeze(1)
    where = where.view(2, block_size, heads, head_size)  # [K/V, token, head, dim]
    page = block_size * 2 * head_size
    head0 = where[:, :, 0, :] - heads * page  # block 1, head 0
    if not torch.equal(where[:, :, 1, :] - head0, torch.full_like(head0, heads * page + page)):
        raise LayoutError(f"isa {isa}: heads are not whole pages of {page} elements")
    return head0[0], head0[1]


def derive_inner(pack: Pack, isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> tuple[str, str]:
    """``(k_inner, v_inner)`` for ``outer="LBH"``, found by matching the observed offsets."""
    k_off, v_off = observe(pack, isa, dtype, block_size, head_size)
    k_inner = _match(k_off, 0, block_size, head_size)
    v_inner = _match(v_off, block_size * head_size, block_size, head_size)
    if k_inner is None or v_inner is None:
        raise LayoutError(
            f"CPU_ATTN isa {isa!r} ({dtype}, block {block_size}, head {head_size}) packs K/V in an order "
            "no axis string with up to one split per axis describes; extend shim/cpu_attn.py::_match"
        )
    return k_inner, v_inner


def _match(offsets: torch.Tensor, base: int, n: int, d: int) -> str | None:
    """The axis string (N and D with at most one inner split each) producing ``offsets``."""
    t = torch.arange(n).view(n, 1)
    e = torch.arange(d).view(1, d)
    for sn, sd in itertools.product(_SPLITS, _SPLITS):
        if n % sn or d % sd:
            continue
        dims = {"N": (t // sn, n // sn), "D": (e // sd, d // sd)}
        if sn > 1:
            dims[f"N{sn}"] = (t % sn, sn)
        if sd > 1:
            dims[f"D{sd}"] = (e % sd, sd)
        for order in itertools.permutations(dims):
            expected, stride = torch.zeros(n, d, dtype=torch.int64), 1
            for name in reversed(order):
                index, size = dims[name]
                expected = expected + index * stride
                stride *= size
            if torch.equal(offsets, expected + base):
                return "".join(order)
    return None
