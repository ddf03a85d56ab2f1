"""Compiled CPU loops for the shim: all places of one copy shape in one parallel pass.

Why: on CPU, ``fp8.Converter``'s torch path converts through an int32 index tensor and an
``index_select`` (three whole-tensor passes, 4-byte intermediates), about 0.07x a plain copy, and
a request of small blocks pays Python's cost per torch call once per block. One numba loop takes
every place of a ``plan.Copy``, reads each source element once and writes its converted element
once. The e4m3fn <-> e4m3fnuz remaps are computed (byte selects that LLVM vectorises), so they run
near copy speed; every other conversion looks its code up in ``fp8.code_table``. numba comes with
vLLM; where it does not import, ``available()`` is False and the torch path serves (it is also the
path on every other device).

The loops walk a copy as *runs*: dims are merged where both sides are contiguous across them, the
innermost merged dim is one run, and threads share the runs. Runs contiguous on both sides take a
loop the compiler vectorises (``_runs``); a transpose, where the source's contiguous dim is
another one, is copied in tiles that keep the source's lines cached (``_panels``). Each element
type pair compiles once per machine (a few seconds), then loads from numba's on-disk cache (~0.3
s): ``warm_up`` does that when the connector starts or a peer connects, not on a request's path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vllm_hetero_pd.formats.format import LayoutError

try:
    import numba
except ImportError:  # the torch path serves; the loops below stay plain (never called) Python
    numba = None


def _njit(**options):
    """numba's ``njit`` where numba imports. Module-level functions, so that numba's on-disk
    cache holds them (closures are recompiled in every process); nothing compiles at import."""
    return numba.njit(**options) if numba is not None else (lambda f: f)


# What each element becomes: a copy, a lookup in the table's row for its layer, or a computed remap.
COPY, TABLE, FN_TO_FNUZ, FNUZ_TO_FN = 0, 1, 2, 3
OPS = {"copy": COPY, "fn_to_fnuz": FN_TO_FNUZ, "fnuz_to_fn": FNUZ_TO_FN}  # others: TABLE
PANEL_TILE = (32, 16)  # a transpose's tile: source-contiguous elements (a 64 B line of bf16) x destination ones


def available() -> bool:
    return numba is not None


def fits(src: torch.Tensor, dst: torch.Tensor) -> bool:
    """Whether ``convert`` can take this pair: CPU tensors, numba present."""
    return available() and src.device.type == "cpu" and dst.device.type == "cpu"


@_njit(inline="always")
def _fn_to_fnuz(c):  # pragma: no cover - compiled; the same byte rules as fp8.fn_to_fnuz_bytes
    m = c & 0x7F
    return np.uint8(0x80) if m == 0x7F else (np.uint8(0) if m == 0 else c)


@_njit(inline="always")
def _fnuz_to_fn(c):  # pragma: no cover - compiled; the same byte rules as fp8.fnuz_to_fn_bytes
    if c == 0x80:
        return np.uint8(0x7F)
    return c - np.uint8(1) if (c & 0x7F) == 0x7F else c


@_njit(inline="always")
def _run(op, table, base, src, dst):  # pragma: no cover - compiled
    if op == COPY:
        for j in range(src.size):
            dst[j] = src[j]
    elif op == FN_TO_FNUZ:
        for j in range(src.size):
            dst[j] = _fn_to_fnuz(src[j])
    elif op == FNUZ_TO_FN:
        for j in range(src.size):
            dst[j] = _fnuz_to_fn(src[j])
    else:
        for j in range(src.size):
            dst[j] = table[np.uint64(base + np.int64(src[j]))]  # unsigned: no wrap-around test


@_njit(inline="always")
def _element(op, table, base, c):  # pragma: no cover - compiled; one element of ``_run``'s loops
    if op == COPY:
        return c
    if op == FN_TO_FNUZ:
        return _fn_to_fnuz(c)
    if op == FNUZ_TO_FN:
        return _fnuz_to_fn(c)
    return table[np.uint64(base + np.int64(c))]


@_njit(inline="always")
def _place(r, per_copy, outer, shape, s_strides, d_strides, s_offsets, d_offsets):  # pragma: no cover
    """Where the ``r``-th run starts on each side, and its layer (the index along dim 0)."""
    copy, rest = divmod(np.int64(r), per_copy)
    s0, d0, layer = s_offsets[copy], d_offsets[copy], 0
    for k in range(outer - 1, -1, -1):
        i = rest % shape[k]
        rest //= shape[k]
        s0 += i * s_strides[k]
        d0 += i * d_strides[k]
        layer = i  # the last one taken is dim 0's
    return s0, d0, layer


@_njit(parallel=True, nogil=True, cache=True)
def _runs(op, table, bases, src, dst, s_offsets, d_offsets, geometry):  # pragma: no cover - compiled
    shape, s_strides, d_strides = geometry[0], geometry[1], geometry[2]  # merged dims, outer to inner
    outer = shape.size - 1
    n, s_step, d_step = shape[outer], s_strides[outer], d_strides[outer]
    per_copy = 1
    for k in range(outer):
        per_copy *= shape[k]
    for r in numba.prange(s_offsets.size * per_copy):
        s0, d0, layer = _place(r, per_copy, outer, shape, s_strides, d_strides, s_offsets, d_offsets)
        if s_step == 1 and d_step == 1:  # unit-stride slices: the loop the compiler vectorises
            _run(op, table, bases[layer], src[s0:s0 + n], dst[d0:d0 + n])
        else:
            _run(op, table, bases[layer], src[s0:s0 + (n - 1) * s_step + 1:s_step],
                dst[d0:d0 + (n - 1) * d_step + 1:d_step])


@_njit(parallel=True, nogil=True, cache=True)
def _panels(op, table, bases, src, dst, s_offsets, d_offsets, geometry):  # pragma: no cover - compiled
    """Transposes: the last two merged dims are contiguous on the source (-2) and the
    destination (-1); each such panel is copied in tiles whose source lines stay cached."""
    shape, s_strides, d_strides = geometry[0], geometry[1], geometry[2]
    outer = shape.size - 2
    m, n, d_a, s_b = shape[outer], shape[outer + 1], d_strides[outer], s_strides[outer + 1]
    per_copy = 1
    for k in range(outer):
        per_copy *= shape[k]
    for r in numba.prange(s_offsets.size * per_copy):
        s0, d0, layer = _place(r, per_copy, outer, shape, s_strides, d_strides, s_offsets, d_offsets)
        base = bases[layer]
        for a0 in range(0, m, PANEL_TILE[0]):
            for b0 in range(0, n, PANEL_TILE[1]):
                for a in range(a0, min(a0 + PANEL_TILE[0], m)):
                    d, s = d0 + a * d_a, s0 + a
                    for b in range(b0, min(b0 + PANEL_TILE[1], n)):
                        dst[np.uint64(d + b)] = _element(op, table, base, src[np.uint64(s + b * s_b)])


def merged(sizes: Sequence[int], s_strides: Sequence[int], d_strides: Sequence[int]) -> tuple[list[int], ...]:
    """Sizes and strides with dims in the destination's memory order (dim 0, the layers, stays
    first) and neighbours merged where both sides are contiguous across them, so the last dim
    is as long a run as the pair allows."""
    order = sorted(range(1, len(sizes)), key=lambda i: -d_strides[i])
    shape, s_st, d_st = [sizes[0]], [s_strides[0]], [d_strides[0]]
    rest = [(sizes[i], s_strides[i], d_strides[i]) for i in order if sizes[i] != 1]
    for size, s, d in rest or [(1, 1, 1)]:
        if len(shape) > 1 and s_st[-1] == size * s and d_st[-1] == size * d:
            shape[-1], s_st[-1], d_st[-1] = shape[-1] * size, s, d
        else:
            shape.append(size), s_st.append(s), d_st.append(d)
    return shape, s_st, d_st


def _reach(offsets: Sequence[int], shape: list[int], strides: list[int], flat: torch.Tensor, side: str) -> None:
    """Refuse copies that would touch elements outside ``flat`` (compiled loops check no bounds)."""
    span = sum((n - 1) * st for n, st in zip(shape, strides))
    if min(strides) < 0 or min(offsets) < 0 or max(offsets) + span >= flat.numel():
        raise LayoutError(f"kernels.convert: a {side} copy reaches outside its {flat.numel()}-element buffer")


def convert(conversion: str, table: torch.Tensor | None, layer_bases: Sequence[int] | None, src: torch.Tensor,
            dst: torch.Tensor, src_offsets: Sequence[int], dst_offsets: Sequence[int], sizes: Sequence[int],
            src_strides: Sequence[int], dst_strides: Sequence[int]) -> None:
    """Run one strided copy (``sizes`` and strides, dim 0 over layers) at each pair of offsets,
    from the 1-D CPU tensor ``src`` into ``dst``, converting each element, in one parallel call.

    ``conversion`` is a plan's: "copy" and e4m3fn <-> e4m3fnuz are computed; any other looks
    each element up as ``table[layer_bases[layer] + element]`` (``table`` 1-D in ``dst``'s
    element type; both ``None`` for the computed ones). numba's threads follow torch's thread
    count. Small requests make one call per copy, so this keeps its own cost to a few numpy
    arrays.
    """
    if not src_offsets or 0 in sizes:
        return
    shape, s_st, d_st = merged(sizes, src_strides, dst_strides)
    _reach(src_offsets, shape, s_st, src, "source")
    _reach(dst_offsets, shape, d_st, dst, "destination")
    kernel = _runs
    if s_st[-1] != 1 and d_st[-1] == 1 and 1 in s_st[1:-1]:  # a transpose: the source's unit dim goes next-to-last
        k = s_st.index(1, 1)
        shape, s_st, d_st = ([*g[:k], *g[k + 1 : -1], g[k], g[-1]] for g in (shape, s_st, d_st))
        kernel = _panels
    dst_np = dst.numpy()
    lut = np.zeros(1, dtype=dst_np.dtype) if table is None else table.numpy()
    bases = np.zeros(sizes[0], dtype=np.int64) if table is None else np.asarray(layer_bases, dtype=np.int64)
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    kernel(OPS.get(conversion, TABLE), lut, bases, src.numpy(), dst_np, np.asarray(src_offsets, dtype=np.int64),
           np.asarray(dst_offsets, dtype=np.int64), np.array((shape, s_st, d_st), dtype=np.int64))


def warm_up(src_dtype: torch.dtype, dst_dtype: torch.dtype) -> None:
    """Compile (or load from numba's on-disk cache) both loops for these storage element types
    (every conversion between them: one signature each), so that a peer's first request does
    not pay it. A no-op without numba."""
    if available():
        src, dst = torch.zeros(4, dtype=src_dtype), torch.zeros(4, dtype=dst_dtype)
        convert("copy", None, None, src, dst, [0], [0], [1, 4], [4, 1], [4, 1])  # runs
        convert("copy", None, None, src, dst, [0], [0], [1, 2, 2], [4, 1, 2], [4, 2, 1])  # panels
