"""Exact joint search for the cheapest deployment that meets the SLO at the requested rate.

The search space: a prefill pool and a decode pool (or one colocated pool), each of 1 to
``max_entries`` entries (device, TP, count), count <= ``max_instances``; mixing device types and TP
degrees inside a pool is allowed. A plan is feasible when each pool's summed per-instance capacity
(``perf``) covers the rate, the devices fit the inventory and the $/h fits the budget. We minimise
$/h, which at a fixed rate is the same as minimising $/Mtok.

Why enumeration is exact and small: with positive prices, lowering any count lowers cost and
device use, so some optimum consists of *minimal* pools (no count can drop without losing
coverage). A minimal pool is fixed by its entries and the count of all but its last entry,
so there are O(options^2 x max_instances) of them per phase. Prefill capacity depends on the
decode pool only through the decode KV formats (transfer, shim), so we group decode pools by
their set of KV endpoints and pair each group with the prefill pools valid for it, cheapest first.
"""

from __future__ import annotations

import itertools
import math

import msgspec
import numpy as np

from vllm_hetero_pd.planner import perf
from vllm_hetero_pd.planner.catalog import Catalog, Device
from vllm_hetero_pd.planner.colocated import capacity as colocated_capacity
from vllm_hetero_pd.planner.model import ModelSpec
from vllm_hetero_pd.planner.workload import Slo, Workload

COVER_TOLERANCE = 1e-9  # relative slack when checking that capacity covers the rate


class SearchError(ValueError):
    """The search inputs are inconsistent (no devices, zero inventory); the message says which."""


class SearchSpace(msgspec.Struct, frozen=True, kw_only=True):
    """Which plans the search may return."""

    prefill_devices: tuple[str, ...]
    decode_devices: tuple[str, ...]
    colocated_devices: tuple[str, ...]
    tp_degrees: tuple[int, ...] = perf.TP_DEGREES
    max_instances: int = 64
    max_entries: int = 2
    inventory: dict[str, int] | None = None  # devices per type; None = unlimited
    budget_per_hour: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.max_entries <= 2:
            raise SearchError(f"--max-entries must be 1 or 2, got {self.max_entries}")
        if self.max_instances < 1:
            raise SearchError(f"--max-instances must be >= 1, got {self.max_instances}")
        if self.inventory is not None and sum(self.inventory.values()) <= 0:
            raise SearchError("--inventory lists no devices (every count is 0); give at least one "
                              "NAME=COUNT with COUNT > 0, or drop --inventory for unlimited devices")
        if self.budget_per_hour is not None and self.budget_per_hour <= 0:
            raise SearchError(f"--budget must be > 0 $/h, got {self.budget_per_hour}")


class Option(msgspec.Struct, frozen=True, kw_only=True):
    """One (device, TP) instance shape with its per-instance capacity for one role; ``ep`` marks
    an MoE decode instance of ``tp`` ranks with data-parallel attention and expert parallelism."""

    device: str
    tp: int
    price_per_hour: float
    capacity: perf.Capacity
    ep: bool = False


class Entry(msgspec.Struct, frozen=True, kw_only=True):
    """``count`` instances of one shape in a pool, with the latencies predicted at their share of load."""

    device: str
    tp: int
    count: int
    capacity_per_instance: float
    binding: str
    price_per_hour: float  # all instances of the entry
    max_num_seqs: int  # vLLM's running-sequence cap the capacity assumes (per engine)
    ep: bool = False  # data-parallel attention + expert parallelism over the tp ranks
    ttft_s: float | None = None
    tpot_s: float | None = None

    @property
    def num_devices(self) -> int:
        return self.count * self.tp


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    """A deployment: disaggregated (prefill + decode pools) or colocated (one pool)."""

    mode: str  # "disaggregated" | "colocated"
    rate: float
    output_tokens_per_s: float
    cost_per_hour: float
    cost_per_mtok: float  # $ per million output tokens
    cost_per_mtok_all: float  # $ per million input + output tokens
    prefill: tuple[Entry, ...] = ()
    decode: tuple[Entry, ...] = ()
    colocated: tuple[Entry, ...] = ()

    @property
    def entries(self) -> tuple[Entry, ...]:
        return self.prefill + self.decode + self.colocated

    @property
    def ttft_s(self) -> float | None:
        """Worst predicted TTFT quantile over the entries (None before ``predict`` fills them in)."""
        return _worst(e.ttft_s for e in self.prefill + self.colocated)

    @property
    def tpot_s(self) -> float | None:
        """Worst predicted TPOT quantile over the entries (None before ``predict``)."""
        return _worst(e.tpot_s for e in self.decode + self.colocated)

    def describe(self) -> str:
        def pool(entries: tuple[Entry, ...]) -> str:
            return " + ".join(f"{e.count}x {e.device} {'EP' if e.ep else 'TP'}{e.tp}" for e in entries)
        if self.mode == "colocated":
            return f"colocated [{pool(self.colocated)}]"
        return f"prefill [{pool(self.prefill)}] : decode [{pool(self.decode)}]"


