"""``KVFormat`` of a live vLLM worker (layout era B or C), from its config and registered KV caches.

The connector calls ``detect(vllm_config, kv_caches)`` in ``register_kv_caches`` and sends
the result in its handshake. The layout is not trusted from labels alone: the strides of
the tensors vLLM hands over must match what the resolved ``KVCacheLayout`` implies, and
CPU_ATTN's packed interior is derived from the running kernel (``connector/cpu_attn.py``).

Both eras hand over per-layer tensors of logical shape ``[B, H, N, C]`` (era B spells it
``(NB, H, BS, 2*D)``), so one ``describe`` serves both; where a release keeps the layout and
CPU_ATTN's ISA is the installed release's adapter's business (``connector/adapters/``).

``describe`` is the pure core (plain values in, ``KVFormat`` out) so it is tested without an
engine; ``detect`` only gathers those values from vLLM, which it imports lazily. It lives in
``connector`` (not ``formats``) because reading a live worker is vLLM-adapter work: ``formats``
stays a leaf that imports neither vLLM nor the shim.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from vllm_hetero_pd.formats.format import KVFormat, LayoutError, head_range
from vllm_hetero_pd.formats.presets import ERA_C_LAYOUTS

# Backends whose era-C block interior is K||V per (token, head): the layout enum says it all.
KV_CONCAT_BACKENDS = frozenset(
    {"FLASH_ATTN", "FLASHINFER", "TRITON_ATTN", "ROCM_AITER_UNIFIED_ATTN", "FLEX_ATTENTION", "CPU_ATTN"}
)


def describe(
    *,
    backend: str,
    layout: str,
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    dtype: str,
    num_layers: int,
    num_kv_heads: int,
    head_start: int,
    head_size: int,
    use_mla: bool = False,
    cpu_inner: Callable[[], tuple[str, str]] | None = None,
    k_scales: tuple[float, ...] = (),
    v_scales: tuple[float, ...] = (),
    layer_names: tuple[str, ...] = (),
) -> KVFormat:
    """The format of a cache whose per-layer tensors have logical ``[B, H, N, C]`` ``shape``.

    ``strides`` (in elements) are checked against ``layout``; ``cpu_inner`` returns CPU_ATTN's
    ``(k_inner, v_inner)`` and is only called for that backend.
    """
    if layout not in ERA_C_LAYOUTS:
        raise LayoutError(f"kv cache layout {layout!r} unknown; expected one of {sorted(ERA_C_LAYOUTS)}")
    if len(shape) != 4:
        raise LayoutError(f"expected per-layer KV tensors of logical shape [B, H, N, C], got {tuple(shape)}")
    num_blocks, num_heads, block_size, content = shape
    if use_mla:
        outer, k_inner, v_inner, head_size_v = ERA_C_LAYOUTS[layout].replace("H", ""), "D", "", 0
        head_size = content
    elif backend in KV_CONCAT_BACKENDS:
        if content % 2 or content // 2 != head_size:
            raise LayoutError(f"{backend}: content {content} is not K||V of head_size {head_size}")
        outer, k_inner, v_inner, head_size_v = ERA_C_LAYOUTS[layout], "D", "D", head_size
    else:
        raise LayoutError(f"attention backend {backend} has no known block interior; "
                          f"supported: {sorted(KV_CONCAT_BACKENDS)}")
    fmt = KVFormat(
        name=f"detected/{backend}/{layout}",
        storage="joint",
        outer=outer,
        k_inner=k_inner,
        v_inner=v_inner,
        num_layers=num_layers,
        num_blocks=num_blocks,
        block_size=block_size,
        num_kv_heads=num_kv_heads,
        head_start=head_start,
        num_heads=num_heads,
        head_size=head_size,
        head_size_v=head_size_v,
        dtype=dtype,
        k_scales=k_scales,
        v_scales=v_scales,
        layer_names=layer_names,
    )
    factors = fmt.factors("k")
    expected = (factors["B"][0][1], factors["H"][0][1], factors["N"][0][1], 1)
    if tuple(strides) != expected:
        raise LayoutError(f"tensor strides {tuple(strides)} do not match layout {layout} (expected {expected})")
    if backend == "CPU_ATTN":
        if cpu_inner is None:
            raise LayoutError("CPU_ATTN needs cpu_inner: its packed interior must be derived from the kernel")
        k_inner, v_inner = cpu_inner()
        fmt = msgspec.structs.replace(fmt, outer="LBH", k_inner=k_inner, v_inner=v_inner)
    return fmt


def detect(vllm_config: Any, kv_caches: Mapping[str, Any]) -> KVFormat:
    """Describe this worker's KV cache (call from ``register_kv_caches``)."""
    from vllm.config.vllm import get_layers_from_vllm_config
    from vllm.distributed.kv_transfer.kv_connector.utils import get_current_attn_backends
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    from vllm_hetero_pd.connector.adapters import load

    adapter = load()
    backends = {b.get_name(): b for b in get_current_attn_backends(vllm_config)}
    if len(backends) != 1:
        raise LayoutError(f"one attention backend per engine is supported, found {sorted(backends)}")
    backend, backend_cls = backends.popitem()
    names = tuple(kv_caches)
    tensors = [kv_caches[n] for n in names]
    first = tensors[0]
    if any(t.shape != first.shape or t.stride() != first.stride() or t.dtype != first.dtype for t in tensors):
        raise LayoutError("KV cache tensors differ in shape, stride or dtype across layers "
                          "(hybrid models are not supported)")
    if len(first.shape) == 4 and first.shape[2] != vllm_config.cache_config.block_size:
        raise LayoutError(f"{backend} registered kernel blocks of {first.shape[2]} tokens for scheduler blocks of "
                          f"{vllm_config.cache_config.block_size}: block ids would not match; pick a --block-size "
                          f"the backend runs natively")
    model = vllm_config.model_config
    tp_rank, tp_size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    total_heads = 1 if model.use_mla else model.get_total_num_kv_heads()
    head_start, _ = head_range(total_heads, tp_rank, tp_size) if not model.use_mla else (0, 1)
    layers = get_layers_from_vllm_config(vllm_config, AttentionLayerBase, list(names))
    dtype, k_scales, v_scales = _stored_dtype_and_scales(vllm_config, first, [layers[n] for n in names])
    return describe(
        backend=backend,
        layout=adapter.kv_cache_layout(vllm_config, backend_cls),
        shape=tuple(first.shape),
        strides=tuple(first.stride()),
        dtype=dtype,
        num_layers=len(names),
        num_kv_heads=total_heads,
        head_start=head_start,
        head_size=model.get_head_size(),
        use_mla=model.use_mla,
        cpu_inner=lambda: _cpu_inner(adapter.cpu_attn_isa(layers[names[0]]), first, model.get_head_size()),
        k_scales=k_scales,
        v_scales=v_scales,
        layer_names=names,
    )


