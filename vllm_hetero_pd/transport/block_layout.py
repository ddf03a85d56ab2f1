"""Where one KV block's bytes lie, so that NIXL can move whole blocks as contiguous ranges.

A block of one layer must be a dense byte range (per buffer part: the joint K‖V buffer, or
each of the separate K and V buffers). Every layout vLLM's attention backends and vllm-gaudi
use meets this; ROCM_ATTN's x-packed key does not (its K and V halves of a block are apart),
and such formats are refused here with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vllm_hetero_pd.formats.format import KVFormat, LayoutError


@dataclass(frozen=True)
class BlockLayout:
    """Per buffer part: bytes between consecutive blocks and bytes of one block of one layer."""

    block_stride: tuple[int, ...]
    block_len: tuple[int, ...]
    layer_stride: tuple[int, ...]  # bytes between layers inside one whole-cache buffer


def block_layout(fmt: KVFormat) -> BlockLayout:
    """The byte geometry of one block per buffer part; raises ``LayoutError`` if NIXL cannot read it per block."""
    sides = [("k", "v")] if fmt.storage == "joint" else [("k",), ("v",)] if fmt.head_size_v else [("k",)]
    strides, lens, layers = [], [], []
    for part in sides:
        factors = {s: fmt.factors(s) for s in part}
        block = factors[part[0]]["B"]
        if len(block) != 1:
            raise LayoutError(f"{fmt.name or 'format'}: blocks are split across the layout ({fmt.outer}+"
                              f"{fmt.k_inner}); NIXL cannot read a block as one range")
        elements = sum(fmt.num_heads * fmt.block_size * fmt.extent("D", s) for s in part)
        last = max((fmt.v_offset() if s == "v" else 0)
                   + sum((n - 1) * st for a in "HND" for n, st in factors[s][a]) for s in part)
        if last + 1 != elements or block[0][1] < elements:
            raise LayoutError(f"{fmt.name or 'format'}: a block of one layer is not one dense range in "
                              f"{fmt.outer}+{fmt.k_inner}/{fmt.v_inner}; NIXL cannot read it per block")
        strides.append(block[0][1] * fmt.element_bytes)
        lens.append(elements * fmt.element_bytes)
        layers.append(factors[part[0]]["L"][0][1] * fmt.element_bytes)
    return BlockLayout(tuple(strides), tuple(lens), tuple(layers))


def whole_cache_layer_addrs(fmt: KVFormat, part_bases: list[int]) -> list[list[int]]:
    """Layer start addresses of a buffer allocated as one whole cache (export area, staging)."""
    layout = block_layout(fmt)
    return [[base + l * layout.layer_stride[p] for l in range(fmt.num_layers)] for p, base in enumerate(part_bases)]


def block_descs(layout: BlockLayout, layer_addrs: list[list[int]], block_ids: list[int]) -> np.ndarray:
    """``(address, length)`` rows for ``block_ids`` in every part and layer, in (part, layer, block) order."""
    ids = np.asarray(block_ids, dtype=np.uint64)
    rows = []
    for p, addrs in enumerate(layer_addrs):
        for addr in addrs:
            rows.append(np.stack([addr + ids * layout.block_stride[p],
                                  np.full_like(ids, layout.block_len[p])], axis=1))
    return np.concatenate(rows) if rows else np.zeros((0, 2), dtype=np.uint64)


def block_indices(num_rows: int, num_blocks: int, block_ids: list[int]) -> np.ndarray:
    """Where ``block_descs(..., block_ids)``'s rows sit, in order, among the ``num_rows`` rows of
    ``block_descs(..., range(num_blocks))``: how a READ picks a request's blocks from a prepared list."""
    if num_rows % num_blocks:
        raise ValueError(f"{num_rows} prepared rows are not a whole number of {num_blocks}-block lists")
    ids = np.asarray(block_ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= num_blocks):
        raise ValueError(f"block ids {block_ids[:8]} are outside 0..{num_blocks - 1}")
    starts = np.arange(num_rows // num_blocks, dtype=np.int64)[:, None] * num_blocks
    return (starts + ids[None, :]).reshape(-1)
