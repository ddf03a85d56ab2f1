"""The one function that moves KV bytes between formats.

Buffers are given per rank in any of the forms a KV cache exists in:

* one tensor holding the whole cache in the format's physical order (a staging buffer or the
  area a peer exports; joint storage), or a ``(K, V)`` pair of such tensors (split storage);
* a sequence (or a ``dict`` in layer order, as ``register_kv_caches`` receives it) with one
  entry per layer: a tensor for joint storage, a ``(K, V)`` pair for split storage. Each
  entry's storage offset marks where that layer starts; its shape and strides are ignored,
  so vLLM's own per-layer views (and vllm-gaudi's flattened tensors) can be passed as they are.

Destination buffers are written in place. Every copy is one ``torch.as_strided`` view per
side and one vectorised ``copy_`` (bit-exact for same-dtype pairs); layers that sit evenly
spaced in one allocation are moved by the same copy, and so are K and V where the plan fuses
them. Dtype conversions gather from a table of every source code (``fp8.Converter``), which is
bit-exact with the arithmetic reference ``fp8.remap``. Works on any torch device.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from vllm_hetero_pd.formats.format import KVFormat, LayoutError
from vllm_hetero_pd.shim import kernels
from vllm_hetero_pd.shim.fp8 import STORAGE_DTYPES, Converter, converter
from vllm_hetero_pd.shim.plan import Copy, Extent, Side, TranslationPlan, extent

KVBuffers = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | Sequence | Mapping


@dataclass(frozen=True, slots=True)
class Layers:
    """Where each layer of one K or V part starts: a flat storage view and element offsets.

    ``uniform_stride`` is the layer stride when every layer lives in one storage at evenly
    spaced offsets (then one copy moves all layers), else ``None``.
    """

    flats: tuple[torch.Tensor, ...]  # one per layer (the same object when layers share storage)
    offsets: tuple[int, ...]
    uniform_stride: int | None


def _layers(flats: list[torch.Tensor], offsets: list[int]) -> Layers:
    steps = {b - a for a, b in zip(offsets, offsets[1:])} or {0}
    same = all(f is flats[0] for f in flats)
    return Layers(tuple(flats), tuple(offsets), steps.pop() if same and len(steps) == 1 else None)


def translate(
    plan: TranslationPlan,
    src: Sequence[KVBuffers],
    dst: KVBuffers,
    *,
    src_block_ids: Sequence[int],
    dst_block_ids: Sequence[int],
    start: int = 0,
    stop: int,
) -> None:
    """Copy positions ``[start, stop)`` from the source ranks' blocks into ``dst``'s blocks.

    ``src`` holds one buffer set per format in ``plan.src_formats``. Raises ``LayoutError``
    when a buffer is too small for its format or block ids are out of range.
    """
    if len(src) != len(plan.src_formats):
        raise LayoutError(f"plan expects {len(plan.src_formats)} source buffers, got {len(src)}")
    copies = plan.copies(src_block_ids, dst_block_ids, start, stop)
    if not copies:
        return
    used = {(c.src, c.side) for c in copies}
    dst_layers = {side: layers(dst, plan.dst, side, plan.dst_extents[side]) for side in {side for _, side in used}}
    src_layers = {(i, side): layers(src[i], plan.src_formats[i], side, plan.src_extents[i, side]) for i, side in used}
    converters = {key: _converter(plan, *key) for key in used}
    for c in copies:
        _apply(c, src_layers[c.src, c.side], dst_layers[c.side], converters[c.src, c.side])


def warm_up(plan: TranslationPlan) -> None:
    """Compile the loops ``plan``'s copies run on CPU (``kernels.warm_up``) now, where a peer is
    connected, rather than in its first request."""
    for fmt in plan.src_formats:
        kernels.warm_up(STORAGE_DTYPES[fmt.dtype], STORAGE_DTYPES[plan.dst.dtype])


def allocate(fmt: KVFormat, device: torch.device | str = "cpu") -> KVBuffers:
    """Zeroed buffers holding one whole cache in ``fmt`` (a staging or export area)."""
    dtype = STORAGE_DTYPES[fmt.dtype]
    if fmt.storage == "joint":
        return torch.zeros(extent(fmt, "k").whole_cache + fmt.inner_elements("v"), dtype=dtype, device=device)
    k, v = (extent(fmt, s).whole_cache for s in ("k", "v"))
    return torch.zeros(k, dtype=dtype, device=device), torch.zeros(v, dtype=dtype, device=device)


def layers(buffers: KVBuffers, fmt: KVFormat, side: Side, ext: Extent) -> Layers:
    """Resolve one rank's buffers into per-layer (storage, offset) pairs for K or V (``ext``:
    ``extent(fmt, side)``, which the plan holds)."""
    dtype = STORAGE_DTYPES[fmt.dtype]
    if isinstance(buffers, Mapping):
        if missing := [n for n in fmt.layer_names if n not in buffers]:
            raise LayoutError(f"{fmt.name or 'format'}: kv_caches lacks layers {missing[:3]} named in the format")
        buffers = [buffers[n] for n in fmt.layer_names] if fmt.layer_names else list(buffers.values())
    part = 0 if side == "k" or fmt.storage == "joint" else 1
    one_tensor_pair = (fmt.storage == "split" and isinstance(buffers, tuple) and len(buffers) == 2
                       and isinstance(buffers[0], torch.Tensor))
    if isinstance(buffers, torch.Tensor) or one_tensor_pair:
        whole = buffers if isinstance(buffers, torch.Tensor) else buffers[part]
        flat, base = _flat(whole, dtype, ext.whole_cache, fmt)
        return _layers([flat] * fmt.num_layers, [base + l * ext.layer_stride for l in range(fmt.num_layers)])
    if len(buffers) != fmt.num_layers:
        raise LayoutError(f"{fmt.name or 'format'}: got {len(buffers)} layer buffers for {fmt.num_layers} layers")
    flats, offsets, storages = [], [], {}
    span = ext.per_layer
    for entry in buffers:
        tensor = entry[part] if fmt.storage == "split" else entry
        if not isinstance(tensor, torch.Tensor):
            raise LayoutError(f"{fmt.name or 'format'}: {fmt.storage} storage wants per-layer "
                              f"{'(K, V) pairs' if fmt.storage == 'split' else 'tensors'}, got {type(entry).__name__}")
        key = (tensor.untyped_storage().data_ptr(), tensor.device)
        flat, offset = _flat(tensor, dtype, span, fmt, storages.get(key))
        storages[key] = flat
        flats.append(flat)
        offsets.append(offset)
    return _layers(flats, offsets)


def _flat(t: torch.Tensor, dtype: torch.dtype, span: int, fmt: KVFormat, flat: torch.Tensor | None = None):
    """A 1-D ``dtype`` view of ``t``'s whole storage and ``t``'s start within it."""
    storage = t.untyped_storage()
    itemsize = torch.empty(0, dtype=dtype).element_size()
    start_bytes = t.storage_offset() * t.element_size()
    if start_bytes % itemsize:
        raise LayoutError(f"{fmt.name or 'format'}: buffer offset {start_bytes} B is not a multiple of {itemsize} B")
    if flat is None:
        flat = torch.empty(0, dtype=dtype, device=t.device)
        flat.set_(storage, 0, (storage.nbytes() // itemsize,), (1,))
    offset = start_bytes // itemsize
    extent_bytes = (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size() if t.numel() else 0
    if span * itemsize > extent_bytes:
        raise LayoutError(
            f"{fmt.name or 'format'}: buffer spans {extent_bytes} B, the format addresses {span * itemsize} B; "
            "check num_blocks/num_layers/heads (or pass the whole tensor, not a slice)"
        )
    return flat, offset


def _converter(plan: TranslationPlan, src: int, side: Side) -> Converter | None:
    """How ``src``'s ``side`` elements become the destination's (``None``: byte copies)."""
    conversion = plan.conversion[side]
    if conversion == "copy":
        return None
    src_fmt, dst_fmt = plan.src_formats[src], plan.dst
    if conversion == "convert":
        scale_of = "k_scale" if side == "k" else "v_scale"
        scales = [(getattr(src_fmt, scale_of)(l), getattr(dst_fmt, scale_of)(l)) for l in range(dst_fmt.num_layers)]
    else:  # fn <-> fnuz with scales exactly 2x apart: the bytes alone carry the value
        scales = [(1.0, 1.0)] * dst_fmt.num_layers
    return converter(conversion, src_fmt.dtype, dst_fmt.dtype, scales)


def _apply(c: Copy, src: Layers, dst: Layers, convert: Converter | None) -> None:
    """Make copy ``c`` at each of its places: all of them in one compiled call per layer group
    on CPU, else one torch copy (or ``convert``) each."""
    s_step, d_step = src.uniform_stride, dst.uniform_stride
    if s_step is not None and d_step is not None:
        layer_groups = [(range(len(src.offsets)), s_step, d_step)]
    else:
        layer_groups = [(range(l, l + 1), 0, 0) for l in range(len(src.offsets))]
    for ls, s_step, d_step in layer_groups:
        l0 = ls.start
        sizes, s_strides, d_strides = (len(ls), *c.sizes), (s_step, *c.src_strides), (d_step, *c.dst_strides)
        s_offsets = [src.offsets[l0] + o for o in c.src_offsets]
        d_offsets = [dst.offsets[l0] + o for o in c.dst_offsets]
        if kernels.fits(src.flats[l0], dst.flats[l0]) and (
                _compiled_copy(sizes, s_strides, d_strides) if convert is None else convert.tabulated):
            conversion = convert.conversion if convert else "copy"
            table = None if conversion in kernels.OPS else convert.table("cpu")  # others look codes up
            bases = None if table is None else convert.layer_bases()[l0 : l0 + len(ls)]
            kernels.convert(conversion, table, bases, src.flats[l0], dst.flats[l0], s_offsets, d_offsets,
                            sizes, s_strides, d_strides)
            continue
        for s_offset, d_offset in zip(s_offsets, d_offsets):
            s_view = src.flats[l0].as_strided(sizes, s_strides, s_offset)
            d_view = dst.flats[l0].as_strided(sizes, d_strides, d_offset)
            if convert is None:
                _copy(s_view, d_view)
            else:
                convert(s_view, d_view, l0)


COMPILED_RUN = 1024  # contiguous elements per run from which the compiled loop out-copies torch
COMPILED_SMALL = 2**18  # elements per copy below which torch's cost per call outweighs its faster loops


def _compiled_copy(sizes: tuple[int, ...], s_strides: tuple[int, ...], d_strides: tuple[int, ...]) -> bool:
    """Whether copies of this shape go faster through ``kernels`` (all of a request's in one
    call) than one torch copy each: when they are small, or their runs are long and contiguous.
    Large transposes and short runs keep torch's tiled copies (``bench shim``, pairs 2-7)."""
    shape, s_st, d_st = kernels.merged(sizes, s_strides, d_strides)
    return math.prod(sizes) < COMPILED_SMALL or (s_st[-1] == d_st[-1] == 1 and shape[-1] >= COMPILED_RUN)


