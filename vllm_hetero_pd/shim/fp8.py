"""FP8 KV conversions: exact e4m3fn <-> e4m3fnuz byte remaps, quantise and dequantise.

vLLM stores fp8 KV as ``uint8`` and a per-layer scale: real value = fp8 value x scale
(``vllm/model_executor/layers/quantization/kv_cache.py``). NVIDIA, XPU, CPU and MI350 use
e4m3fn (bias 7, max 448, NaN 0x7F/0xFF); MI300-class (gfx942) uses e4m3fnuz (bias 8, max 240,
NaN 0x80, no -0). Every bit pattern finite in both means exactly twice as much in fn, so a
byte remap plus a scale x2 (fn -> fnuz) or /2 (fnuz -> fn) is exact, except that fnuz's +-240
(0x7F/0xFF) would need 480 in fn and saturate to 448.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e4m3fnuz": torch.float8_e4m3fnuz,
    "float8_e5m2": torch.float8_e5m2,
}
# What a cache buffer of each dtype is read and written as: fp8 lives in uint8 (vLLM allocates
# it that way), every other dtype as the integer of its width, so plain copies are bit-exact.
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.int16,
    "float16": torch.int16,
    "float32": torch.int32,
    "float8_e4m3fn": torch.uint8,
    "float8_e4m3fnuz": torch.uint8,
    "float8_e5m2": torch.uint8,
}


# The remaps below (the reference that code_table tabulates) use only bitwise ops, adds and
# multiplies on uint8; comparisons and torch.where on uint8 run ~50x slower on CPU. For a byte b with
# magnitude bits m = b & 0x7F: (m + 1) & 0x80 is 0x80 exactly when m == 0x7F, and
# (m + 0x7F) & 0x80 is 0x80 exactly when m != 0.


def fn_to_fnuz_bytes(code: torch.Tensor) -> torch.Tensor:
    """e4m3fn bytes -> e4m3fnuz bytes of half the value (pair with a doubled scale). Lossless.

    NaN (0x7F, 0xFF) -> 0x80; -0 (0x80) -> 0x00; every other byte is kept.
    """
    m = code & 0x7F
    nan = (m + 1) & 0x80  # 0x80 for NaN codes
    out = (code & ~((nan >> 7) * 0xFF)) | nan  # NaN -> 0x80, others unchanged
    return out & (((m + 0x7F) & 0x80) | 0x7F)  # clear the sign of -0 (m == 0)


def fnuz_to_fn_bytes(code: torch.Tensor) -> torch.Tensor:
    """e4m3fnuz bytes -> e4m3fn bytes of twice the value (pair with a halved scale).

    Exact except +-240 (0x7F / 0xFF), which would be +-480 and saturate to +-448; NaN (0x80) -> 0x7F.
    """
    m = code & 0x7F
    out = code - (((m + 1) & 0x80) >> 7)  # 0x7F -> 0x7E, 0xFF -> 0xFE
    nan = (code & 0x80) & ~((m + 0x7F) & 0x80)  # 0x80 only for the NaN code 0x80
    return out ^ ((nan >> 7) * 0xFF)  # 0x80 -> 0x7F


def dequantize(stored: torch.Tensor, dtype: str, scale: torch.Tensor | float) -> torch.Tensor:
    """Stored elements (storage dtype) -> float32 real values."""
    values = stored.view(TORCH_DTYPES[dtype]).to(torch.float32)
    return values * scale if dtype.startswith("float8") else values


def quantize(values: torch.Tensor, dtype: str, scale: torch.Tensor | float) -> torch.Tensor:
    """float32 real values -> stored elements (storage dtype) of ``dtype``.

    fp8: divide by the destination scale, saturate to the finite range (vLLM's kernels
    saturate rather than produce NaN), round to nearest even. NaN stays NaN.
    """
    target = TORCH_DTYPES[dtype]
    if dtype.startswith("float8"):
        limit = torch.finfo(target).max
        values = (values / scale).clamp(-limit, limit)
    return values.to(target).view(STORAGE_DTYPES[dtype])


def remap(stored: torch.Tensor, conversion: str, src_dtype: str, dst_dtype: str, src_scale, dst_scale) -> torch.Tensor:
    """Apply one plan conversion to a block of stored source elements (the reference that
    ``code_table`` tabulates; used directly only for 4-byte sources)."""
    if conversion == "fn_to_fnuz":
        return fn_to_fnuz_bytes(stored)
    if conversion == "fnuz_to_fn":
        return fnuz_to_fn_bytes(stored)
    return quantize(dequantize(stored, src_dtype, src_scale), dst_dtype, dst_scale)


TABLE_BITS = 16  # sources up to 2 bytes wide are converted through a table of every code


def storage_bits(dtype: str) -> int:
    """Bits of one stored element of ``dtype`` (a table of its codes has 2**bits rows' entries)."""
    return 8 * torch.empty(0, dtype=STORAGE_DTYPES[dtype]).element_size()


def table_offset(src_dtype: str) -> int:
    """What to add to a source element (as int32) to get its table index: 16-bit codes are signed."""
    return 0 if STORAGE_DTYPES[src_dtype] == torch.uint8 else 2 ** 15


@functools.lru_cache(maxsize=32)
def code_table(conversion: str, src_dtype: str, dst_dtype: str, scales: tuple[tuple[float, float], ...],
               device: str) -> torch.Tensor:
    """``[len(scales), codes]``: ``remap`` of every source code, one row per (source scale,
    destination scale) pair; indexed by ``code + table_offset(src_dtype)``.

    Built by the reference itself, element by element the same operations, so a lookup is
    bit-exact with ``remap`` for every code, NaN, infinity, -0 and subnormals included. One
    gather replaces the chain of whole-tensor passes that ``remap`` makes (12 for fn -> fnuz,
    4 with float32 intermediates for a quantisation). At most 2**16 codes per row.
    """
    storage = STORAGE_DTYPES[src_dtype]
    first = -table_offset(src_dtype)
    codes = torch.arange(first, first + 2 ** storage_bits(src_dtype), dtype=torch.int32)
    codes = codes.to(storage).view(1, -1)
    src_scale = torch.tensor([s for s, _ in scales]).view(-1, 1)
    dst_scale = torch.tensor([d for _, d in scales]).view(-1, 1)
    rows = remap(codes, conversion, src_dtype, dst_dtype, src_scale, dst_scale)
    return rows.expand(len(scales), codes.shape[1]).contiguous().to(device)


@dataclass(frozen=True, slots=True)
class Converter:
    """One K or V part's element conversion, layer by layer (built by ``converter``)."""

    conversion: str
    src_dtype: str
    dst_dtype: str
    rows: tuple[tuple[float, float], ...]  # distinct (source scale, destination scale) pairs
    row_of_layer: tuple[int, ...]

    def __call__(self, src: torch.Tensor, dst: torch.Tensor, first_layer: int) -> None:
        """Write converted ``src`` into ``dst``: same-shaped views whose dim 0 runs over layers
        from ``first_layer``."""
        rows = self.row_of_layer[first_layer : first_layer + src.shape[0]]
        shape = (len(rows),) + (1,) * (src.dim() - 1)
        if not self.tabulated:
            src_scale = torch.tensor([self.rows[r][0] for r in rows], device=src.device).view(shape)
            dst_scale = torch.tensor([self.rows[r][1] for r in rows], device=dst.device).view(shape)
            dst.copy_(remap(src, self.conversion, self.src_dtype, self.dst_dtype, src_scale, dst_scale))
            return
        table = self.table(src.device)
        bases = list(self.layer_bases()[first_layer : first_layer + src.shape[0]])
        order = sorted(range(dst.dim()), key=lambda i: -dst.stride(i))  # intermediates in dst's order
        src, dst = src.permute(order), dst.permute(order)
        index = torch.empty(src.shape, dtype=torch.int32, device=src.device).copy_(src)
        if len(set(bases)) > 1:
            index += torch.tensor(bases, dtype=torch.int32, device=index.device).view(shape).permute(order)
        elif bases[0]:
            index += bases[0]
        dst.copy_(torch.index_select(table, 0, index.view(-1)).view(index.shape))

    @property
    def tabulated(self) -> bool:
        """Whether sources fit a table of every code (at most ``TABLE_BITS`` wide): 4-byte ones
        are converted by ``remap`` itself."""
        return storage_bits(self.src_dtype) <= TABLE_BITS

    def table(self, device: torch.device | str) -> torch.Tensor:
        """Every row of ``code_table`` for these layers, flattened: ``layer_bases`` index it."""
        return code_table(self.conversion, self.src_dtype, self.dst_dtype, self.rows, str(device)).view(-1)

    def layer_bases(self) -> tuple[int, ...]:
        """Where each layer's row starts in ``table``, plus the offset that turns a stored code
        into its index (the compiled loop adds the code itself)."""
        codes = 2 ** storage_bits(self.src_dtype)
        return tuple(r * codes + table_offset(self.src_dtype) for r in self.row_of_layer)


def converter(conversion: str, src_dtype: str, dst_dtype: str, scales: Sequence[tuple[float, float]]) -> Converter:
    """A ``Converter`` for layers with these (source, destination) scales (one pair per layer)."""
    rows = tuple(dict.fromkeys(scales))
    return Converter(conversion, src_dtype, dst_dtype, rows, tuple(rows.index(s) for s in scales))
