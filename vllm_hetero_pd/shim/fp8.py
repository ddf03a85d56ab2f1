"""FP8 KV conversions: exact e4m3fn <-> e4m3fnuz byte remaps, quantise and dequantise.

vLLM stores fp8 KV as ``uint8`` and a per-layer scale: real value = fp8 value x scale
(``vllm/model_executor/layers/quantization/kv_cache.py``). NVIDIA, XPU, CPU and MI350 use
e4m3fn (bias 7, max 448, NaN 0x7F/0xFF); MI300-class (gfx942) uses e4m3fnuz (bias 8, max 240,
NaN 0x80, no -0). Every bit pattern finite in both means exactly twice as much in fn, so a
byte remap plus a scale x2 (fn -> fnuz) or /2 (fnuz -> fn) is exact, except that fnuz's +-240
(0x7F/0xFF) would need 480 in fn and saturate to 448.
"""

from __future__ import annotations

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


# The remaps below use only bitwise ops, adds and multiplies on uint8 (vectorised by torch on
# every device); comparisons and torch.where on uint8 run ~50x slower on CPU. For a byte b with
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
    """Apply one plan conversion to a block of stored source elements."""
    if conversion == "fn_to_fnuz":
        return fn_to_fnuz_bytes(stored)
    if conversion == "fnuz_to_fn":
        return fnuz_to_fn_bytes(stored)
    return quantize(dequantize(stored, src_dtype, src_scale), dst_dtype, dst_scale)
