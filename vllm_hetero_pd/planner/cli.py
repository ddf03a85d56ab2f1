"""``vllm-hetero-pd plan``: the cheapest deployment for a model, workload and SLO.

Exit codes: 0 a plan was found; 2 bad input or no feasible plan (the message says what is
infeasible and by how much).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import msgspec

from vllm_hetero_pd.planner import emit, report
from vllm_hetero_pd.planner.catalog import Catalog, CatalogError, load_catalog
from vllm_hetero_pd.planner.model import ModelError, load_model, serve_name
from vllm_hetero_pd.planner.perf import TP_DEGREES
from vllm_hetero_pd.planner.predict import predict
from vllm_hetero_pd.planner.search import SearchError, SearchSpace, alternatives, diagnose, prepare, search, solve
from vllm_hetero_pd.planner.workload import Slo, Workload, WorkloadError

_INPUT_ERRORS = (CatalogError, ModelError, WorkloadError, SearchError)


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [n.strip() for n in text.split(",") if n.strip()]


def _pairs(items: list[str], flag: str, kind) -> dict[str, float]:
    """Parse NAME=VALUE lists given as repeated flags and/or comma lists."""
    out = {}
    for item in (part for text in items for part in text.split(",") if part.strip()):
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = kind(value)
        except ValueError:
            sep = ""
        if not sep:
            raise WorkloadError(f"{flag} expects NAME=NUMBER items, got {item!r}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="preset (llama-3.1-8b, llama-3.1-70b, llama-3.1-405b), config.json or model dir")
    parser.add_argument("--dtype", default="bf16", help="weight dtype: bf16, fp16, fp8 (default bf16)")
    parser.add_argument("--kv-dtype", default=None, help="KV cache dtype (default: same as --dtype)")
    parser.add_argument("--isl", type=int, required=True, help="prompt tokens per request")
    parser.add_argument("--osl", type=int, required=True, help="output tokens per request")
    parser.add_argument("--rate", type=float, required=True, help="Poisson arrival rate, requests/s")
    parser.add_argument("--ttft-p90", type=float, required=True, metavar="MS", help="TTFT target, ms")
    parser.add_argument("--tpot-p90", type=float, required=True, metavar="MS", help="TPOT target, ms")
    parser.add_argument("--quantile", type=float, default=0.9, help="SLO quantile (default 0.9)")
    parser.add_argument("--catalog", action="append", default=[], type=Path, metavar="FILE",
                        help="extra catalog YAML/JSON; devices replace same-named ones (repeatable)")
    parser.add_argument("--price", action="append", default=[], metavar="NAME=$/h",
                        help="override a device's hourly price, e.g. Gaudi3=1.5 (repeatable)")
    parser.add_argument("--devices", help="comma list of devices to consider (default: all in the catalog)")
    parser.add_argument("--prefill-devices", help="restrict prefill pools to these devices")
    parser.add_argument("--decode-devices", help="restrict decode pools to these devices")
    parser.add_argument("--colocated-devices", help="restrict colocated pools to these devices")
    parser.add_argument("--mode", choices=("both", "disaggregated", "colocated"), default="both")
    parser.add_argument("--inventory", action="append", default=[], metavar="NAME=N",
                        help="devices available, e.g. H100=16,MI300X=8; unlisted devices are unavailable")
    parser.add_argument("--budget", type=float, default=None, metavar="$/h", help="maximum cost per hour")
    parser.add_argument("--objective", choices=("cost", "goodput"), default="cost",
                        help="cost: cheapest plan for --rate; goodput: highest rate within --budget/--inventory")
    parser.add_argument("--tp", default=",".join(map(str, TP_DEGREES)), help="TP degrees to try")
    parser.add_argument("--max-instances", type=int, default=64, help="instances per pool entry")
    parser.add_argument("--max-entries", type=int, default=2, help="(device, TP) entries per pool: 1 or 2")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--explain", action="store_true", help="show why each alternative lost")
    parser.add_argument("--emit-launch", type=Path, metavar="DIR", help="write launch scripts for the plan")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="cost-throughput chart (needs matplotlib)")


def _catalog(args: argparse.Namespace) -> Catalog:
    catalog = load_catalog(args.catalog)
    devices = dict(catalog.devices)
    for name, price in _pairs(args.price, "--price", float).items():
        dev = catalog.device(name)
        if price <= 0:
            raise CatalogError(f"--price {name}={price}: a price must be > 0 $/h")
        devices[dev.name] = msgspec.structs.replace(
            dev, price_per_hour=price, sources={**dev.sources, "price_per_hour": "--price on the command line"})
    return msgspec.structs.replace(catalog, devices=devices)


def _space(args: argparse.Namespace, catalog: Catalog) -> SearchSpace:
    every = [catalog.device(n).name for n in (_names(args.devices) or list(catalog.devices))]
    inventory = None
    if args.inventory:
        inventory = {catalog.device(n).name: int(v) for n, v in _pairs(args.inventory, "--inventory", int).items()}
        every = [n for n in every if inventory.get(n, 0) > 0] or every

    def role(flag: str | None, enabled: bool) -> tuple[str, ...]:
        if not enabled:
            return ()
        return tuple(catalog.device(n).name for n in _names(flag)) if flag else tuple(every)

    try:
        tps = tuple(int(t) for t in args.tp.split(","))
    except ValueError:
        raise SearchError(f"--tp expects a comma list of integers, got {args.tp!r}") from None
    disagg, coloc = args.mode in ("both", "disaggregated"), args.mode in ("both", "colocated")
    return SearchSpace(prefill_devices=role(args.prefill_devices, disagg),
                       decode_devices=role(args.decode_devices, disagg),
                       colocated_devices=role(args.colocated_devices, coloc), tp_degrees=tps,
                       max_instances=args.max_instances, max_entries=args.max_entries,
                       inventory=inventory, budget_per_hour=args.budget)


def _max_goodput(model, catalog, workload, slo, space) -> Workload:
    """Highest rate with a feasible plan within the limits (feasibility only shrinks as rate grows)."""
    if space.inventory is None and space.budget_per_hour is None:
        raise SearchError("--objective goodput needs a limit: give --budget and/or --inventory")

    prepared = prepare(model, catalog, workload, slo, space)

    def ok(rate: float) -> bool:
        return solve(prepared, msgspec.structs.replace(workload, rate=rate)).best is not None

    lo, hi = 0.0, workload.rate
    while ok(hi):
        lo, hi = hi, hi * 2
        if hi > 1e7:
            raise SearchError("goodput is unbounded: the limits never bind; lower --max-instances")
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    if lo == 0.0:
        return msgspec.structs.replace(workload, rate=workload.rate)  # nothing feasible: report at --rate
    return msgspec.structs.replace(workload, rate=lo)


def _pareto_series(model, catalog, workload, slo, space, alts) -> dict[str, list[tuple[float, float]]]:
    """$/h against output tokens/s over a rate sweep: the best plan and the 5 best single-type ones."""
    rates = [workload.rate * f for f in (0.25, 0.5, 1, 2, 4)]
    families = {"best (mixed)": space}
    for a in [a for a in alts if a.plan][:5]:
        p, _, rest = a.label.partition(":")
        families[a.label] = (msgspec.structs.replace(space, prefill_devices=(p,), decode_devices=(rest,),
                                                      colocated_devices=())
                             if rest else msgspec.structs.replace(space, prefill_devices=(), decode_devices=(),
                                                                  colocated_devices=(p.split()[-1],)))
    series = {}
    for label, sub in families.items():
        points = []
        prepared = prepare(model, catalog, workload, slo, sub)
        for rate in rates:
            best = solve(prepared, msgspec.structs.replace(workload, rate=rate)).best
            if best:
                points.append((best.output_tokens_per_s, best.cost_per_hour))
        series[label] = points
    return series


def run(args: argparse.Namespace) -> int:
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print("error: --plot needs matplotlib: pip install matplotlib (or the package's test extra)",
              file=sys.stderr)
        return 2
    try:
        catalog = _catalog(args)
        model = load_model(args.model, weight_dtype=args.dtype, kv_dtype=args.kv_dtype)
        workload = Workload(isl=args.isl, osl=args.osl, rate=args.rate)
        slo = Slo(ttft_s=args.ttft_p90 / 1e3, tpot_s=args.tpot_p90 / 1e3, quantile=args.quantile)
        space = _space(args, catalog)
        if args.objective == "goodput":
            workload = _max_goodput(model, catalog, workload, slo, space)
        result = search(model, catalog, workload, slo, space)
        if result.best is None:
            print(f"error: no feasible plan: {diagnose(model, catalog, workload, slo, space, result)}",
                  file=sys.stderr)
            return 2
    except _INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    best = predict(result.best, model, catalog, workload, slo)
    result = msgspec.structs.replace(result, best=best)
    alts = alternatives(model, catalog, workload, slo, space) if (args.explain or args.plot) else []
    if args.json:
        print(report.to_json(report.Report(model=args.model, workload=workload, slo=slo, result=result,
                                           alternatives=alts)).decode())
    else:
        print(report.headline(result, workload, slo))
        print()
        print(report.plan_table(best, workload, slo))
        if args.explain:
            print()
            print(report.explain(result, alts))
    if args.emit_launch:
        written = emit.write_launch(best, model, serve_name(args.model), args.emit_launch)
        print(f"wrote {len(written)} files to {args.emit_launch}", file=sys.stderr)
    if args.plot:
        series = _pareto_series(model, catalog, workload, slo, space, alts)
        report.plot_pareto(args.plot, series, f"{args.model} ISL {workload.isl} OSL {workload.osl}")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
