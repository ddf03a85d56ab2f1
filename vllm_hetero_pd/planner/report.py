"""Turn search results into text, JSON and a chart. Formatting only: no searching here."""

from __future__ import annotations

import math
from pathlib import Path

import msgspec

from vllm_hetero_pd.planner.catalog import Catalog, Device, Link
from vllm_hetero_pd.planner.search import Alternative, Entry, Option, Plan, SearchResult, SearchSpace
from vllm_hetero_pd.planner.sensitivity import Band
from vllm_hetero_pd.planner.workload import Slo, Workload

_COLUMNS = ("role", "device", "TP", "count", "req/s/inst", "TTFT p{q}", "TPOT p{q}", "KV hand-off (layer-wise)",
            "max_num_seqs", "out tok/s", "$/h", "binding")


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return "inf" if math.isinf(seconds) else f"{seconds * 1e3:.1f} ms"


def _entry_row(role: str, e: Entry, plan: Plan, pool: tuple[Entry, ...], workload: Workload) -> list[str]:
    share = e.count * e.capacity_per_instance / sum(x.count * x.capacity_per_instance for x in pool)
    return [role, e.device, f"{e.tp} (EP)" if e.ep else str(e.tp), str(e.count), f"{e.capacity_per_instance:.3g}",
            _ms(e.ttft_s), _ms(e.tpot_s), f"{_ms(e.kv_s)} ({_ms(e.kv_layerwise_s)})" if e.kv_s is not None else "-",
            str(e.max_num_seqs), f"{plan.rate * share * workload.osl:.0f}", f"{e.price_per_hour:.2f}", e.binding]


