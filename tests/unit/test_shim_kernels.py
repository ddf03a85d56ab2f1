"""The compiled conversions (``shim/kernels.py``) are bit-exact with the torch reference, on any view."""

from __future__ import annotations

import pytest
import torch

from vllm_hetero_pd.formats.format import LayoutError
from vllm_hetero_pd.formats.presets import preset
from vllm_hetero_pd.shim import fp8, kernels
from vllm_hetero_pd.shim.plan import plan
from vllm_hetero_pd.shim.translate import allocate, translate

BYTE_PAIRS = [("fn_to_fnuz", "float8_e4m3fn", "float8_e4m3fnuz"), ("fnuz_to_fn", "float8_e4m3fnuz", "float8_e4m3fn")]


def run(conversion: str, src: torch.Tensor, dst: torch.Tensor, convert: fp8.Converter | None = None) -> None:
    """``kernels.convert`` over two same-shaped views (dim 0: layers), as one copy each."""
    table = None if convert is None or conversion in kernels.OPS else convert.table("cpu")
    bases = None if table is None else convert.layer_bases()[: src.shape[0]]
    flat = [t.as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,), 0) for t in (src, dst)]
    kernels.convert(conversion, table, bases, *flat, [src.storage_offset()], [dst.storage_offset()],
                    src.shape, src.stride(), dst.stride())


@pytest.mark.parametrize("conversion,src_dtype,dst_dtype", BYTE_PAIRS)
def test_every_fp8_code_through_strided_views(conversion, src_dtype, dst_dtype):
    codes = torch.arange(256, dtype=torch.uint8).repeat(3, 5, 2).view(3, 5, 512)[:, :, ::2]  # every code, stride 2
    dst = torch.empty(3, 256, 5, dtype=torch.uint8).transpose(1, 2)  # written against its own memory order
    run(conversion, codes, dst)
    assert torch.equal(dst, fp8.remap(codes, conversion, src_dtype, dst_dtype, 1.0, 1.0))


@pytest.mark.parametrize("conversion,src_dtype,dst_dtype", BYTE_PAIRS)
def test_every_fp8_code_through_contiguous_runs(conversion, src_dtype, dst_dtype):
    """Rows contiguous on both sides merge into long runs: the vectorised loop."""
    codes = torch.arange(256, dtype=torch.uint8).repeat(2, 4, 9)[:, :, 3:]  # runs that start unaligned
    n = codes.shape[2]
    whole = torch.zeros(2, 4, n + 20, dtype=torch.uint8)
    dst = whole[:, :, 7:7 + n]
    run(conversion, codes, dst)
    assert torch.equal(dst, fp8.remap(codes, conversion, src_dtype, dst_dtype, 1.0, 1.0))
    assert not whole[:, :, :7].any() and not whole[:, :, 7 + n:].any()  # nothing beside the runs


def test_runs_merge_only_where_both_sides_are_contiguous():
    src = torch.empty(2, 3, 4, 8)
    assert kernels.merged(src.shape, src.stride(), src.stride()) == ([2, 96], [96, 1], [96, 1])
    transposed = torch.empty(2, 3, 8, 4).transpose(2, 3)  # dst's innermost is src's dim 2
    assert kernels.merged(src.shape, src.stride(), transposed.stride()) == ([2, 3, 8, 4], [96, 32, 1, 8],
                                                                           [96, 32, 4, 1])


def test_bf16_quantisation_per_layer_scales_and_special_values():
    values = torch.randn(3, 7, 33, 16).to(torch.bfloat16)
    values.view(-1)[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-30])
    stored = values.view(torch.int16)
    scales = [(1.0, 0.5), (1.0, 2.0), (1.0, 0.5)]
    dst = torch.empty(3, 16, 33, 7, dtype=torch.uint8).permute(0, 3, 2, 1)
    run("convert", stored, dst, fp8.converter("convert", "bfloat16", "float8_e4m3fn", scales))
    expected = torch.cat([fp8.remap(stored[i:i + 1], "convert", "bfloat16", "float8_e4m3fn", 1.0, d)
                          for i, (_, d) in enumerate(scales)])
    assert torch.equal(dst, expected)


