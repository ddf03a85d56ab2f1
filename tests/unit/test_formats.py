"""KVFormat as data: encoding, comparison, strides, TP shards, compatibility messages, and
per-preset descriptor tests pinning each layout to its backend's source (tests/unit/kv_reference.py)."""

from __future__ import annotations

import msgspec
import pytest
import torch

from vllm_hetero_pd.connector.detect import describe
from vllm_hetero_pd.formats import PRESETS, KVFormat, LayoutError, can_translate, head_range, preset
from vllm_hetero_pd.shim import decode, encode

import kv_reference

GEOMETRY = dict(num_layers=2, num_blocks=5, num_kv_heads=4, head_size=32)


def _fmt(name: str, **kw) -> KVFormat:
    p = preset(name)
    geometry = {**GEOMETRY, **({"num_kv_heads": 1, "head_size": 64} if p.mla else {}), **kw}
    return p.build(**geometry)


def test_format_round_trips_through_msgpack_and_compares_by_value():
    fmt = _fmt("cuda/flash_attn/C/LBNHC", dtype="fp8", k_scales=(0.5, 2.0), v_scales=(1.0, 1.0), layer_names=("a", "b"))
    wire = msgspec.msgpack.encode(fmt)
    back = msgspec.msgpack.decode(wire, type=KVFormat)
    assert back == fmt and hash(back) == hash(fmt)
    assert back != msgspec.structs.replace(fmt, block_size=32)


def test_unknown_field_in_handshake_is_rejected():
    raw = msgspec.to_builtins(_fmt("hpu/gaudi"))
    raw["surprise"] = 1
    with pytest.raises(msgspec.ValidationError, match="surprise"):
        msgspec.convert(raw, KVFormat)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(outer="LBQH"), "bad axis string"),
        (dict(k_inner="D7"), "does not factor"),
        (dict(outer="LBN"), "lacks axes"),
        (dict(k_scales=(1.0,)), "k_scales has 1 entries"),
        (dict(head_start=3, num_heads=2), "exceed num_kv_heads"),
    ],
)
def test_contradictory_fields_name_the_problem(kw, match):
    with pytest.raises(LayoutError, match=match):
        msgspec.structs.replace(_fmt("cuda/flash_attn/C/LBNHC"), **kw)


def test_era_c_strides_match_vllm_layout_enum():
    """LBNHC: per layer [B][N][H][K|V]; strides in elements, V right after K in each cell."""
    fmt = _fmt("cuda/flash_attn/C/LBNHC", block_size=16)
    f = fmt.factors("k")
    cell = 2 * 32
    assert (f["H"], f["N"], f["B"]) == (((4, cell),), ((16, 4 * cell),), ((5, 16 * 4 * cell),))
    assert f["L"] == ((2, 5 * 16 * 4 * cell),) and fmt.v_offset() == 32
    assert fmt.nbytes_per_block == 16 * 4 * 64 * 2


def test_x_packed_key_has_two_dim_factors():
    fmt = _fmt("rocm-gfx942/rocm_attn", dtype="float16", block_size=16)
    assert fmt.k_inner == "BHDND8" and fmt.factors("k")["D"] == ((4, 16 * 8), (8, 1))
    assert fmt.factors("v")["D"] == ((32, 16),)


@pytest.mark.parametrize(
    "heads, tp, expected",
    [(8, 2, [(0, 4), (4, 4)]), (2, 4, [(0, 1), (0, 1), (1, 1), (1, 1)]), (1, 2, [(0, 1), (0, 1)])],
)
def test_head_range_splits_and_replicates_like_vllm(heads, tp, expected):
    assert [head_range(heads, r, tp) for r in range(tp)] == expected


def test_head_range_rejects_uneven_split():
    with pytest.raises(LayoutError, match="not divisible"):
        head_range(6, 0, 4)


def test_can_translate_names_field_and_both_values():
    a = _fmt("cuda/flash_attn/C/LBNHC")
    assert can_translate(a, _fmt("cpu/cpu_attn/vec")) is None
    assert can_translate(a, _fmt("cpu/cpu_attn/vec", head_size=64)) == "head_size differs: source 32 vs destination 64"
    assert "not multiples" in can_translate(a, _fmt("cpu/cpu_attn/vec", block_size=24))
    named = msgspec.structs.replace(a, layer_names=("x", "y"))
    assert can_translate(named, msgspec.structs.replace(a, layer_names=("x", "z"))) == (
        "layer_names differ at 1: source 'y' vs destination 'z'"
    )