def _format(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def plan_table(plan: Plan, workload: Workload, slo: Slo) -> str:
    """One row per pool entry plus a total row; latencies are predicted at the requested rate."""
    q = f"{slo.quantile * 100:g}"
    rows = [[c.format(q=q) for c in _COLUMNS]]
    for role, pool in (("prefill", plan.prefill), ("decode", plan.decode), ("colocated", plan.colocated)):
        rows += [_entry_row(role, e, plan, pool, workload) for e in pool]
    devices = sum(e.num_devices for e in plan.entries)
    paid = f" ({plan.idle_devices} idle in paid nodes)" if plan.idle_devices else ""
    rows.append(["total", f"{devices} devices{paid}", "", "", "", "", "", "", "", f"{plan.output_tokens_per_s:.0f}",
                 f"{plan.cost_per_hour:.2f}",
                 f"${plan.cost_per_mtok:.3f}/Mtok out, ${plan.cost_per_mtok_all:.3f}/Mtok in+out"])
    return _format(rows)


def headline(result: SearchResult, workload: Workload, slo: Slo) -> str:
    """Which mode wins and by how much, in one or two lines."""
    best = result.best
    assert best is not None
    lines = [f"{best.mode} plan for {workload.rate:g} req/s (ISL {workload.isl}, OSL {workload.osl}; "
             f"TTFT p{slo.quantile * 100:g} <= {slo.ttft_s * 1e3:g} ms, TPOT p{slo.quantile * 100:g} <= "
             f"{slo.tpot_s * 1e3:g} ms): {best.describe()}"]
    d, c = result.best_disaggregated, result.best_colocated
    if d and c:
        winner, loser = (d, c) if best.mode == "disaggregated" else (c, d)
        ratio = loser.cost_per_hour / winner.cost_per_hour
        verdict = f"is {ratio:.2f}x cheaper than" if ratio >= 1.005 else "costs the same as"
        lines.append(f"{winner.mode} {verdict} the best {loser.mode} plan ({loser.describe()}, "
                     f"${loser.cost_per_hour:.2f}/h)")
    elif d or c:
        lines.append(f"no {'colocated' if d else 'disaggregated'} plan meets the SLO within the limits")
    return "\n".join(lines)


def _option_line(o: Option) -> str:
    cap = o.capacity
    if cap.rate == 0:
        return f"  {o.device} TP{o.tp}: infeasible: {cap.reason}"
    return (f"  {o.device} TP{o.tp}: {cap.rate:.3g} req/s per instance ({cap.binding}-bound), "
            f"${o.price_per_hour / cap.rate:.2f}/h per req/s")


def explain(result: SearchResult, alts: list[Alternative]) -> str:
    """Per-option capacities and, for each single-type alternative, why it lost."""
    best = result.best
    parts = []
    for role, options in (("prefill (worst KV hand-off)", result.prefill_options),
                          ("decode", result.decode_options), ("colocated", result.colocated_options)):
        if options:
            parts.append(f"{role} options:\n" + "\n".join(_option_line(o) for o in options))
    rows = [["alternative", "plan", "$/h", "$/Mtok", "vs best"]]
    for a in sorted(alts, key=lambda a: a.plan.cost_per_hour if a.plan else math.inf):
        if a.plan is None:
            rows.append([a.label, f"infeasible: {a.reason}", "", "", ""])
        else:
            ratio = f"{a.plan.cost_per_hour / best.cost_per_hour:.2f}x" if best else ""
            rows.append([a.label, a.plan.describe(), f"{a.plan.cost_per_hour:.2f}",
                         f"{a.plan.cost_per_mtok:.3f}", ratio])
    parts.append("single-type alternatives (cost relative to the chosen plan):\n" + _format(rows))
    return "\n\n".join(parts)


class CatalogSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """The catalog inputs a report was computed from: file versions, a digest, and the numbers."""

    versions: dict[str, str]
    digest: str
    devices: dict[str, Device]  # only the devices the search considered
    links: list[Link]


def snapshot(catalog: Catalog, space: SearchSpace) -> CatalogSnapshot:
    """The part of ``catalog`` that ``space`` used, so a --json report can be re-run or audited."""
    used = {*space.prefill_devices, *space.decode_devices, *space.colocated_devices}
    return CatalogSnapshot(versions=catalog.versions, digest=catalog.digest(),
                           devices={n: d for n, d in catalog.devices.items() if n in used}, links=catalog.links)


class Report(msgspec.Struct, frozen=True, kw_only=True):
    """The --json document."""

    model: str
    workload: Workload
    slo: Slo
    result: SearchResult
    catalog: CatalogSnapshot
    alternatives: list[Alternative] = []
    sensitivity: Band | None = None  # colocated / disaggregated cost ratio and its band


def to_json(report: Report) -> bytes:
    return msgspec.json.format(msgspec.json.encode(report), indent=2)


class PlanPoint(msgspec.Struct, frozen=True, kw_only=True):
    """One plan on the cost-latency chart."""

    label: str
    cost_per_mtok: float
    ttft_s: float | None
    tpot_s: float | None


def pareto_front(points: list[PlanPoint], latency) -> list[PlanPoint]:
    """Points no other point beats on both cost and ``latency(point)``, by increasing cost."""
    front, best = [], math.inf
    for p in sorted(points, key=lambda p: (p.cost_per_mtok, latency(p))):
        if latency(p) < best:
            front.append(p)
            best = latency(p)
    return front


def plot_pareto(path: Path, points: list[PlanPoint], title: str) -> None:
    """$/Mtok against predicted TTFT and TPOT, one panel each; the front is drawn as a line and
    the five cheapest plans are labelled. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    cheapest = {p.label for p in sorted(points, key=lambda p: p.cost_per_mtok)[:5]}
    panels = ((axes[0], "TTFT", lambda p: p.ttft_s or 0.0), (axes[1], "TPOT", lambda p: p.tpot_s or 0.0))
    for ax, name, latency in panels:
        ax.scatter([latency(p) * 1e3 for p in points], [p.cost_per_mtok for p in points], s=12, alpha=0.5)
        front = pareto_front(points, latency)
        ax.plot([latency(p) * 1e3 for p in front], [p.cost_per_mtok for p in front], marker="o", color="C3",
                label="Pareto front")
        for p in points:
            if p.label in cheapest:
                ax.annotate(p.label, (latency(p) * 1e3, p.cost_per_mtok), fontsize=7)
        ax.set_xlabel(f"predicted {name} (ms)")
        ax.set_ylabel("$/Mtok (output)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