def _worst(values) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


class SearchResult(msgspec.Struct, frozen=True, kw_only=True):
    """The winner, the best of each mode, and every option's capacity (for --explain)."""

    best: Plan | None
    best_disaggregated: Plan | None
    best_colocated: Plan | None
    prefill_options: tuple[Option, ...]
    decode_options: tuple[Option, ...]
    colocated_options: tuple[Option, ...]


class _Candidates(msgspec.Struct, frozen=True):
    """Minimal pools of one role as parallel arrays, sorted by cost (entry 2 = -1 when absent)."""

    opt1: np.ndarray
    n1: np.ndarray
    opt2: np.ndarray
    n2: np.ndarray
    cost: np.ndarray
    usage: np.ndarray  # (num_candidates, num_device_types) devices used


def _minimal_pools(rates: np.ndarray, prices: np.ndarray, type_ids: np.ndarray, tps: np.ndarray,
                   rate: float, space: SearchSpace, num_types: int) -> _Candidates:
    """All minimal pools of at most ``max_entries`` options covering ``rate``, cheapest first."""
    need = rate * (1 - COVER_TOLERANCE)
    max_n = space.max_instances
    usable = np.flatnonzero(rates > 0)
    parts: list[tuple[np.ndarray, ...]] = []
    # single entries: the fewest instances that cover the rate
    n = np.ceil(need / rates[usable]).astype(np.int64)
    keep = n <= max_n
    parts.append((usable[keep], n[keep], np.full(keep.sum(), -1), np.zeros(keep.sum(), np.int64)))
    if space.max_entries >= 2 and len(usable) >= 2:
        i, j = (np.array(x) for x in zip(*itertools.combinations(usable, 2)))
        counts = np.arange(1, max_n + 1)
        ii, nn = np.repeat(i, max_n), np.tile(counts, len(i))
        jj = np.repeat(j, max_n)
        rest = need - nn * rates[ii]
        nj = np.ceil(rest / rates[jj]).astype(np.int64)
        # minimal: the second entry is needed, fits the cap, and the first cannot drop one instance
        keep = (rest > 0) & (nj <= max_n) & ((nn - 1) * rates[ii] + nj * rates[jj] < need)
        parts.append((ii[keep], nn[keep], jj[keep], nj[keep]))
    opt1, n1, opt2, n2 = (np.concatenate(x) for x in zip(*parts))
    has2 = opt2 >= 0
    o2 = np.where(has2, opt2, 0)
    cost = n1 * prices[opt1] + np.where(has2, n2 * prices[o2], 0.0)
    usage = np.zeros((len(opt1), num_types))
    np.add.at(usage, (np.arange(len(opt1)), type_ids[opt1]), n1 * tps[opt1])
    np.add.at(usage, (np.arange(len(opt1)), type_ids[o2]), np.where(has2, n2 * tps[o2], 0))
    order = np.lexsort((usage.sum(axis=1), cost))  # cheapest, then fewest devices
    return _Candidates(opt1[order], n1[order], opt2[order], n2[order], cost[order], usage[order])


def _within_limits(cands: _Candidates, inventory: np.ndarray, budget: float) -> np.ndarray:
    return (cands.usage <= inventory).all(axis=1) & (cands.cost <= budget * (1 + COVER_TOLERANCE))


class _Catalogued(msgspec.Struct, frozen=True):
    """Options of one role as numpy arrays for ``_minimal_pools``."""

    options: tuple[Option, ...]
    prices: np.ndarray
    type_ids: np.ndarray
    tps: np.ndarray