def _stored_dtype_and_scales(vllm_config: Any, first: Any, layers: list[Any]) -> tuple[str, tuple[float, ...],
                                                                                     tuple[float, ...]]:
    """The element dtype as stored, and per-layer K/V scales when the cache is fp8.

    vLLM allocates an fp8 cache as uint8 tensors, so the tensor dtype alone does not say which
    fp8 encoding the bytes hold: that comes from ``cache_dtype`` and the platform.
    """
    dtype = str(first.dtype).removeprefix("torch.")
    cache_dtype = vllm_config.cache_config.cache_dtype
    if not cache_dtype.startswith("fp8"):
        return dtype, (), ()
    from vllm.platforms import current_platform

    dtype = "float8_e5m2" if cache_dtype == "fp8_e5m2" else str(current_platform.fp8_dtype()).removeprefix("torch.")
    return (dtype, tuple(float(layer._k_scale_float) for layer in layers),
            tuple(float(layer._v_scale_float) for layer in layers))


def _cpu_inner(isa: str, first: Any, head_size: int) -> tuple[str, str]:
    """CPU_ATTN's ``(k_inner, v_inner)``, probed through the running kernel (called only for CPU_ATTN)."""
    from vllm_hetero_pd.connector.cpu_attn import derive_inner

    if first.element_size() == 1:
        raise LayoutError("CPU_ATTN fp8 packing is not derived (needs an AVX-512/AMX host); use --kv-cache-dtype auto")
    return derive_inner(isa, first.dtype, first.shape[2], head_size)
