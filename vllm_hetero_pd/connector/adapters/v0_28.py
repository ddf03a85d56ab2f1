"""vLLM 0.26-0.28 (layout era B): the connector API before ``get_transfer_results``.

Differences from 0.32 that live here (file:line in ``docs/compatibility.md``):

* the model runner calls ``get_finished`` and has no ``failed_recving``: a failed load is
  reported as received, and its blocks through ``get_block_ids_with_load_errors`` (the
  receiver does both for every failure), which the scheduler turns into a failed receive;
* there is no ``has_pending_block_frees`` (nor ``get_mem_pool_context`` and the other 0.32
  additions), so nothing is defined for them;
* per-layer tensors have the logical shape ``(NB, H, BS, 2*D)`` with the backend's stride
  order: the same bytes as an era-C ``LBHNC`` (identity order, "HND") or ``LBNHC`` ("NHD");
* CPU_ATTN keeps its kernel ISA on the layer's ``impl``.
"""

from __future__ import annotations

from typing import Any

from vllm_hetero_pd.formats.format import LayoutError

ERA = "B"

# get_kv_cache_stride_order() of a logical (NB, H, BS, 2*D) tensor -> the era-C layout of those bytes.
STRIDE_ORDER_LAYOUTS: dict[tuple[int, ...], str] = {(0, 1, 2, 3): "LBHNC", (0, 2, 1, 3): "LBNHC"}


class ConnectorAPI:
    """Release-specific methods of ``HeteroNixlConnector`` (mixed in ahead of ``KVConnectorBase_V1``)."""

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        results = self.worker.get_transfer_results(self._bound())
        return results.finished_sending, results.finished_recving  # failures included; blocks reported apart


def kv_cache_layout(vllm_config: Any, backend: Any) -> str:
    """The layout of the backend's stride order, as ``_reshape_kv_cache_tensors`` applies it
    (a backend without one stores the logical order)."""
    try:
        order = tuple(backend.get_kv_cache_stride_order())
    except (AttributeError, NotImplementedError):
        order = (0, 1, 2, 3)
    if order not in STRIDE_ORDER_LAYOUTS:
        raise LayoutError(f"{backend.get_name()}: KV cache stride order {order} has no known layout; "
                          f"expected one of {sorted(STRIDE_ORDER_LAYOUTS)}")
    return STRIDE_ORDER_LAYOUTS[order]


def cpu_attn_isa(layer: Any) -> str:
    return layer.impl.isa