def _options(devices: list[Device], space: SearchSpace, type_index: dict[str, int],
             capacity, expert_parallel: bool = False) -> _Catalogued:
    """Every (device, TP) shape, plus EP shapes of more than one rank when ``expert_parallel``;
    ``capacity(device, tp, ep)`` gives each its per-instance capacity."""
    shapes = [(tp, False) for tp in space.tp_degrees] + [(tp, True) for tp in space.tp_degrees
                                                         if expert_parallel and tp > 1]
    options = tuple(Option(device=d.name, tp=tp, ep=ep, price_per_hour=tp * d.price_per_hour,
                           capacity=capacity(d, tp, ep)) for d in devices for tp, ep in shapes)
    return _Catalogued(options, np.array([o.price_per_hour for o in options]),
                       np.array([type_index[o.device] for o in options], dtype=np.int64),
                       np.array([o.tp for o in options], dtype=np.int64))


def _entries(cat: _Catalogued, opt1: int, n1: int, opt2: int, n2: int,
             rates: np.ndarray) -> tuple[Entry, ...]:
    picks = [(opt1, n1)] + ([(opt2, n2)] if opt2 >= 0 else [])
    return tuple(Entry(device=cat.options[o].device, tp=cat.options[o].tp, count=int(n),
                       capacity_per_instance=float(rates[o]), binding=cat.options[o].capacity.binding,
                       price_per_hour=int(n) * cat.options[o].price_per_hour,
                       max_num_seqs=cat.options[o].capacity.max_num_seqs, ep=cat.options[o].ep) for o, n in picks)


def _make_plan(mode: str, workload: Workload, pools: dict[str, tuple[Entry, ...]]) -> Plan:
    cost = sum(e.price_per_hour for entries in pools.values() for e in entries)
    tokens_s = workload.rate * workload.osl
    all_tokens_s = workload.rate * (workload.isl + workload.osl)
    return Plan(mode=mode, rate=workload.rate, output_tokens_per_s=tokens_s, cost_per_hour=cost,
                cost_per_mtok=cost / (tokens_s * 3600) * 1e6, cost_per_mtok_all=cost / (all_tokens_s * 3600) * 1e6,
                **pools)


class Prepared(msgspec.Struct, frozen=True):
    """Everything the search needs that does not depend on the rate: options and their capacities."""

    space: SearchSpace
    type_index: dict[str, int]
    inventory: np.ndarray
    budget: float
    prefill: _Catalogued  # reported per option: the worst KV hand-off
    prefill_rates: np.ndarray  # (decode KV endpoints, prefill options)
    decode: _Catalogued
    colocated: _Catalogued
    endpoint_of: dict[str, int]


def prepare(model: ModelSpec, catalog: Catalog, workload: Workload, slo: Slo, space: SearchSpace) -> Prepared:
    """Per-instance capacity of every (device, TP) option in every role (``workload.rate`` unused)."""
    names = sorted({*space.prefill_devices, *space.decode_devices, *space.colocated_devices})
    if not names:
        raise SearchError("no devices to search; name some with --devices or the per-role flags")
    devices = {n: catalog.device(n) for n in names}
    type_index = {d.name: i for i, d in enumerate(devices.values())}
    inventory = np.array([math.inf if space.inventory is None else space.inventory.get(d, 0)
                          for d in type_index], dtype=float)

    decode_devs = [devices[n] for n in sorted(set(space.decode_devices))]
    prefill_devs = [devices[n] for n in sorted(set(space.prefill_devices))]
    endpoints = sorted({(d.vendor, d.kv_format) for d in decode_devs}) if prefill_devs else []
    sample = {ep: next(d for d in decode_devs if (d.vendor, d.kv_format) == ep) for ep in endpoints}

    decode = _options(decode_devs if endpoints else [], space, type_index,
                      lambda d, tp, ep: perf.decode_capacity(model, d, tp, workload, slo, ep),
                      expert_parallel=model.num_experts > 0)
    colocated = _options([devices[n] for n in sorted(set(space.colocated_devices))], space, type_index,
                         lambda d, tp, _: colocated_capacity(model, d, tp, workload, slo))
    per_endpoint = [_options(prefill_devs, space, type_index,
                             lambda d, tp, _, end=end: perf.prefill_capacity(
                                 model, d, tp, workload, slo, catalog.link(d, sample[end]), end[1]))
                    for end in endpoints]
    prefill_rates = np.array([[o.capacity.rate for o in c.options] for c in per_endpoint])
    prefill = (min(per_endpoint, key=lambda c: sum(o.capacity.rate for o in c.options)) if per_endpoint
               else _options([], space, type_index, None))
    return Prepared(space=space, type_index=type_index, inventory=inventory,
                    budget=math.inf if space.budget_per_hour is None else space.budget_per_hour,
                    prefill=prefill, prefill_rates=prefill_rates, decode=decode, colocated=colocated,
                    endpoint_of={d.name: endpoints.index((d.vendor, d.kv_format))
                                 for d in decode_devs if endpoints})


