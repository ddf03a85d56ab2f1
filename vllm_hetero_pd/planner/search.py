"""Exact joint search for the cheapest deployment that meets the SLO at the requested rate.

The search space: a prefill pool and a decode pool (or one colocated pool), each of 1 to
``max_entries`` entries (device, TP, count), count <= ``max_instances``; mixing device types and TP
degrees inside a pool is allowed. A plan is feasible when each pool's summed per-instance capacity
(``perf``), less ``redundancy`` of its largest instances, covers the rate with ``headroom`` to
spare, the devices fit the inventory and the $/h fits the budget. Devices are paid per
``granularity`` (whole nodes, say): the cost is each type's devices rounded up to its granule.

Why enumeration is exact: cost and device use only grow with counts, so some optimum consists of
*minimal* pools (``pools``). Prefill capacity depends on the decode pool only through the decode
endpoints (``perf.Endpoint``: vendor, KV format, NIC, lanes), so decode pools are grouped by their
endpoint set and each group is paired with the prefill pools valid for it, cheapest first, with
raw instance cost (a lower bound of the rounded cost) as the bound. Pools of more than two entries
are searched after the best plan of at most two is known, whose cost bounds their enumeration.
"""

from __future__ import annotations

import math

import msgspec
import numpy as np

from vllm_hetero_pd.planner import perf
from vllm_hetero_pd.planner.catalog import Catalog, Device
from vllm_hetero_pd.planner.colocated import capacity as colocated_capacity
from vllm_hetero_pd.planner.model import ModelSpec
from vllm_hetero_pd.planner.pools import TOLERANCE, Limits, Options, Pools, minimal_pools
from vllm_hetero_pd.planner.workload import Slo, Workload

MAX_ENTRIES = 4  # default (device, TP) entries per pool


class SearchError(ValueError):
    """The search inputs are inconsistent (no devices, zero inventory); the message says which."""


class SearchSpace(msgspec.Struct, frozen=True, kw_only=True):
    """Which plans the search may return."""

    prefill_devices: tuple[str, ...]
    decode_devices: tuple[str, ...]
    colocated_devices: tuple[str, ...]
    tp_degrees: tuple[int, ...] = perf.TP_DEGREES
    max_instances: int = 64
    max_entries: int = MAX_ENTRIES
    inventory: dict[str, int] | None = None  # devices per type; None = unlimited
    budget_per_hour: float | None = None
    granularity: dict[str, int] = {}  # devices per rented unit (a node); unlisted types: 1
    redundancy: int = 0  # instances each pool may lose (N+k)
    headroom: float = 0.0  # planned load <= (1 - headroom) x capacity
    layerwise_kv: bool = False  # KV sent layer by layer during the prefill (vLLM's NIXL sends after)

    def __post_init__(self) -> None:
        if self.max_entries < 1:
            raise SearchError(f"--max-entries must be >= 1, got {self.max_entries}")
        if self.redundancy < 0 or not 0 <= self.headroom < 1:
            raise SearchError(f"--redundancy must be >= 0 and --headroom in [0, 1), got {self.redundancy} "
                              f"and {self.headroom}")
        if any(g < 1 for g in self.granularity.values()):
            raise SearchError(f"--granularity values must be >= 1 device, got {self.granularity}")
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
    kv_s: float | None = None  # prefill entries: worst KV hand-off as planned
    kv_layerwise_s: float | None = None  # the same if sent layer by layer during the prefill

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
    paid_devices: dict[str, int] = {}  # per type, rounded up to whole rented units
    redundancy: int = 0
    headroom: float = 0.0

    @property
    def idle_devices(self) -> int:
        """Devices paid for (whole units) that no instance uses: spares in the plan's nodes."""
        return sum(self.paid_devices.values()) - sum(e.num_devices for e in self.entries)

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


class _Catalogued(msgspec.Struct, frozen=True):
    """Options of one role, and their numeric view for ``pools``."""

    options: tuple[Option, ...]
    numeric: Options


def _options(devices: list[Device], space: SearchSpace, type_index: dict[str, int],
             capacity, expert_parallel: bool = False) -> _Catalogued:
    """Every (device, TP) shape, plus EP shapes of more than one rank when ``expert_parallel``;
    ``capacity(device, tp, ep)`` gives each its per-instance capacity."""
    shapes = [(tp, False) for tp in space.tp_degrees] + [(tp, True) for tp in space.tp_degrees
                                                         if expert_parallel and tp > 1]
    options = tuple(Option(device=d.name, tp=tp, ep=ep, price_per_hour=tp * d.price_per_hour,
                           capacity=capacity(d, tp, ep)) for d in devices for tp, ep in shapes)
    return _Catalogued(options, Options(rates=np.array([o.capacity.rate for o in options]),
                                        prices=np.array([o.price_per_hour for o in options]),
                                        type_ids=np.array([type_index[o.device] for o in options], dtype=np.int64),
                                        devices=np.array([o.tp for o in options], dtype=np.int64)))


