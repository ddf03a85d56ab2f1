"""fp8 KV conversions: exhaustive over all 256 codes, against torch's own fp8 dtypes; the table
lookups that translate uses, bit for bit against the arithmetic reference ``remap``."""

from __future__ import annotations

import math

import msgspec
import pytest
import torch

from vllm_hetero_pd.formats import preset
from vllm_hetero_pd.shim import allocate, decode, encode, plan, translate
from vllm_hetero_pd.shim.fp8 import (
    STORAGE_DTYPES,
    code_table,
    converter,
    dequantize,
    fn_to_fnuz_bytes,
    fnuz_to_fn_bytes,
    quantize,
    remap,
)

CODES = torch.arange(256, dtype=torch.int32).to(torch.uint8)
FN = CODES.view(torch.float8_e4m3fn).float()
FNUZ = CODES.view(torch.float8_e4m3fnuz).float()


def test_fn_to_fnuz_byte_remap_is_exact_for_all_256_codes():
    out = fn_to_fnuz_bytes(CODES).view(torch.float8_e4m3fnuz).float()
    finite = ~FN.isnan()
    assert torch.equal(out[finite] * 2, FN[finite])  # value kept with the doubled scale
    assert out[~finite].isnan().all() and int(finite.sum()) == 254
    assert int(fn_to_fnuz_bytes(torch.tensor([0x80], dtype=torch.uint8))) == 0x00  # -0 -> +0


def test_fnuz_to_fn_byte_remap_is_exact_except_240():
    out = fnuz_to_fn_bytes(CODES).view(torch.float8_e4m3fn).float()
    finite = ~FNUZ.isnan()
    exact = finite & (FNUZ.abs() != 240)
    assert torch.equal(out[exact], FNUZ[exact] * 2)
    assert torch.equal(out[FNUZ.abs() == 240], torch.tensor([448.0, -448.0]))  # saturated, 6.7 % low
    assert out[~finite].isnan().all() and int((~finite).sum()) == 1


def _nearest_even(x: float, table: torch.Tensor, limit: float) -> float:
    """Reference rounding: nearest finite code, ties to the even mantissa (even code), saturating."""
    x = max(-limit, min(limit, x))
    finite = sorted({float(v) for v in table if not math.isnan(v)})
    best = min(finite, key=lambda c: (abs(c - x), 0))
    ties = [c for c in finite if abs(c - x) == abs(best - x)]
    if len(ties) > 1:
        codes = {float(table[i]): i for i in range(256) if not math.isnan(float(table[i]))}
        best = next(c for c in ties if codes[c] % 2 == 0)
    return best


def test_quantize_rounds_to_nearest_even_and_saturates():
    for table, dtype, limit in ((FN, "float8_e4m3fn", 448.0), (FNUZ, "float8_e4m3fnuz", 240.0)):
        finite = sorted({float(v) for v in table if not math.isnan(v)})
        mids = [(a + b) / 2 for a, b in zip(finite, finite[1:])]
        probes = torch.tensor(finite + mids + [limit * 1.5, -limit * 3, 1e9], dtype=torch.float32)
        got = dequantize(quantize(probes, dtype, 1.0), dtype, 1.0)
        want = torch.tensor([_nearest_even(float(x), table, limit) for x in probes])
        assert torch.equal(got, want), dtype


def _case(src_dtype, dst_dtype, src_scale, dst_scale, name="cuda/flash_attn/C/LBHNC",
          dst_name="rocm-gfx942/triton_attn/C/LBHNC"):
    src = preset(name).build(num_layers=2, num_blocks=4, num_kv_heads=2, head_size=32, dtype=src_dtype,
                             k_scales=(src_scale, src_scale), v_scales=(src_scale, src_scale))
    dst = preset(dst_name).build(num_layers=2, num_blocks=4, num_kv_heads=2, head_size=32, dtype=dst_dtype,
                                 k_scales=(dst_scale, dst_scale), v_scales=(dst_scale, dst_scale))
    return src, dst


def _through(src, dst, k, v):
    buf, out = allocate(src), allocate(dst)
    encode(src, buf, [1, 3], k, v)
    p = plan([src], dst)
    translate(p, [buf], out, src_block_ids=[1, 3], dst_block_ids=[2, 0], stop=k.shape[1])
    return p, decode(dst, out, [2, 0], k.shape[1]), decode(src, buf, [1, 3], k.shape[1])