def solve(prepared: Prepared, workload: Workload) -> SearchResult:
    """Cheapest disaggregated and colocated plans at ``workload.rate`` (None where infeasible)."""
    best_disagg = _search_disaggregated(prepared, workload) if prepared.decode.options else None
    best_coloc = _search_colocated(prepared, workload)
    plans = [p for p in (best_disagg, best_coloc) if p is not None]
    best = min(plans, key=lambda p: (p.cost_per_hour, p.mode != "disaggregated")) if plans else None
    return SearchResult(best=best, best_disaggregated=best_disagg, best_colocated=best_coloc,
                        prefill_options=prepared.prefill.options, decode_options=prepared.decode.options,
                        colocated_options=prepared.colocated.options)


def search(model: ModelSpec, catalog: Catalog, workload: Workload, slo: Slo,
           space: SearchSpace) -> SearchResult:
    """Cheapest disaggregated and colocated plans (``best`` is the cheaper; None if infeasible)."""
    return solve(prepare(model, catalog, workload, slo, space), workload)


def _search_colocated(prep: Prepared, workload: Workload) -> Plan | None:
    colocated, inventory, budget = prep.colocated, prep.inventory, prep.budget
    if not colocated.options:
        return None
    rates = np.array([o.capacity.rate for o in colocated.options])
    cands = _minimal_pools(rates, colocated.prices, colocated.type_ids, colocated.tps, workload.rate,
                           prep.space, len(prep.type_index))
    ok = np.flatnonzero(_within_limits(cands, inventory, budget))
    if not len(ok):
        return None
    k = ok[0]
    entries = _entries(colocated, cands.opt1[k], cands.n1[k], cands.opt2[k], cands.n2[k], rates)
    return _make_plan("colocated", workload, {"colocated": entries})


def _search_disaggregated(prep: Prepared, workload: Workload) -> Plan | None:
    space, inventory, budget = prep.space, prep.inventory, prep.budget
    decode, prefill, prefill_rates, endpoint_of = prep.decode, prep.prefill, prep.prefill_rates, prep.endpoint_of
    num_types = len(prep.type_index)
    decode_rates = np.array([o.capacity.rate for o in decode.options])
    dec = _minimal_pools(decode_rates, decode.prices, decode.type_ids, decode.tps, workload.rate,
                         space, num_types)
    dec_ok = _within_limits(dec, inventory, budget)
    ep = np.array([endpoint_of[o.device] for o in decode.options], dtype=np.int64)
    ep1 = ep[dec.opt1]
    ep2 = np.where(dec.opt2 >= 0, ep[np.maximum(dec.opt2, 0)], ep1)
    best_cost, best = math.inf, None
    for group in sorted({(min(a, b), max(a, b)) for a, b in zip(ep1, ep2)}):
        in_group = np.flatnonzero(dec_ok & (np.minimum(ep1, ep2) == group[0])
                                  & (np.maximum(ep1, ep2) == group[1]))
        if not len(in_group):
            continue
        rates = prefill_rates[list(set(group))].min(axis=0)  # worst KV hand-off of the group
        pre = _minimal_pools(rates, prefill.prices, prefill.type_ids, prefill.tps, workload.rate,
                             space, num_types)
        pre_ok = np.flatnonzero(_within_limits(pre, inventory, budget))
        if not len(pre_ok):
            continue
        pre_cost, pre_usage = pre.cost[pre_ok], pre.usage[pre_ok]
        for k in in_group:  # decode pools cheapest first
            if dec.cost[k] + pre_cost[0] >= best_cost:
                break
            total = dec.cost[k] + pre_cost
            fits = (total < best_cost) & (total <= budget * (1 + COVER_TOLERANCE))
            for t in np.flatnonzero(dec.usage[k] > 0):
                fits &= pre_usage[:, t] + dec.usage[k, t] <= inventory[t]
            hit = np.flatnonzero(fits)
            if len(hit):
                p = pre_ok[hit[0]]
                best_cost = float(total[hit[0]])
                best = (_entries(prefill, pre.opt1[p], pre.n1[p], pre.opt2[p], pre.n2[p], rates),
                        _entries(decode, dec.opt1[k], dec.n1[k], dec.opt2[k], dec.n2[k], decode_rates))
    if best is None:
        return None
    return _make_plan("disaggregated", workload, {"prefill": best[0], "decode": best[1]})


