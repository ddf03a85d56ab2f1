"""Latencies a plan is predicted to deliver at the requested rate (not at its capacity limit).

The router spreads requests in proportion to per-instance capacity (the weights ``emit`` gives
it), so every instance of a pool runs at the same fraction of its capacity.
"""

from __future__ import annotations

import msgspec

from vllm_hetero_pd.planner import colocated, perf
from vllm_hetero_pd.planner.catalog import Catalog
from vllm_hetero_pd.planner.model import ModelSpec
from vllm_hetero_pd.planner.search import Entry, Plan
from vllm_hetero_pd.planner.workload import Slo, Workload


def _load_per_instance(entries: tuple[Entry, ...], rate: float) -> list[float]:
    total = sum(e.count * e.capacity_per_instance for e in entries)
    return [rate * e.capacity_per_instance / total for e in entries]


def _transfer(model: ModelSpec, catalog: Catalog, workload: Workload, prefill: Entry, decode: Entry,
              overlap_s: float) -> float:
    """KV hand-off from a ``prefill`` entry's instance to a ``decode`` entry's."""
    src, dst = catalog.device(prefill.device), catalog.device(decode.device)
    return perf.kv_transfer_s(model, src, prefill.tp, perf.endpoint(dst, decode.tp, decode.ep),
                              catalog.link(src, dst), workload.isl, overlap_s)


def predict(plan: Plan, model: ModelSpec, catalog: Catalog, workload: Workload, slo: Slo,
            layerwise: bool = False) -> Plan:
    """The plan with ``ttft_s`` / ``tpot_s`` filled in for every entry (quantile ``slo.quantile``),
    and for prefill entries the worst KV hand-off, as run and if it were sent layer by layer."""
    q = slo.quantile
    if plan.mode == "colocated":
        loads = _load_per_instance(plan.colocated, plan.rate)
        entries = []
        for e, load in zip(plan.colocated, loads):
            ttft, tpot = colocated.predict(model, catalog.device(e.device), e.tp, workload, load, q)
            entries.append(msgspec.structs.replace(e, ttft_s=ttft, tpot_s=tpot))
        return msgspec.structs.replace(plan, colocated=tuple(entries))

    decode = []
    for e, load in zip(plan.decode, _load_per_instance(plan.decode, plan.rate)):
        tpot = perf.decode_tpot_s(model, catalog.device(e.device), e.tp, workload, load, q, ep=e.ep)
        decode.append(msgspec.structs.replace(e, tpot_s=tpot))
    prefill = []
    for e, load in zip(plan.prefill, _load_per_instance(plan.prefill, plan.rate)):
        dev = catalog.device(e.device)
        service = perf.prefill_s(model, dev, e.tp, workload.isl)
        overlap = service - dev.prefill_overhead_s
        planned = overlap if layerwise else 0.0
        handoffs = [(_transfer(model, catalog, workload, e, d, planned) + d.tpot_s, d) for d in decode]
        handoff, worst = max(handoffs, key=lambda h: h[0])  # the slowest decode instance the router may pick
        prefill.append(msgspec.structs.replace(e, ttft_s=perf.prefill_ttft_s(service, handoff, load, q),
                                               kv_s=handoff - worst.tpot_s,
                                               kv_layerwise_s=_transfer(model, catalog, workload, e, worst, overlap)))
    return msgspec.structs.replace(plan, prefill=tuple(prefill), decode=tuple(decode))