TILE = 16  # destination elements swept before the source's contiguous dim, per copy in a transpose
TILE_MIN_ELEMENTS = 2**15  # elements per tile below which one copy is faster (Python's cost per call)


def _copy(src: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst.copy_(src)``, one tile (see ``tiles``) at a time."""
    cut = tiles(src, dst)
    if len(cut) == 1:
        dst.copy_(src)
        return
    for index in cut:
        dst[index].copy_(src[index])


def tiles(src: torch.Tensor, dst: torch.Tensor) -> list[tuple[slice, ...]]:
    """Index tuples that cut a transpose (CPU_ATTN's ``[D][N]`` K) into separate copies.

    torch walks a copy in ``dst``'s memory order. In a transpose, every element it writes
    before reaching ``src``'s contiguous dim reads another ``src`` cache line, which the next
    step along that dim reuses. When ``src`` strides by a power of two (tokens ``H * 2D``
    apart in LBNHC, ``H * D`` in Gaudi's NHD) those lines share L1 sets and evict each other
    once there are more than a few; copies of at most ``TILE`` such elements keep them
    resident (single-thread micro-timings: ~1.7-2x into CPU_ATTN from LBNHC or Gaudi blocks,
    ~4x for a 32-layer request into vLLM's per-layer views, no loss from LBHNC). Off CPU,
    where both contiguous dims agree, and for small copies: one tile, the whole copy.
    """
    whole = [(slice(None),) * dst.dim()]
    if src.device.type != "cpu" or dst.numel() < 8 * TILE_MIN_ELEMENTS:  # even the checks cost more than tiles save
        return whole
    a, b = _unit_dim(dst), _unit_dim(src)
    if a is None or b is None or a == b:
        return whole
    before_b = sorted((c for c in range(dst.dim()) if dst.stride(c) < dst.stride(b) and dst.shape[c] > 1),
                      key=dst.stride)
    pieces: list[list[slice]] = [[slice(None)] for _ in range(dst.dim())]
    inner = 1
    for c in before_b:  # innermost first: keep whole dims while they fit in a tile, then cut
        n = dst.shape[c]
        step = n if inner * n <= TILE else max(1, TILE // inner)
        pieces[c] = [slice(i, i + step) for i in range(0, n, step)]
        inner *= step
    cut = list(itertools.product(*pieces))
    return whole if dst.numel() < TILE_MIN_ELEMENTS * len(cut) else cut  # small tiles cost more than they save


def _unit_dim(t: torch.Tensor) -> int | None:
    """The dim along which ``t``'s elements are adjacent in memory (``None`` if none is longer than 1)."""
    return next((i for i, (n, st) in enumerate(zip(t.shape, t.stride())) if st == 1 and n > 1), None)