def _entries(cat: _Catalogued, rates: np.ndarray, opts: np.ndarray, counts: np.ndarray) -> tuple[Entry, ...]:
    return tuple(Entry(device=cat.options[o].device, tp=cat.options[o].tp, count=int(n),
                       capacity_per_instance=float(rates[o]), binding=cat.options[o].capacity.binding,
                       price_per_hour=int(n) * cat.options[o].price_per_hour,
                       max_num_seqs=cat.options[o].capacity.max_num_seqs, ep=cat.options[o].ep)
                 for o, n in zip(opts, counts) if o >= 0)


class Prepared(msgspec.Struct, frozen=True):
    """Everything the search needs that does not depend on the rate: options and their capacities."""

    space: SearchSpace
    type_index: dict[str, int]
    inventory: np.ndarray
    granule: np.ndarray  # devices per rented unit, per type
    device_price: np.ndarray  # $/h per device, per type
    budget: float
    prefill: _Catalogued  # reported per option: the worst KV hand-off
    prefill_rates: np.ndarray  # (decode KV endpoints, prefill options)
    decode: _Catalogued
    decode_endpoint: np.ndarray  # endpoint index of each decode option
    colocated: _Catalogued

    def paid_cost(self, usage: np.ndarray) -> np.ndarray:
        """$/h of device use ``usage`` (rows of devices per type), each type rounded up to its granule."""
        return (np.ceil(usage / self.granule - TOLERANCE) * self.granule * self.device_price).sum(axis=-1)

    def limits(self, max_entries: int) -> Limits:
        return Limits(max_entries=max_entries, max_count=self.space.max_instances, spare=self.space.redundancy,
                      inventory=self.inventory)


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
    decode = _options(decode_devs if prefill_devs else [], space, type_index,
                      lambda d, tp, ep: perf.decode_capacity(model, d, tp, workload, slo, ep),
                      expert_parallel=model.num_experts > 0)
    ends = [perf.endpoint(devices[o.device], o.tp, o.ep) for o in decode.options]
    endpoints = sorted(set(ends))
    colocated = _options([devices[n] for n in sorted(set(space.colocated_devices))], space, type_index,
                         lambda d, tp, _: colocated_capacity(model, d, tp, workload, slo))
    per_endpoint = [_options(prefill_devs, space, type_index,
                             lambda d, tp, _, end=end: perf.prefill_capacity(
                                 model, d, tp, workload, slo, catalog.link(d, end), end, space.layerwise_kv))
                    for end in endpoints]
    prefill_rates = np.array([c.numeric.rates for c in per_endpoint])
    prefill = (min(per_endpoint, key=lambda c: c.numeric.rates.sum()) if per_endpoint
               else _options([], space, type_index, None))
    return Prepared(space=space, type_index=type_index, inventory=inventory,
                    granule=np.array([space.granularity.get(n, 1) for n in type_index], dtype=float),
                    device_price=np.array([devices[n].price_per_hour for n in type_index]),
                    budget=math.inf if space.budget_per_hour is None else space.budget_per_hour,
                    prefill=prefill, prefill_rates=prefill_rates, decode=decode,
                    decode_endpoint=np.array([endpoints.index(e) for e in ends], dtype=np.int64), colocated=colocated)


def solve(prepared: Prepared, workload: Workload) -> SearchResult:
    """Cheapest disaggregated and colocated plans at ``workload.rate`` (None where infeasible);
    on a cost tie the colocated plan wins: it is the simpler one to run."""
    best_disagg = _search_disaggregated(prepared, workload) if prepared.decode.options else None
    best_coloc = _search_colocated(prepared, workload)
    plans = [p for p in (best_coloc, best_disagg) if p is not None]
    best = min(plans, key=lambda p: p.cost_per_hour * (1 + TOLERANCE * (p.mode != "colocated"))) if plans else None
    return SearchResult(best=best, best_disaggregated=best_disagg, best_colocated=best_coloc,
                        prefill_options=prepared.prefill.options, decode_options=prepared.decode.options,
                        colocated_options=prepared.colocated.options)


def search(model: ModelSpec, catalog: Catalog, workload: Workload, slo: Slo,
           space: SearchSpace) -> SearchResult:
    """Cheapest disaggregated and colocated plans (``best`` is the cheaper; None if infeasible)."""
    return solve(prepare(model, catalog, workload, slo, space), workload)


def _need(prep: Prepared, workload: Workload) -> float:
    """Capacity each pool must provide: the rate plus the headroom left free."""
    return workload.rate / (1 - prep.space.headroom)


