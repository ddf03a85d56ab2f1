"""Translation between formats: hypothesis properties over presets x block sizes x TP splits x
head dims x token counts, plus plans, live vLLM-style per-layer views and bad input.

Encoding and decoding go through the shim; test_formats.py pins both to each backend's
source, and test_cpu_attn.py pins CPU_ATTN to vLLM's kernel.
"""

from __future__ import annotations

import dataclasses

import msgspec
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_hetero_pd.formats import PRESETS, LayoutError, preset
from vllm_hetero_pd.shim import allocate, decode, encode, plan, translate
from vllm_hetero_pd.shim.fp8 import TORCH_DTYPES
from vllm_hetero_pd.shim.plan import _pieces
from vllm_hetero_pd.shim.translate import _copy, tiles

LAYOUT_PRESETS = sorted(n for n, p in PRESETS.items() if not p.mla)
MLA_PRESETS = sorted(n for n, p in PRESETS.items() if p.mla)
NUM_LAYERS = 2


def _ids(draw, count: int, num_blocks: int) -> list[int]:
    """Block ids: consecutive runs and shuffles, so both coalesced and scattered paths run."""
    if draw(st.booleans()):
        first = draw(st.integers(0, num_blocks - count))
        return list(range(first, first + count))
    return draw(st.permutations(range(num_blocks)))[:count]