def test_many_copies_in_one_call_each_at_its_own_offsets():
    src = torch.arange(4 * 64, dtype=torch.int16).view(4, 64)
    dst = torch.full((4, 96), -1, dtype=torch.int16)
    kernels.convert("copy", None, None, src.view(-1), dst.view(-1), [0, 128, 16], [64, 0, 224], [2, 16],
                    [64, 1], [96, 1])
    flat = dst.view(-1)
    for s0, d0 in ((0, 64), (128, 0), (16, 224)):
        for layer in range(2):
            s, d = s0 + layer * 64, d0 + layer * 96
            assert torch.equal(flat[d : d + 16], src.view(-1)[s : s + 16])
    assert (flat == -1).sum() == flat.numel() - 6 * 16  # nothing else was written


@pytest.mark.parametrize("conversion", ["copy", "fn_to_fnuz"])
def test_transposes_go_through_tiled_panels(conversion):
    """CPU_ATTN's K: the destination's contiguous dim is the source's strided one (sizes not
    multiples of the tile, so the edge tiles run too)."""
    src = torch.randint(0, 256, (3, 5, 70, 37), dtype=torch.uint8)  # [layer, head, token, dim]
    whole = torch.zeros(3, 5, 37, 75, dtype=torch.uint8)
    dst = whole[:, :, :, 2:72].transpose(2, 3)  # tokens contiguous, in a padded row
    run(conversion, src, dst)
    assert torch.equal(dst, src if conversion == "copy" else fp8.remap(src, conversion, "float8_e4m3fn",
                                                                       "float8_e4m3fnuz", 1.0, 1.0))
    assert not whole[..., :2].any() and not whole[..., 72:].any()


def test_a_copy_that_would_leave_its_buffer_is_refused():
    src, dst = torch.zeros(64, dtype=torch.uint8), torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(LayoutError, match="reaches outside its 64-element buffer"):
        kernels.convert("copy", None, None, src, dst, [0], [40], [1, 32], [32, 1], [32, 1])


def test_numba_imports_here():
    """numba is a dependency (pyproject): a machine without it would silently run the torch path."""
    assert kernels.available()


def test_views_off_the_cpu_take_the_torch_path():
    assert not kernels.fits(torch.zeros(2, dtype=torch.uint8, device="meta"), torch.zeros(2, dtype=torch.uint8))


@pytest.mark.parametrize("dtypes", [("float8_e4m3fn", "float8_e4m3fnuz"), ("bfloat16", "float8_e4m3fn"),
                                    ("bfloat16", "bfloat16")])
def test_translate_gives_the_same_bytes_with_and_without_the_kernel(monkeypatch, dtypes):
    """A whole translation between backends (shuffled blocks, per-layer scales) through both paths."""
    src_dtype, dst_dtype = dtypes
    geometry = dict(num_layers=3, num_kv_heads=2, head_size=16)
    scales = (2.0, 2.0, 2.0) if src_dtype.startswith("float8") else (0.5, 1.0, 4.0)
    src = preset("cuda/flash_attn/C/LBNHC").build(num_blocks=8, block_size=16, dtype=src_dtype, **geometry)
    dst = preset("rocm-gfx942/triton_attn/C/LBHNC").build(num_blocks=4, block_size=32, dtype=dst_dtype,
                                                         k_scales=scales, v_scales=scales, **geometry)
    src_buf = allocate(src)
    for t in src_buf if isinstance(src_buf, tuple) else (src_buf,):
        t.view(torch.uint8).random_(0, 120)
    compiled = plan([src], dst)
    ids = dict(src_block_ids=[5, 2, 7, 0], dst_block_ids=[3, 1], stop=64)

    def bytes_of(buffers) -> list[torch.Tensor]:
        return [t.view(torch.uint8).clone() for t in (buffers if isinstance(buffers, tuple) else (buffers,))]

    with_kernel = allocate(dst)
    translate(compiled, [src_buf], with_kernel, **ids)
    monkeypatch.setattr(kernels, "fits", lambda src, dst: False)
    without = allocate(dst)
    translate(compiled, [src_buf], without, **ids)
    assert all(torch.equal(a, b) for a, b in zip(bytes_of(with_kernel), bytes_of(without)))
    assert any(t.any() for t in bytes_of(with_kernel))  # something was written