def _phases(prep: Prepared):
    """Entry limits to search in turn: up to two entries first, whose best plan bounds the rest."""
    k = prep.space.max_entries
    return [k] if k <= 2 else [2, k]


def _make_plan(prep: Prepared, mode: str, workload: Workload, usage: np.ndarray,
               pools: dict[str, tuple[Entry, ...]]) -> Plan:
    cost = float(prep.paid_cost(usage))
    tokens_s = workload.rate * workload.osl
    all_tokens_s = workload.rate * (workload.isl + workload.osl)
    paid = np.ceil(usage / prep.granule - TOLERANCE) * prep.granule
    return Plan(mode=mode, rate=workload.rate, output_tokens_per_s=tokens_s, cost_per_hour=cost,
                cost_per_mtok=cost / (tokens_s * 3600) * 1e6, cost_per_mtok_all=cost / (all_tokens_s * 3600) * 1e6,
                paid_devices={n: int(paid[i]) for n, i in prep.type_index.items() if paid[i] > 0},
                redundancy=prep.space.redundancy, headroom=prep.space.headroom, **pools)


def _search_colocated(prep: Prepared, workload: Workload) -> Plan | None:
    cat = prep.colocated
    if not cat.options:
        return None
    best_cost, best = prep.budget * (1 + TOLERANCE), None
    for k in _phases(prep):
        cands = minimal_pools(cat.numeric, _need(prep, workload), prep.limits(k), limit=best_cost)
        if not len(cands):
            continue
        paid = prep.paid_cost(cands.usage)
        i = int(np.argmin(paid))
        if paid[i] < best_cost:
            best_cost, best = float(paid[i]), cands.take(np.array([i]))
    if best is None:
        return None
    entries = _entries(cat, cat.numeric.rates, best.opts[0], best.counts[0])
    return _make_plan(prep, "colocated", workload, best.usage[0], {"colocated": entries})


def _groups(prep: Prepared, dec: Pools) -> dict[tuple[int, ...], np.ndarray]:
    """Decode pools by the set of KV endpoints their entries pull from (pool indices, cheapest first)."""
    ends = np.where(dec.opts >= 0, prep.decode_endpoint[np.maximum(dec.opts, 0)], -1)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, row in enumerate(ends):
        groups.setdefault(tuple(sorted(set(row[row >= 0].tolist()))), []).append(i)
    return {g: np.array(ix) for g, ix in groups.items()}


def _floor(prices: np.ndarray, rates: np.ndarray, need: float) -> float:
    """No pool covering ``need`` costs less than ``need`` at the best $/h per req/s (an LP bound)."""
    usable = rates > 0
    return need * float((prices[usable] / rates[usable]).min()) if usable.any() else math.inf


def _search_disaggregated(prep: Prepared, workload: Workload) -> Plan | None:
    need = _need(prep, workload)
    pre_cat, dec_cat = prep.prefill, prep.decode
    best_cost, best = prep.budget * (1 + TOLERANCE), None
    for k in _phases(prep):
        limits = prep.limits(k)
        pre_floor = _floor(pre_cat.numeric.prices, prep.prefill_rates.max(axis=0), need)  # any endpoints
        dec = minimal_pools(dec_cat.numeric, need, limits, limit=best_cost - pre_floor)
        for group, members in sorted(_groups(prep, dec).items(), key=lambda g: dec.cost[g[1][0]]):
            rates = prep.prefill_rates[list(group)].min(axis=0)  # worst KV hand-off of the group
            if dec.cost[members[0]] + _floor(pre_cat.numeric.prices, rates, need) >= best_cost:
                continue  # even the cheapest decode pool with the cheapest prefill rate cannot win
            pre_opts = msgspec.structs.replace(pre_cat.numeric, rates=rates)
            pre = minimal_pools(pre_opts, need, limits, limit=best_cost - dec.cost[members[0]])
            for i in members:  # decode pools cheapest first
                if not len(pre) or dec.cost[i] + pre.cost[0] >= best_cost:
                    break
                usage = pre.usage + dec.usage[i]
                paid = prep.paid_cost(usage)
                paid[(usage > prep.inventory).any(axis=1) | (paid >= best_cost)] = math.inf
                j = int(np.argmin(paid))
                if paid[j] < best_cost:
                    best_cost = float(paid[j])
                    best = (_entries(pre_cat, rates, pre.opts[j], pre.counts[j]),
                            _entries(dec_cat, dec_cat.numeric.rates, dec.opts[i], dec.counts[i]), usage[j])
    if best is None:
        return None
    return _make_plan(prep, "disaggregated", workload, best[2], {"prefill": best[0], "decode": best[1]})


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
                                    max_entries=1, granularity={})
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