def test_nvidia_fp8_to_mi300_uses_byte_remap_and_keeps_values():
    src, dst = _case("fp8", "fp8", 0.25, 0.5)
    codes = torch.randint(0, 256, (2, 20, 2, 32), dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x10  # no NaN inputs
    k = v = codes.view(torch.float8_e4m3fn)
    p, (k_out, _), (k_in, _) = _through(src, dst, k, v)
    assert p.conversion == {"k": "fn_to_fnuz", "v": "fn_to_fnuz"}
    assert torch.equal(k_out.float() * 0.5, k_in.float() * 0.25)


def test_fp8_with_same_scale_on_both_sides_is_re_encoded():
    """NVIDIA fn -> MI300 fnuz with both scales 1.0 (no checkpoint scales): values are kept by a
    re-encode; only |x| > 240 saturates."""
    src, dst = _case("fp8", "fp8", 1.0, 1.0)
    k = (torch.rand(2, 20, 2, 32) * 400 - 200).to(torch.float8_e4m3fn)
    p, (k_out, _), (k_in, _) = _through(src, dst, k, k)
    assert p.conversion["k"] == "convert"
    assert torch.equal(k_out.float(), k_in.float())  # |x| < 240 and fn values are fnuz-representable here


def test_bf16_to_fp8_is_within_half_a_step():
    src, dst = _case("bfloat16", "fp8", 1.0, 0.5, dst_name="cuda/flash_attn/C/LBNHC")
    k = (torch.randn(2, 20, 2, 32) * 20).to(torch.bfloat16)
    _, (k_out, _), _ = _through(src, dst, k, k)
    real = k.float()
    err = (k_out.float() * 0.5 - real).abs()
    bound = torch.maximum(real.abs() * 2.0**-4, torch.tensor(2.0**-10 * 0.5))  # 3 mantissa bits; subnormal floor
    assert (err <= bound).all()


def test_fp8_to_bf16_dequantises_exactly_with_power_of_two_scale():
    src, dst = _case("fp8", "bfloat16", 0.125, 1.0, dst_name="cpu/cpu_attn/vec")
    dst = msgspec.structs.replace(dst, block_size=16)
    k = (torch.randn(2, 20, 2, 32) * 50).to(torch.float8_e4m3fn)
    _, (k_out, _), (k_in, _) = _through(src, dst, k, k)
    assert torch.equal(k_out.float(), k_in.float() * 0.125)


# ------------------------------------------------------------------ table lookups against remap
SPECIALS = {  # per storage width: +-0, NaN, +-inf, largest finite, subnormals, values that saturate fp8
    8: [0x00, 0x80, 0x7F, 0xFF, 0x7E, 0xFE, 0x01, 0x81, 0x07, 0x87, 0x08, 0x88],
    16: [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x0001, 0x8001, 0x007F, 0x7F7F, 0xFF7F,
         0x3C00, 0x7C00, 0xFC00, 0x7E00, 0x43E0, 0x43E1, 0xC3E8],  # bf16, then fp16 1 / inf / NaN, bf16 ~448
    32: [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x00000001, 0x80000001, 0x43E00000,
         0x43E40000, 0x49742400],
}


def _random_codes(shape: tuple[int, ...], storage: torch.dtype, seed: int) -> torch.Tensor:
    """Every bit pattern is fair game (NaN, inf, -0, subnormals), and the special ones surely occur."""
    g = torch.Generator().manual_seed(seed)
    bits = 8 * torch.empty(0, dtype=storage).element_size()
    codes = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int64)
    flat = codes.view(-1)
    flat[: len(SPECIALS[bits]) * 4] = torch.tensor(SPECIALS[bits]).repeat(4)
    flat = flat[torch.randperm(flat.numel(), generator=g)]
    signed = torch.where(flat >= 2 ** (bits - 1), flat - 2**bits, flat) if storage != torch.uint8 else flat
    return signed.view(shape).to(storage)


def _reference(stored: torch.Tensor, conversion: str, src: str, dst: str, scales) -> torch.Tensor:
    """remap as the code did before tables: one call over the whole tensor, per-layer scale tensors."""
    shape = (len(scales),) + (1,) * (stored.dim() - 1)
    s = torch.tensor([a for a, _ in scales]).view(shape)
    d = torch.tensor([b for _, b in scales]).view(shape)
    return remap(stored, conversion, src, dst, s, d)


