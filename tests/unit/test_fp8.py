"""fp8 KV conversions: exhaustive over all 256 codes, against torch's own fp8 dtypes."""

from __future__ import annotations

import math

import msgspec
import torch

from vllm_hetero_pd.formats import preset
from vllm_hetero_pd.shim import allocate, decode, encode, plan, translate
from vllm_hetero_pd.shim.fp8 import dequantize, fn_to_fnuz_bytes, fnuz_to_fn_bytes, quantize

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