def _closest_miss(options: tuple[Option, ...]) -> str:
    """The infeasibility reason of the option that misses the SLO by the least."""
    misses = [o.capacity for o in options if o.capacity.rate == 0]
    slo_misses = [c for c in misses if c.floor_s > 0]
    pick = min(slo_misses, key=lambda c: c.floor_s) if slo_misses else misses[0]
    return pick.reason


def diagnose(model: ModelSpec, catalog: Catalog, workload: Workload, slo: Slo, space: SearchSpace,
             result: SearchResult) -> str:
    """Why no plan was found, with numbers: an SLO floor, the instance cap, inventory or budget."""
    reasons = []
    for role, options in (("prefill", result.prefill_options), ("decode", result.decode_options),
                          ("colocated", result.colocated_options)):
        if options and all(o.capacity.rate == 0 for o in options):
            reasons.append(f"no {role} option meets the SLO; closest: {_closest_miss(options)}")
    if reasons:
        return "; ".join(reasons)
    # single-entry pools keep this cheap at any count; the point is to show which limit binds
    loose = msgspec.structs.replace(space, inventory=None, budget_per_hour=None, max_instances=1 << 20,
                                    max_entries=1)
    free = search(model, catalog, workload, slo, loose).best
    if free is None:
        return "no plan found even without inventory, budget and instance limits"
    problems = []
    if any(e.count > space.max_instances for e in free.entries):
        problems.append(f"it needs {max(e.count for e in free.entries)} instances in one entry > "
                        f"--max-instances {space.max_instances}")
    if space.inventory is not None:
        used: dict[str, int] = {}
        for e in free.entries:
            used[e.device] = used.get(e.device, 0) + e.num_devices
        problems += [f"it uses {n} {d} > inventory {space.inventory.get(d, 0)}"
                     for d, n in used.items() if n > space.inventory.get(d, 0)]
    if space.budget_per_hour is not None and free.cost_per_hour > space.budget_per_hour:
        problems.append(f"it costs ${free.cost_per_hour:.2f}/h > budget ${space.budget_per_hour:.2f}/h")
    return (f"without limits the cheapest plan is {free.describe()} at ${free.cost_per_hour:.2f}/h, but "
            + "; ".join(problems or ["no combination within the limits covers the rate"]))


class Alternative(msgspec.Struct, frozen=True, kw_only=True):
    """The best plan when each phase is restricted to one device type (or one colocated type)."""

    label: str
    plan: Plan | None
    reason: str = ""


def alternatives(model: ModelSpec, catalog: Catalog, workload: Workload, slo: Slo,
                 space: SearchSpace) -> list[Alternative]:
    """Best plan per (prefill type, decode type) pair and per colocated type, for --explain."""
    out = []
    combos = [((p,), (d,), ()) for p in space.prefill_devices for d in space.decode_devices]
    combos += [((), (), (c,)) for c in space.colocated_devices]
    for prefill, decode, colocated in combos:
        sub = msgspec.structs.replace(space, prefill_devices=prefill, decode_devices=decode,
                                      colocated_devices=colocated)
        res = search(model, catalog, workload, slo, sub)
        label = f"{prefill[0]}:{decode[0]}" if prefill else f"colocated {colocated[0]}"
        out.append(Alternative(label=label, plan=res.best,
                               reason="" if res.best else diagnose(model, catalog, workload, slo, sub, res)))
    return out