@pytest.mark.parametrize("conversion, src, dst, scales", [
    ("fn_to_fnuz", "float8_e4m3fn", "float8_e4m3fnuz", [(1.0, 1.0)] * 3),
    ("fnuz_to_fn", "float8_e4m3fnuz", "float8_e4m3fn", [(1.0, 1.0)] * 3),
    ("convert", "float8_e4m3fn", "float8_e4m3fnuz", [(1.0, 1.0), (0.37, 1.5), (1.0, 1.0)]),
    ("convert", "float8_e5m2", "float8_e4m3fn", [(0.5, 2.0), (3.0, 0.25), (1.0, 1.0)]),
    ("convert", "float8_e4m3fn", "bfloat16", [(0.125, 1.0), (0.3, 1.0), (7.0, 1.0)]),
    ("convert", "bfloat16", "float8_e4m3fn", [(1.0, 1.0), (1.0, 0.37), (1.0, 1.0)]),
    ("convert", "bfloat16", "float8_e4m3fnuz", [(1.0, 2.0), (1.0, 2.0), (1.0, 1e-3)]),
    ("convert", "float16", "float8_e4m3fn", [(1.0, 0.5), (1.0, 1.0), (1.0, 3.0)]),
    ("convert", "float16", "bfloat16", [(1.0, 1.0)] * 3),
    ("convert", "bfloat16", "float32", [(1.0, 1.0)] * 3),
    ("convert", "float32", "float8_e4m3fn", [(1.0, 0.5), (1.0, 1.0), (1.0, 3.0)]),  # no table: arithmetic
])
def test_converter_matches_remap_bit_for_bit_on_strided_views(conversion, src, dst, scales):
    """Any bit pattern, per-layer scales (layers 0 and 2 share a table row), views that are
    neither contiguous nor in memory order on either side, and a layer range that starts late."""
    convert = converter(conversion, src, dst, scales)
    src_storage, dst_storage = STORAGE_DTYPES[src], STORAGE_DTYPES[dst]
    if src_storage != torch.int32:
        assert len(convert.rows) == len(set(scales)) and code_table.cache_info().maxsize
    codes = _random_codes((3, 5, 40, 3), src_storage, seed=len(scales) + len(conversion))
    src_view = codes.permute(0, 2, 1, 3)[:, 3:35, :, :2]  # [L, 32, 5, 2], strided
    out = torch.zeros(3, 2, 5, 64, dtype=dst_storage)
    dst_view = out.permute(0, 3, 2, 1)[:, 16:48]  # [L, 32, 5, 2] in another memory order
    convert(src_view[1:], dst_view[1:], first_layer=1)
    want = _reference(src_view[1:], conversion, src, dst, scales[1:])
    assert torch.equal(dst_view[1:], want)
    assert not out[0].any() and not out[1:, :, :, :16].any(), "nothing outside the view is written"
    convert(src_view, dst_view, first_layer=0)
    assert torch.equal(dst_view, _reference(src_view, conversion, src, dst, scales))


@pytest.mark.parametrize("src_dtype, dst_dtype, src_scale, dst_scale", [
    ("fp8", "fp8", 0.25, 0.5), ("fp8", "fp8", 1.0, 1.0), ("bfloat16", "fp8", 1.0, 0.37), ("fp8", "bfloat16", 0.3, 1.0),
])
def test_translate_converts_every_byte_like_remap(src_dtype, dst_dtype, src_scale, dst_scale):
    """End to end through plans (fused K/V, shuffled blocks, a partial block), on raw bit patterns:
    the destination holds exactly what remap makes of each source element."""
    src, dst = _case(src_dtype, dst_dtype, src_scale, dst_scale)
    buf, out = allocate(src), allocate(dst)
    flat = buf.view(-1)
    flat.copy_(_random_codes(tuple(flat.shape), flat.dtype, seed=7))
    p = plan([src], dst)
    translate(p, [buf], out, src_block_ids=[3, 1], dst_block_ids=[0, 2], stop=29)
    k_in, v_in = decode(src, buf, [3, 1], 29)
    k_out, v_out = decode(dst, out, [0, 2], 29)
    stored = STORAGE_DTYPES[src.dtype]
    scales = [(src_scale, dst_scale)] * 2 if p.conversion["k"] == "convert" else [(1.0, 1.0)] * 2
    for got, given in ((k_out, k_in), (v_out, v_in)):
        want = _reference(given.view(stored), p.conversion["k"], src.dtype, dst.dtype, scales)
        assert torch.equal(got.view(STORAGE_DTYPES[dst.dtype]), want)


def test_k_and_v_scales_that_differ_are_applied_apart():
    """K and V in one K||V cell on both sides would move as one copy, but their scales differ."""
    src = preset("cuda/flash_attn/C/LBHNC").build(num_layers=2, num_blocks=4, num_kv_heads=2, head_size=32)
    dst = preset("cuda/flash_attn/C/LBNHC").build(num_layers=2, num_blocks=4, num_kv_heads=2, head_size=32,
                                                  dtype="fp8", k_scales=(0.5, 0.25), v_scales=(2.0, 4.0))
    k = (torch.randn(2, 20, 2, 32) * 20).to(torch.bfloat16)
    v = (torch.randn(2, 20, 2, 32) * 20).to(torch.bfloat16)
    buf, out = allocate(src), allocate(dst)
    encode(src, buf, [1, 3], k, v)
    assert not plan([src], dst).kv_fused
    translate(plan([src], dst), [buf], out, src_block_ids=[1, 3], dst_block_ids=[2, 0], stop=20)
    k_out, v_out = decode(dst, out, [2, 0], 20)
    for got, given, scales in ((k_out, k, (0.5, 0.25)), (v_out, v, (2.0, 4.0))):
        want = _reference(given.view(torch.int16), "convert", "bfloat16", "float8_e4m3fn", [(1.0, s) for s in scales])
        assert torch.equal(got.view(torch.uint8), want)
