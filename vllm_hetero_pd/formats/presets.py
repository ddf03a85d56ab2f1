"""Named KV formats per vendor, backend and vLLM era: the only home of vendor names.

Each preset records the physical layout its backend allocates (see ``format.py`` for the axis
letters), the source file it was read from, the vLLM (or plugin) version, and how it was
verified: ``real-op`` = derived from and round-tripped through the backend's own kernel on
this machine; ``source`` = pinned to the cited source by a descriptor test that rebuilds the
backend's tensor the way the source does.

Eras (vLLM releases): A1 <= 0.22 FA ``(2, NB, BS, H, D)``; A2 0.24-0.25 ``(NB, 2, BS, H, D)``;
B 0.26-0.28 ``(NB, H, BS, 2D)`` with K||V per token; C 0.29+ logical ``[L, B, H, N, C]`` with a
``KVCacheLayout`` member as physical order (``vllm/v1/kv_cache_layout.py``).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from vllm_hetero_pd.formats.format import DType, KVFormat, LayoutError, head_range

Verification = Literal["real-op", "source"]


class Preset(msgspec.Struct, frozen=True, kw_only=True):
    """A backend's layout rule; ``build`` turns it into a ``KVFormat`` for one geometry."""

    name: str
    source: str  # file(s) the layout was read from
    versions: str  # vLLM / plugin versions the layout holds for
    verified: Verification
    storage: Literal["joint", "split"]
    outer: str
    k_inner: str
    v_inner: str
    block_size: int  # the platform's default
    fp8: DType = "float8_e4m3fn"  # what the cache dtype "fp8" stores
    num_pad_blocks: int = 0
    mla: bool = False
    x_packed: bool = False  # k_inner/v_inner contain "{x}" = 16 // element bytes

    def build(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        num_kv_heads: int,
        head_size: int,
        dtype: DType | Literal["fp8"] = "bfloat16",
        block_size: int | None = None,
        head_size_v: int | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        k_scales: tuple[float, ...] = (),
        v_scales: tuple[float, ...] = (),
        layer_names: tuple[str, ...] = (),
    ) -> KVFormat:
        dtype = self.fp8 if dtype == "fp8" else dtype
        if self.mla:
            if num_kv_heads != 1 or head_size_v not in (None, 0):
                raise LayoutError(f"{self.name}: MLA caches hold one latent per token (num_kv_heads=1, no V)")
            head_size_v = 0
        k_inner, v_inner = self.k_inner, self.v_inner
        if self.x_packed:
            x = 16 // {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 1)
            k_inner, v_inner = k_inner.format(x=x), v_inner.format(x=x)
        head_start, num_heads = head_range(num_kv_heads, tp_rank, tp_size)
        return KVFormat(
            name=self.name,
            storage=self.storage,
            outer=self.outer,
            k_inner=k_inner,
            v_inner=v_inner,
            num_layers=num_layers,
            num_blocks=num_blocks,
            num_pad_blocks=self.num_pad_blocks,
            block_size=block_size or self.block_size,
            num_kv_heads=num_kv_heads,
            head_start=head_start,
            num_heads=num_heads,
            head_size=head_size,
            head_size_v=head_size if head_size_v is None else head_size_v,
            dtype=dtype,
            k_scales=k_scales,
            v_scales=v_scales,
            layer_names=layer_names,
        )


# vLLM 0.29+ KVCacheLayout members -> outer axes (C = K||V content of one token and head).
ERA_C_LAYOUTS = {"LBHNC": "LBHN", "LBNHC": "LBNH", "LHBNC": "LHBN", "BLHNC": "BLHN", "BLNHC": "BLNH", "BHLNC": "BHLN"}

_CUDA_SRC = "vllm/v1/attention/backends/{}.py"
_VIEWS_SRC = " + vllm/v1/worker/utils.py::create_kv_cache_views"
_ERA_C = "vllm 0.29.0-0.32.0"


def _joint(name: str, versions: str, source: str, outer: str, inner: str = "D", **kw) -> Preset:
    """A one-region-per-layer preset whose K and V parts share the interior ``inner``."""
    kw.setdefault("block_size", 16)
    return Preset(
        name=name, source=source, versions=versions, verified="source", storage="joint",
        outer=outer, k_inner=inner, v_inner=inner, **kw,
    )