def test_unknown_preset_lists_known_names():
    with pytest.raises(LayoutError, match="cuda/flash_attn/C/LBHNC"):
        preset("cuda/flash_attn/C/LBXNC")


def test_presets_carry_source_version_and_verification():
    for p in PRESETS.values():
        assert p.source and p.versions and p.verified in ("real-op", "source"), p.name
    fp8 = {n: p.fp8 for n, p in PRESETS.items() if n.startswith("rocm")}
    assert fp8["rocm-gfx942/triton_attn/C/LBHNC"] == "float8_e4m3fnuz"
    assert fp8["rocm-gfx950/triton_attn/C/LBHNC"] == "float8_e4m3fn"
    assert PRESETS["hpu/gaudi"].block_size == 128 and PRESETS["xpu/flash_attn/C/LBHNC"].block_size == 64


SOURCE_PRESETS = sorted(n for n, p in PRESETS.items() if p.verified == "source")


@pytest.mark.parametrize("name", SOURCE_PRESETS)
def test_descriptor_matches_backend_source(name):
    """Each preset's bytes equal the reference built as the cited source does (kv_reference.py).

    Sources: vLLM 0.32.0 ``vllm/v1/kv_cache_layout.py`` + ``create_kv_cache_views`` (era C,
    MLA), 0.26-0.28 / 0.24-0.25 / <=0.22 backend ``get_kv_cache_shape`` + stride order (eras
    B, A2, A1), ``vllm/v1/attention/ops/paged_attn.py::split_kv_cache`` (ROCM_ATTN), and
    vllm-gaudi 091bbad ``hpu_paged_attn.py`` / ``hpu_model_runner.py`` (Gaudi), and
    ``csrc/cpu/cpu_attn_amx.hpp`` (CPU_ATTN amx, bf16 with block size % 32 == 0).
    """
    amx = name == "cpu/cpu_attn/amx"
    fmt = _fmt(name, block_size=32 if amx else 16, dtype="bfloat16" if amx else "float16")
    torch.manual_seed(0)
    tokens = 2 * fmt.block_size + 3  # two full blocks and a partial one
    block_ids = [4, 0, 2]
    dtype = torch.bfloat16 if amx else torch.float16
    k = torch.randn(fmt.num_layers, tokens, fmt.num_heads, fmt.head_size).to(dtype)
    v = torch.randn(fmt.num_layers, tokens, fmt.num_heads, fmt.head_size_v).to(dtype)
    reference = kv_reference.build(fmt, k, v, block_ids)
    if fmt.storage == "split":
        ours = [(torch.zeros_like(a), torch.zeros_like(b)) for a, b in reference]
        encode(fmt, ours, block_ids, k, v)
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(ours, reference))
    else:
        assert reference.numel() * reference.element_size() == fmt.nbytes()
        ours = torch.zeros_like(reference)
        encode(fmt, ours, block_ids, k, v)
        assert torch.equal(ours, reference)
    k_back, v_back = decode(fmt, reference, block_ids, tokens)
    assert torch.equal(k_back, k) and torch.equal(v_back, v)


def test_describe_checks_strides_against_layout():
    common = dict(backend="FLASH_ATTN", shape=(6, 4, 16, 64), dtype="bfloat16", num_layers=2,
                  num_kv_heads=8, head_start=4, head_size=32)
    # LBNHC: logical [B, H, N, C] with physical [B][N][H][C]
    fmt = describe(layout="LBNHC", strides=(16 * 4 * 64, 64, 4 * 64, 1), **common)
    assert fmt.outer == "LBNH" and fmt.head_start == 4 and fmt.num_heads == 4
    with pytest.raises(LayoutError, match="do not match layout LBHNC"):
        describe(layout="LBHNC", strides=(16 * 4 * 64, 64, 4 * 64, 1), **common)


def test_describe_cpu_uses_the_derived_interior():
    fmt = describe(backend="CPU_ATTN", layout="LBHNC", shape=(3, 2, 32, 64), strides=(2 * 32 * 64, 32 * 64, 64, 1),
                   dtype="bfloat16", num_layers=1, num_kv_heads=2, head_start=0, head_size=32,
                   cpu_inner=lambda: ("DN", "ND"))
    assert (fmt.outer, fmt.k_inner, fmt.v_inner) == ("LBH", "DN", "ND")
    with pytest.raises(LayoutError, match="no known block interior"):
        describe(backend="ROCM_ATTN", layout="LBHNC", shape=(3, 2, 32, 64), strides=(1, 1, 1, 1), dtype="bfloat16",
                 num_layers=1, num_kv_heads=2, head_start=0, head_size=32)