@st.composite
def translation_cases(draw, names=LAYOUT_PRESETS):
    src_name, dst_name = draw(st.sampled_from(names)), draw(st.sampled_from(names))
    src_bs, dst_bs = draw(st.sampled_from([16, 32, 64, 128])), draw(st.sampled_from([16, 32, 64, 128]))
    mla = PRESETS[src_name].mla
    heads = 1 if mla else draw(st.sampled_from([1, 2, 4, 8]))
    head_size = draw(st.sampled_from([32, 64, 80, 128] if not mla else [64, 96]))
    big = max(src_bs, dst_bs)
    tokens = draw(st.one_of(st.just(1), st.sampled_from([src_bs - 1, src_bs + 1, dst_bs - 1, dst_bs + 1]),
                            st.integers(1, 3 * big)))
    start = draw(st.one_of(st.just(0), st.integers(0, tokens - 1)))
    src_tp, dst_tp = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([1, 2, 4]))
    if mla:
        src_tp = dst_tp = 1
    case = dict(src=src_name, dst=dst_name, src_bs=src_bs, dst_bs=dst_bs, heads=heads, head_size=head_size,
                tokens=tokens, start=start, src_tp=src_tp, dst_tp=dst_tp)
    src_blocks, dst_blocks = -(-tokens // src_bs), -(-tokens // dst_bs)
    case["src_ids"] = _ids(draw, src_blocks, src_blocks + 3)
    case["dst_ids"] = _ids(draw, dst_blocks, dst_blocks + 2)
    return case


def _formats(name: str, bs: int, num_blocks: int, tp: int, case: dict, dtype: str = "bfloat16"):
    return [
        preset(name).build(num_layers=NUM_LAYERS, num_blocks=num_blocks, num_kv_heads=case["heads"],
                           head_size=case["head_size"], block_size=bs, dtype=dtype, tp_rank=r, tp_size=tp)
        for r in range(tp)
    ]


def _heads(fmt):
    return slice(fmt.head_start, fmt.head_start + fmt.num_heads)


def _run(case: dict, dtype: str = "bfloat16", k=None, v=None):
    """Encode canonical K/V into every source rank, translate into every destination rank,
    and return (canonical K, V, decoded K, V per destination rank)."""
    torch.manual_seed(case["tokens"])
    src_fmts = _formats(case["src"], case["src_bs"], len(case["src_ids"]) + 3, case["src_tp"], case, dtype)
    dst_fmts = _formats(case["dst"], case["dst_bs"], len(case["dst_ids"]) + 2, case["dst_tp"], case, dtype)
    shape = (NUM_LAYERS, case["tokens"], case["heads"])
    k = torch.randn(*shape, src_fmts[0].head_size).to(torch.bfloat16) if k is None else k
    v = torch.randn(*shape, src_fmts[0].head_size_v).to(torch.bfloat16) if v is None else v
    src_bufs = []
    for fmt in src_fmts:
        buf = allocate(fmt)
        encode(fmt, buf, case["src_ids"], k[:, :, _heads(fmt)], v[:, :, _heads(fmt)])
        src_bufs.append(buf)
    out = []
    for fmt in dst_fmts:
        buf = allocate(fmt)
        translate(plan(src_fmts, fmt), src_bufs, buf, src_block_ids=case["src_ids"], dst_block_ids=case["dst_ids"],
                  start=case["start"], stop=case["tokens"])
        out.append((fmt, *decode(fmt, buf, case["dst_ids"], case["tokens"])))
    return k, v, out


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(translation_cases())
def test_any_layout_pair_translates_bit_exactly(case):
    k, v, out = _run(case)
    start = case["start"]
    for fmt, k_out, v_out in out:
        assert torch.equal(k_out[:, start:], k[:, start:, _heads(fmt)])
        assert torch.equal(v_out[:, start:], v[:, start:, _heads(fmt)])
        assert not k_out[:, :start].any(), "positions before start must stay untouched"


@settings(max_examples=25, deadline=None)
@given(translation_cases(names=MLA_PRESETS))
def test_mla_latents_translate_bit_exactly(case):
    k, v, out = _run(case)
    for _fmt, k_out, v_out in out:
        assert torch.equal(k_out[:, case["start"]:], k[:, case["start"]:]) and v_out.numel() == 0


def test_prefill_fa_lbnhc_bs16_to_cpu_decode_bs128_and_gaudi_bs128_to_cpu():
    """The two routes the connector needs first, with GQA heads and a partial last block."""
    for src, src_bs, src_ids in (("cuda/flash_attn/C/LBNHC", 16, [9, 3, 4, 5, 0, 1, 2, *range(10, 22)]),
                                 ("hpu/gaudi", 128, [2, 0, 1])):
        case = dict(src=src, dst="cpu/cpu_attn/vec", src_bs=src_bs, dst_bs=128, heads=8, head_size=128, tokens=300,
                    start=0, src_tp=2, dst_tp=1, src_ids=src_ids, dst_ids=[2, 0, 1])
        k, v, [(fmt, k_out, v_out)] = _run(case)
        assert torch.equal(k_out, k) and torch.equal(v_out, v)


def test_plan_is_identity_only_for_byte_identical_blocks():
    a = preset("cuda/flash_attn/C/LBHNC").build(num_layers=2, num_blocks=10, num_kv_heads=4, head_size=64)
    assert plan([a], msgspec.structs.replace(a, num_blocks=99)).is_identity
    other_layout = preset("cuda/flash_attn/C/LBNHC").build(num_layers=2, num_blocks=10, num_kv_heads=4, head_size=64)
    assert not plan([a], other_layout).is_identity
    assert not plan([a], msgspec.structs.replace(a, block_size=32)).is_identity
    assert not plan([a.shard(0, 2), a.shard(1, 2)], a).is_identity


def test_aligned_consecutive_blocks_need_one_copy_per_side():
    """16 -> 128 with consecutive ids on both sides: one rectangular copy for K and one for V."""
    a = preset("cuda/flash_attn/C/LBNHC").build(num_layers=2, num_blocks=64, num_kv_heads=4, head_size=64)
    b = preset("cpu/cpu_attn/vec").build(num_layers=2, num_blocks=8, num_kv_heads=4, head_size=64)
    copies = plan([a], b).copies(range(64), range(8), 0, 1024)
    assert [c.sizes[:3] for c in copies] == [(8, 8, 16)] * 2


@pytest.mark.parametrize("src, dst, fused", [
    ("cuda/flash_attn/C/LBHNC", "cuda/flash_attn/C/LBNHC", True),  # K||V cells on both sides
    ("cuda/flash_attn/A2/NHD", "cuda/flash_attn/C/LBHNC", False),  # V half a block after K: nothing to merge
    ("cuda/flash_attn/C/LBNHC", "cpu/cpu_attn/vec", False),  # CPU_ATTN's K is transposed, V is not
    ("hpu/gaudi", "cuda/flash_attn/C/LBHNC", False),  # K and V in separate tensors
])
def test_kv_fusion_moves_k_and_v_in_one_copy_where_they_are_laid_out_alike(src, dst, fused):
    geometry = dict(num_layers=2, num_kv_heads=2, head_size=32, block_size=16)
    a, b = preset(src).build(num_blocks=6, **geometry), preset(dst).build(num_blocks=6, **geometry)
    p = plan([a], b)
    apart = dataclasses.replace(p, kv_fused=False)
    assert p.kv_fused is fused
    ids = ([4, 1, 2], [0, 5, 3], 3, 40)
    assert len(p.copies(*ids)) * (2 if fused else 1) == len(apart.copies(*ids))
    k, v = torch.randn(2, 40, 2, 32).to(torch.bfloat16), torch.randn(2, 40, 2, 32).to(torch.bfloat16)
    buf = allocate(a)
    encode(a, buf, ids[0], k, v)
    outs = []
    for compiled in (p, apart):
        outs.append(allocate(b))
        translate(compiled, [buf], outs[-1], src_block_ids=ids[0], dst_block_ids=ids[1], start=3, stop=40)
    assert all(torch.equal(x, y) for x, y in zip(*(o if isinstance(o, tuple) else (o,) for o in outs)))
    k_out, v_out = decode(b, outs[0], ids[1], 40)
    assert torch.equal(k_out[:, 3:], k[:, 3:]) and torch.equal(v_out[:, 3:], v[:, 3:])
    assert not k_out[:, :3].any() and not v_out[:, :3].any()


@pytest.mark.parametrize("sizes, src_strides, dst_strides", [
    ((2, 8, 256, 128), (2**20, 256, 2048, 1), (2**20, 128 * 256, 1, 256)),  # LBNHC rows -> [D][N] pages
    ((2, 8, 16, 8, 128), (2**20, 32768, 2048, 256, 1), (2**20, 16, 1, 16384, 128)),  # 8 blocks of 16 -> 128
    ((2, 384, 8, 128), (2**20, 8 * 128, 128, 1), (2**20, 1, 128 * 384, 384)),  # Gaudi NHD, 3 tiles long
])
def test_tiled_transposes_write_what_one_copy_writes(sizes, src_strides, dst_strides):
    """Copies into CPU_ATTN-like transposed pages are cut into tiles (and still land bit for bit
    where one copy_ puts them, nothing else written); non-transposes stay one copy."""
    src = torch.randint(-2**15, 2**15, (2**23,), dtype=torch.int16)
    out, want = torch.zeros(2**23, dtype=torch.int16), torch.zeros(2**23, dtype=torch.int16)
    s_view = src.as_strided(sizes, src_strides, 5)
    d_view, w_view = out.as_strided(sizes, dst_strides, 3), want.as_strided(sizes, dst_strides, 3)
    assert len(tiles(s_view, d_view)) > 1
    _copy(s_view, d_view)
    w_view.copy_(s_view)
    assert torch.equal(out, want)
    assert len(tiles(s_view, s_view.clone())) == 1 and len(tiles(s_view[:1, :1], d_view[:1, :1])) == 1


def test_long_token_runs_into_cpu_attn_translate_exactly():
    """A request big enough for tiled transposes both ways (into CPU_ATTN, and decode back out)."""
    src = preset("cuda/flash_attn/C/LBNHC").build(num_layers=2, num_blocks=20, num_kv_heads=8, head_size=128)
    dst = preset("cpu/cpu_attn/vec").build(num_layers=2, num_blocks=4, num_kv_heads=8, head_size=128)
    k, v = torch.randn(2, 300, 8, 128).to(torch.bfloat16), torch.randn(2, 300, 8, 128).to(torch.bfloat16)
    buf, out = allocate(src), allocate(dst)
    encode(src, buf, range(1, 20), k, v)
    translate(plan([src], dst), [buf], out, src_block_ids=range(1, 20), dst_block_ids=[3, 0, 2], stop=300)
    k_out, v_out = decode(dst, out, [3, 0, 2], 300)
    assert torch.equal(k_out, k) and torch.equal(v_out, v)


@pytest.mark.parametrize("a, b, cuts", [(0, 300, (1, 16, 128)), (5, 140, (1, 16, 128)), (7, 9, (1, 32)),
                                        (33, 64, (1, 32, 64)), (3, 301, (1, 2, 16, 32, 128))])
def test_pieces_tile_the_range_exactly(a, b, cuts):
    covered = []
    for p, level, count in _pieces(a, b, cuts):
        chunk = list(range(cuts[level]))
        assert p % cuts[level] == 0 or level == 0
        covered += [p + i * cuts[level] + t for i in range(count) for t in chunk]
    assert covered == list(range(a, b))


def test_translate_into_vllm_per_layer_views_of_one_allocation():
    """Destination as vLLM 0.32 hands it over: a dict of per-layer [B, H, N, C] views into one
    int8 buffer (create_kv_cache_views), here in the cross-layer BLHNC layout."""
    src = preset("cuda/flash_attn/C/LBNHC").build(num_layers=3, num_blocks=8, num_kv_heads=2, head_size=32)
    dst = preset("cuda/flash_attn/C/BLHNC").build(num_layers=3, num_blocks=4, num_kv_heads=2, head_size=32,
                                                   layer_names=("l0", "l1", "l2"))
    raw = torch.zeros(dst.nbytes(), dtype=torch.int8)
    page = 2 * 16 * 64  # H * N * C elements
    views = {f"l{l}": raw.view(torch.bfloat16).as_strided((4, 2, 16, 64), (3 * page, 16 * 64, 64, 1), l * page)
             for l in (2, 0, 1)}  # dict order differs from layer order: layer_names decide
    k, v = torch.randn(3, 40, 2, 32).to(torch.bfloat16), torch.randn(3, 40, 2, 32).to(torch.bfloat16)
    buf = allocate(src)
    encode(src, buf, [1, 2, 3], k, v)
    translate(plan([src], dst), [buf], views, src_block_ids=[1, 2, 3], dst_block_ids=[3, 0, 2], stop=40)
    k_back, v_back = decode(dst, raw.view(torch.bfloat16), [3, 0, 2], 40)
    assert torch.equal(k_back, k) and torch.equal(v_back, v)
    # and through the views themselves: block 3, layer 1, head 0, token 5 holds K then V
    assert torch.equal(views["l1"][3, 0, 5], torch.cat([k[1, 5, 0], v[1, 5, 0]]))
    with pytest.raises(LayoutError, match=r"lacks layers \['l2'\]"):
        translate(plan([src], dst), [buf], {"l0": views["l0"], "l1": views["l1"]}, src_block_ids=[1, 2, 3],
                  dst_block_ids=[3, 0, 2], stop=40)


def test_per_layer_split_tensors_are_accepted():
    gaudi = preset("hpu/gaudi").build(num_layers=2, num_blocks=3, num_kv_heads=2, head_size=32)
    per_layer = [(torch.zeros(4 * 128, 2, 32, dtype=torch.bfloat16), torch.zeros(4 * 128, 2, 32, dtype=torch.bfloat16))
                 for _ in range(2)]
    k, v = torch.randn(2, 130, 2, 32).to(torch.bfloat16), torch.randn(2, 130, 2, 32).to(torch.bfloat16)
    encode(gaudi, per_layer, [2, 0], k, v)
    assert torch.equal(per_layer[1][0][2 * 128 + 7], k[1, 7]) and torch.equal(per_layer[0][1][0 * 128 + 1], v[0, 129])
    assert not per_layer[0][0][3 * 128:].any(), "the pad block stays untouched"


def test_bad_input_is_named():
    a = preset("cuda/flash_attn/C/LBNHC").build(num_layers=2, num_blocks=4, num_kv_heads=4, head_size=32)
    b = preset("cpu/cpu_attn/vec").build(num_layers=2, num_blocks=4, num_kv_heads=4, head_size=32)
    p = plan([a], b)
    with pytest.raises(LayoutError, match="src_block_ids has 1 blocks"):
        translate(p, [allocate(a)], allocate(b), src_block_ids=[0], dst_block_ids=[0], stop=40)
    with pytest.raises(LayoutError, match=r"dst_block_ids \[7\] outside"):
        translate(p, [allocate(a)], allocate(b), src_block_ids=[0, 1, 2], dst_block_ids=[7], stop=40)
    with pytest.raises(LayoutError, match="the format addresses"):
        translate(p, [allocate(a)[:100]], allocate(b), src_block_ids=[0, 1, 2], dst_block_ids=[0], stop=40)
    with pytest.raises(LayoutError, match="KV head 2 .* none of the source ranks"):
        plan([a.shard(0, 2)], b)
    with pytest.raises(LayoutError, match="head_size differs: source 32 vs destination 64"):
        plan([a], msgspec.structs.replace(b, head_size=64, head_size_v=64))


FP8_PRESETS = ["cuda/flash_attn/C/LBNHC", "rocm-gfx942/triton_attn/C/LBHNC", "rocm-gfx950/aiter_fa/C/LHBNC",
               "hpu/gaudi", "cpu/cpu_attn/vec", "rocm-gfx942/rocm_attn"]
SCALES = [0.25, 0.5, 1.0, 2.0, 0.37]


@settings(max_examples=40, deadline=None)
@given(src=st.sampled_from(FP8_PRESETS), dst=st.sampled_from(FP8_PRESETS), src_fp8=st.booleans(),
       dst_fp8=st.booleans(), src_scale=st.sampled_from(SCALES), dst_scale=st.sampled_from(SCALES),
       tokens=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_fp8_pairs_stay_within_the_quantisation_bound(src, dst, src_fp8, dst_fp8, src_scale, dst_scale, tokens, seed):
    """Real values survive any fp8/bf16 pair: bit-exact where the plan says "copy" or a lossless
    remap applies, else within half an fp8 step (2^-4 relative, 2^-10 x scale absolute near
    zero) when the destination is fp8, or bf16 rounding (2^-8 relative) when it is bf16. Values
    stay below 200 x scale, so no saturation (and no fnuz +-240 code) is involved."""
    torch.manual_seed(seed)
    geometry = dict(num_layers=2, num_kv_heads=2, head_size=64, block_size=16)
    a = preset(src).build(num_blocks=8, dtype="fp8" if src_fp8 else "bfloat16", k_scales=(src_scale,) * 2,
                          v_scales=(src_scale,) * 2, **geometry)
    b = preset(dst).build(num_blocks=8, dtype="fp8" if dst_fp8 else "bfloat16", k_scales=(dst_scale,) * 2,
                          v_scales=(dst_scale,) * 2, **geometry)
    limit = 200 * min(src_scale, dst_scale)  # inside every fp8 range at both scales: no saturation
    real = (torch.rand(2, tokens, 2, 64) * 2 - 1) * limit
    stored = (real / src_scale).to(TORCH_DTYPES[a.dtype]) if a.is_fp8 else real.to(torch.bfloat16)
    src_real = stored.float() * (src_scale if a.is_fp8 else 1.0)
    ids = [5, 2, 7, 0, 1][: -(-tokens // 16)]
    buf, out = allocate(a), allocate(b)
    encode(a, buf, ids, stored, stored)
    p = plan([a], b)
    translate(p, [buf], out, src_block_ids=ids, dst_block_ids=ids[::-1], stop=tokens)
    k_out, v_out = decode(b, out, ids[::-1], tokens)
    for got in (k_out, v_out):
        got_real = got.float() * (dst_scale if b.is_fp8 else 1.0)
        err = (got_real - src_real).abs()
        if p.conversion["k"] in ("copy", "fn_to_fnuz", "fnuz_to_fn"):
            assert torch.equal(got_real, src_real)
        elif b.is_fp8:
            assert (err <= src_real.abs() * 2.0**-4 + 2.0**-10 * dst_scale).all()
        else:
            assert (err <= src_real.abs() * 2.0**-8).all()