def _era_c(name: str, layout: str, source: str, **kw) -> Preset:
    return _joint(f"{name}/C/{layout}", _ERA_C, source + _VIEWS_SRC, ERA_C_LAYOUTS[layout], **kw)


def _all_presets() -> dict[str, Preset]:
    presets: list[Preset] = []
    for backend in ("flash_attn", "flashinfer", "triton_attn"):  # FlashInfer on Blackwell: LBHNC/BLHNC only
        src = _CUDA_SRC.format(backend)
        presets += [_era_c(f"cuda/{backend}", layout, src) for layout in ERA_C_LAYOUTS]
        # Era B (PR #44455): logical (NB, H, BS, 2D); the NHD stride order stores [B][N][H][2D],
        # HND stores [B][H][N][2D]: the bytes of era-C LBNHC / LBHNC.
        for order, outer in (("NHD", "LBNH"), ("HND", "LBHN")):
            presets.append(_joint(f"cuda/{backend}/B/{order}", "vllm 0.26.0-0.28.0",
                                  src + "::get_kv_cache_shape/_stride_order", outer))
        # Era A2: (NB, 2, BS, H, D): a K plane then a V plane per block; HND swaps BS and H.
        for order in ("NHD", "HND"):
            presets.append(_joint(f"cuda/{backend}/A2/{order}", "vllm 0.24.0-0.25.0",
                                  src + "::get_kv_cache_shape/_stride_order", "LB", order))
    # Era A1 FLASH_ATTN: (2, NB, BS, H, D) per layer; NIXL registers K and V as two regions.
    for order in ("NHD", "HND"):
        presets.append(_joint(f"cuda/flash_attn/A1/{order}", "vllm 0.11.0-0.22.0",
                              _CUDA_SRC.format("flash_attn") + "::get_kv_cache_shape", "L", "B" + order))
    rocm_src = "vllm/v1/attention/backends/{}.py + vllm/platforms/rocm.py::fp8_dtype"
    for arch, fp8 in (("gfx942", "float8_e4m3fnuz"), ("gfx950", "float8_e4m3fn")):
        presets += [
            _era_c(f"rocm-{arch}/aiter_fa", layout, rocm_src.format("rocm_aiter_fa"), fp8=fp8)
            for layout in ("LBHNC", "LHBNC")
        ]
        presets.append(
            _era_c(f"rocm-{arch}/aiter_unified", "LBHNC", rocm_src.format("rocm_aiter_unified_attn"), fp8=fp8,
                   block_size=64)
        )
        presets += [_era_c(f"rocm-{arch}/triton_attn", layout, rocm_src.format("triton_attn"), fp8=fp8)
                    for layout in ERA_C_LAYOUTS]
        # Era B (read in the vllm 0.28.0 wheel): all three return the logical (NB, H, BS, 2D).
        # TRITON_ATTN has CUDA's NHD/HND stride order; AITER FA (kernel blocks 16/32) and AITER
        # unified declare none, so physical = logical = [B][H][N][2D] whatever layout is asked for.
        presets += [_joint(f"rocm-{arch}/triton_attn/B/{order}", "vllm 0.26.0-0.28.0",
                           rocm_src.format("triton_attn") + "::get_kv_cache_shape/_stride_order", outer, fp8=fp8)
                    for order, outer in (("NHD", "LBNH"), ("HND", "LBHN"))]
        presets += [_joint(f"rocm-{arch}/{backend}/B/HND", "vllm 0.26.0-0.28.0",
                           rocm_src.format(module) + "::get_kv_cache_shape (no stride order)", "LBHN", fp8=fp8,
                           block_size=block_size)
                    for backend, module, block_size in (("aiter_fa", "rocm_aiter_fa", 16),
                                                        ("aiter_unified", "rocm_aiter_unified_attn", 64))]
        # ROCM_ATTN: two head slots [L][slot][B][N][H*D] (LHBNC) re-viewed by
        # PagedAttention.split_kv_cache as K [B, H, D/x, N, x] and V [B, H, D, N]; older
        # releases allocate (2, NB, BS, H, D) and apply the same view, so the bytes agree.
        presets.append(
            Preset(
                name=f"rocm-{arch}/rocm_attn",
                source="vllm/v1/attention/backends/rocm_attn.py + vllm/v1/attention/ops/paged_attn.py::split_kv_cache",
                versions="vllm 0.11.0-0.32.0 (LHBNC in 0.29+)",
                verified="source",
                storage="joint",
                outer="L",
                k_inner="BHDND{x}",
                v_inner="BHDN",
                block_size=16,
                fp8=fp8,
                x_packed=True,
            )
        )
    presets += [_era_c("xpu/flash_attn", layout, _CUDA_SRC.format("flash_attn"), block_size=64)
                for layout in ERA_C_LAYOUTS]
    # vllm-gaudi: per layer separate key and value caches of (NB + 1) * BS slots, NHD, the
    # last block a dummy; fp8 is fp8_inc (e4m3fn storage).
    gaudi_src = ("vllm-gaudi 091bbad: attention/ops/hpu_paged_attn.py + "
                 "attention/backends/hpu_attn.py::get_kv_cache_shape, "
                 "v1/worker/hpu_model_runner.py::initialize_kv_cache/get_kv_caches_4D")
    for name, inner, mla in (("hpu/gaudi", "BNHD", False), ("hpu/gaudi-mla", "BND", True)):
        presets.append(Preset(name=name, source=gaudi_src, versions="vllm-gaudi 091bbad (upstream vLLM 0.26.0 pin)",
                              verified="source", storage="split", outer="L", k_inner=inner,
                              v_inner="" if mla else inner, block_size=128, num_pad_blocks=1, mla=mla))
    # CPU_ATTN: each (block, head) page [N, 2D] is re-viewed as a K page then a V page of N*D
    # elements, written by cpu_attn_reshape_and_cache in an ISA-specific order.
    # * vec / vec16 (AVX2, AVX-512 without AMX, head sizes % 32 != 0): K transposed [D][N], V
    #   [N][D]. Derived from the kernel on this AVX2 machine (connector/cpu_attn.py); the vec
    #   kernel's reshape_and_cache is plain scalar code, so AVX-512 hosts pack the same way.
    # * amx (bf16 on AMX hosts): AMX B-tiles. K packs pairs of dims (4-byte quadwords) for groups
    #   of 16 tokens, [N/16][D/2][16][2]; V packs pairs of tokens for groups of 16 dims,
    #   [D/16][N/2][16][2]. Read from csrc/cpu/cpu_attn_amx.hpp::reshape_and_cache; this host has
    #   no AMX, so the kernel cannot be run here.
    cpu_src = "vllm/v1/attention/backends/cpu_attn.py + "
    for isa, k_inner, v_inner, verified, source, note in (
        ("vec", "DN", "ND", "real-op", "torch.ops._C.cpu_attn_reshape_and_cache (isa vec/vec16)", ""),
        ("amx", "NDN16D2", "DND16N2", "source", "csrc/cpu/cpu_attn_amx.hpp::reshape_and_cache",
         "; bf16, block_size % 32 == 0"),
    ):
        presets.append(Preset(name=f"cpu/cpu_attn/{isa}", source=cpu_src + source, verified=verified,
                              versions=f"vllm 0.29.0-0.32.0 (LBHNC only{note})", storage="joint", outer="LBH",
                              k_inner=k_inner, v_inner=v_inner, block_size=128))
    for layout in ERA_C_LAYOUTS:
        mla = _joint(f"mla/C/{layout}", _ERA_C, "vllm/v1/kv_cache_interface.py::MLAAttentionSpec" + _VIEWS_SRC,
                     ERA_C_LAYOUTS[layout].replace("H", ""), mla=True)
        presets.append(msgspec.structs.replace(mla, v_inner=""))
    return {p.name: p for p in presets}


PRESETS: dict[str, Preset] = _all_presets()


def preset(name: str) -> Preset:
    """Look a preset up by name; the error lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise LayoutError(f"unknown KV format preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
