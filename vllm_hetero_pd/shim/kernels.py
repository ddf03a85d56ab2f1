"""Compiled CPU loops for the shim: element conversions in one pass over contiguous runs.

Why: on CPU, ``fp8.Converter``'s torch path converts through an int32 index tensor and an
``index_select`` (three whole-tensor passes, 4-byte intermediates), about 0.07x a plain copy. One
numba loop reads each source element once and writes its converted element once. The e4m3fn <->
e4m3fnuz remaps are computed (a few byte selects that LLVM vectorises), so they run near copy
speed; every other conversion looks its code up in ``fp8.code_table``. numba comes with vLLM;
where it does not import, ``available()`` is False and the torch path serves (it is also the path
on every other device).

The loop walks a view pair as *runs*: the dims are merged where both sides are contiguous across
them, the innermost merged dim is one run, and threads share the runs. Runs that are contiguous on
both sides take a loop the compiler vectorises; others (a transpose) a strided one. Each element
type compiles once per process (about a second), or loads from numba's on-disk cache: ``warm_up``
does that at connect time, not on a request's path.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from vllm_hetero_pd.formats.format import LayoutError

try:
    import numba
except ImportError:  # the torch path serves
    numba = None

# What each element becomes: a copy, a lookup in the table's row for its layer, or a computed remap.
COPY, TABLE, FN_TO_FNUZ, FNUZ_TO_FN = 0, 1, 2, 3
OPS = {"copy": COPY, "fn_to_fnuz": FN_TO_FNUZ, "fnuz_to_fn": FNUZ_TO_FN}  # others: TABLE


def available() -> bool:
    return numba is not None


def fits(src: torch.Tensor, dst: torch.Tensor) -> bool:
    """Whether ``convert`` can take this pair: CPU tensors, numba present."""
    return available() and src.device.type == "cpu" and dst.device.type == "cpu"


@functools.cache
def _kernel():
    """The compiled loop (built on first use, so importing this module compiles nothing)."""

    @numba.njit(inline="always")
    def fn_to_fnuz(c):  # pragma: no cover - compiled; the same byte rules as fp8.fn_to_fnuz_bytes
        m = c & 0x7F
        return np.uint8(0x80) if m == 0x7F else (np.uint8(0) if m == 0 else c)

    @numba.njit(inline="always")
    def fnuz_to_fn(c):  # pragma: no cover - compiled; the same byte rules as fp8.fnuz_to_fn_bytes
        if c == 0x80:
            return np.uint8(0x7F)
        return c - np.uint8(1) if (c & 0x7F) == 0x7F else c

    @numba.njit(inline="always")
    def run(op, table, base, src, dst):  # pragma: no cover - compiled
        if op == COPY:
            for j in range(src.size):
                dst[j] = src[j]
        elif op == FN_TO_FNUZ:
            for j in range(src.size):
                dst[j] = fn_to_fnuz(src[j])
        elif op == FNUZ_TO_FN:
            for j in range(src.size):
                dst[j] = fnuz_to_fn(src[j])
        else:
            for j in range(src.size):
                dst[j] = table[np.uint64(base + np.int64(src[j]))]  # unsigned: no wrap-around test

    @numba.njit(parallel=True, nogil=True, cache=True)
    def runs(op, table, bases, src, dst, s_offsets, d_offsets, geometry):  # pragma: no cover - compiled
        shape, s_strides, d_strides = geometry[0], geometry[1], geometry[2]  # merged dims, outer to inner
        outer = shape.size - 1
        n, s_step, d_step = shape[outer], s_strides[outer], d_strides[outer]
        per_copy = 1
        for k in range(outer):
            per_copy *= shape[k]
        for r in numba.prange(s_offsets.size * per_copy):
            copy, rest = divmod(np.int64(r), per_copy)
            s0, d0, layer = s_offsets[copy], d_offsets[copy], 0
            for k in range(outer - 1, -1, -1):
                i = rest % shape[k]
                rest //= shape[k]
                s0 += i * s_strides[k]
                d0 += i * d_strides[k]
                layer = i  # the last one taken is dim 0's
            if s_step == 1 and d_step == 1:  # unit-stride slices: the loop the compiler vectorises
                run(op, table, bases[layer], src[s0:s0 + n], dst[d0:d0 + n])
            else:
                run(op, table, bases[layer], src[s0:s0 + (n - 1) * s_step + 1:s_step],
                    dst[d0:d0 + (n - 1) * d_step + 1:d_step])

    return runs


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
    dst_np = dst.numpy()
    lut = np.zeros(1, dtype=dst_np.dtype) if table is None else table.numpy()
    bases = np.zeros(sizes[0], dtype=np.int64) if table is None else np.asarray(layer_bases, dtype=np.int64)
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    _kernel()(OPS.get(conversion, TABLE), lut, bases, src.numpy(), dst_np, np.asarray(src_offsets, dtype=np.int64),
              np.asarray(dst_offsets, dtype=np.int64), np.array((shape, s_st, d_st), dtype=np.int64))


def warm_up(src_dtype: torch.dtype, dst_dtype: torch.dtype) -> None:
    """Compile (or load from numba's on-disk cache) the loop for these storage element types
    (every conversion between them: one signature), so that a peer's first request does not
    pay it. A no-op without numba."""
    if available():
        convert("copy", None, None, torch.zeros(2, dtype=src_dtype), torch.zeros(2, dtype=dst_dtype),
                [0], [0], [1, 1], [1, 1], [1, 1])
