"""``vllm-hetero-pd plan``: the cheapest deployment for a model, workload and SLO.

Exit codes: 0 a plan was found; 2 bad input or no feasible plan (the message says what is
infeasible and by how much).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from pathlib import Path

import msgspec

from vllm_hetero_pd.planner import emit, k8s, report, sensitivity
from vllm_hetero_pd.planner.catalog import Catalog, CatalogError, Device, load_catalog
from vllm_hetero_pd.planner.model import ModelError, ModelSpec, load_model, serve_name
from vllm_hetero_pd.planner.perf import TP_DEGREES
from vllm_hetero_pd.planner.predict import predict
from vllm_hetero_pd.planner.search import (
    MAX_ENTRIES,
    SearchError,
    SearchSpace,
    alternatives,
    diagnose,
    prepare,
    search,
    solve,
)
from vllm_hetero_pd.planner.workload import Slo, Workload, WorkloadError


class CliError(ValueError):
    """An output path the CLI cannot write, found before any searching is done."""


_INPUT_ERRORS = (CatalogError, ModelError, WorkloadError, SearchError, CliError)


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
                        help="preset (llama-3.1-8b, llama-3.1-70b, llama-3.1-405b), or a HF config.json / model "
                             "dir: dense, MoE, MLA, sliding-window")
    parser.add_argument("--dtype", default="auto",
                        help="weight dtype: auto (the checkpoint's quantization_config, else torch_dtype), "
                             "bf16, fp16, fp8, int8, mxfp4, nvfp4, int4")
    parser.add_argument("--kv-dtype", default=None,
                        help="KV cache dtype (default: the weights' width down to fp8, else bf16)")
    parser.add_argument("--isl", type=int, required=True, help="prompt tokens per request")
    parser.add_argument("--osl", type=int, required=True, help="output tokens per request")
    parser.add_argument("--rate", type=float, required=True, help="Poisson arrival rate, requests/s")
    parser.add_argument("--ttft-p90", type=float, required=True, metavar="MS", help="TTFT target, ms")
    parser.add_argument("--tpot-p90", type=float, required=True, metavar="MS", help="TPOT target, ms")
    parser.add_argument("--quantile", type=float, default=0.9, help="SLO quantile (default 0.9)")
    parser.add_argument("--catalog", action="append", default=[], type=Path, metavar="FILE",
                        help="extra catalog YAML/JSON; devices replace same-named ones (repeatable)")
    parser.add_argument("--price", action="append", default=[], metavar="NAME=$/h",
                        help="override a device's hourly rental price, e.g. Gaudi3=1.5 (repeatable)")
    parser.add_argument("--cost", choices=("rental", "tco"), default="rental",
                        help="rental: catalog $/h; tco: owned hardware (capex, power, facility; catalog tco section)")
    parser.add_argument("--tco", action="append", default=[], metavar="KEY=VALUE",
                        help="override a TCO input, e.g. pue=1.4,usd_per_kwh=0.12 (repeatable)")
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
    parser.add_argument("--tp", default=None,
                        help="TP degrees to try (default: those of 1,2,4,8 the model's heads allow)")
    parser.add_argument("--max-instances", type=int, default=64, help="instances per pool entry")
    parser.add_argument("--max-entries", type=int, default=MAX_ENTRIES, help="(device, TP) entries per pool")
    parser.add_argument("--granularity", default="device", metavar="device|node|NAME=N,...",
                        help="devices rented together: device (1), node (each device's max_tp), or per-device counts")
    parser.add_argument("--redundancy", type=int, default=0, metavar="K",
                        help="N+K: each pool still covers the rate after losing K of its largest instances")
    parser.add_argument("--headroom", type=float, default=0.0, metavar="FRACTION",
                        help="plan each pool at most (1 - FRACTION) of its SLO capacity, e.g. 0.2")
    parser.add_argument("--kv-overlap", choices=("none", "layerwise"), default="none",
                        help="none: KV pulled after the prefill (vLLM NIXL); layerwise: sent during it")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--explain", action="store_true", help="show why each alternative lost")
    parser.add_argument("--sensitivity", action="store_true",
                        help="band of the disaggregated/colocated cost ratio over every [inferred]/[assumption] "
                             "input of the devices the two plans use, and the inputs that move it most")
    parser.add_argument("--emit-launch", type=Path, metavar="DIR", help="write launch scripts for the plan")
    parser.add_argument("--emit", nargs=2, metavar=("KIND", "DIR"),
                        help="write deployment files for the plan; KIND k8s: Kubernetes manifests "
                             "(Deployments/LeaderWorkerSets, Services, router, ConfigMap)")
    parser.add_argument("--image", default="vllm-hetero-pd:latest",
                        help="container image with vLLM and this plugin, for --emit k8s")
    parser.add_argument("--served-model", default=None, metavar="ID_OR_DIR",
                        help="what the emitted scripts serve (default: the preset's HF id or the model dir)")
    parser.add_argument("--plot", type=Path, metavar="PNG",
                        help="Pareto front of $/Mtok vs TTFT and TPOT over the alternatives (needs matplotlib)")


def _catalog(args: argparse.Namespace) -> Catalog:
    """The catalog with --price overrides, and in TCO mode --tco overrides and owned-cost prices."""
    catalog = load_catalog(args.catalog)
    devices = dict(catalog.devices)
    for name, price in _pairs(args.price, "--price", float).items():
        dev = catalog.device(name)
        if price <= 0:
            raise CatalogError(f"--price {name}={price}: a price must be > 0 $/h")
        devices[dev.name] = msgspec.structs.replace(
            dev, price_per_hour=price, sources={**dev.sources, "price_per_hour": "--price on the command line"})
    catalog = msgspec.structs.replace(catalog, devices=devices)
    if args.cost == "rental":
        return catalog
    return catalog.owned(_pairs(args.tco, "--tco", float))


def _default_devices(catalog: Catalog) -> list[str]:
    """Every accelerator in the catalog; CPU hosts only when named, as nobody plans a fleet of them."""
    return [d.name for d in catalog.devices.values() if d.vendor != "cpu"]


def _tp_degrees(text: str | None, model: ModelSpec, devices: list[Device]) -> tuple[int, ...]:
    """TP degrees to search. Defaults quietly skip what the model's heads forbid; a degree the user
    names must be usable by the model and by some device, or it would surface as an SLO miss."""
    if text is None:
        return tuple(t for t in TP_DEGREES if model.valid_tp(t))
    try:
        tps = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise SearchError(f"--tp expects a comma list of integers, got {text!r}") from None
    largest = max(d.max_tp for d in devices)
    for tp in tps:
        if tp < 1:
            raise SearchError(f"--tp degrees must be >= 1, got {tp}")
        if not model.valid_tp(tp):
            raise SearchError(f"--tp {tp} does not divide {model.name}'s {model.num_heads} attention heads / "
                              f"{model.num_kv_heads} KV heads")
        if tp > largest:
            raise SearchError(f"--tp {tp} exceeds max_tp {largest} of every device searched")
    return tps


def _space(args: argparse.Namespace, catalog: Catalog, model: ModelSpec) -> SearchSpace:
    every = [catalog.device(n).name for n in (_names(args.devices) or _default_devices(catalog))]
    inventory = None
    if args.inventory:
        inventory = {catalog.device(n).name: int(v) for n, v in _pairs(args.inventory, "--inventory", int).items()}
        every = [n for n in every if inventory.get(n, 0) > 0] or every

    def role(flag: str | None, enabled: bool) -> tuple[str, ...]:
        if not enabled:
            return ()
        return tuple(catalog.device(n).name for n in _names(flag)) if flag else tuple(every)

    disagg, coloc = args.mode in ("both", "disaggregated"), args.mode in ("both", "colocated")
    prefill, decode = role(args.prefill_devices, disagg), role(args.decode_devices, disagg)
    colocated = role(args.colocated_devices, coloc)
    searched = [catalog.device(n) for n in {*prefill, *decode, *colocated}] or [catalog.device(n) for n in every]
    return SearchSpace(prefill_devices=prefill, decode_devices=decode, colocated_devices=colocated,
                       tp_degrees=_tp_degrees(args.tp, model, searched), max_instances=args.max_instances,
                       max_entries=args.max_entries, inventory=inventory, budget_per_hour=args.budget,
                       granularity=_granularity(args.granularity, catalog), redundancy=args.redundancy,
                       headroom=args.headroom, layerwise_kv=args.kv_overlap == "layerwise")


def _granularity(text: str, catalog: Catalog) -> dict[str, int]:
    """Devices per rented unit: ``device`` (1 each), ``node`` (max_tp, the devices of one node) or NAME=N."""
    if text == "device":
        return {}
    if text == "node":
        return {n: d.max_tp for n, d in catalog.devices.items()}
    return {catalog.device(n).name: int(v) for n, v in _pairs([text], "--granularity", int).items()}


def _writable_dir(flag: str, path: Path) -> None:
    """``path`` is, or can be created as, a directory we may write into."""
    if path.exists() and not path.is_dir():
        raise CliError(f"{flag} {path} is an existing file; give a directory (it is created if missing)")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise CliError(f"{flag} {path}: {existing} is not a writable directory")


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse unwritable outputs before searching, so a bad path never follows a printed plan."""
    if args.plot:
        if importlib.util.find_spec("matplotlib") is None:
            raise CliError("--plot needs matplotlib: pip install matplotlib (or the package's test extra)")
        folder = args.plot.absolute().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise CliError(f"--plot {args.plot}: folder {folder} does not exist or is not writable")
    if args.emit_launch:
        _writable_dir("--emit-launch", args.emit_launch)
    if args.emit:
        kind, folder = args.emit
        if kind != "k8s":
            raise CliError(f"--emit {kind}: unknown kind; use --emit k8s DIR (launch scripts: --emit-launch DIR)")
        _writable_dir("--emit k8s", Path(folder))


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


def _pareto_points(model, catalog, workload, slo, alts) -> list[report.PlanPoint]:
    """Every feasible single-type alternative with its predicted latencies, cheapest first."""
    plans = sorted((a for a in alts if a.plan), key=lambda a: a.plan.cost_per_hour)
    return [report.PlanPoint(label=a.label, cost_per_mtok=p.cost_per_mtok, ttft_s=p.ttft_s, tpot_s=p.tpot_s)
            for a in plans for p in [predict(a.plan, model, catalog, workload, slo)]]


def _plan(args: argparse.Namespace):
    """Parse every input, then search; raises one of ``_INPUT_ERRORS`` on bad input or no plan."""
    _check_outputs(args)
    catalog = _catalog(args)
    model = load_model(args.model, weight_dtype=args.dtype, kv_dtype=args.kv_dtype)
    workload = Workload(isl=args.isl, osl=args.osl, rate=args.rate)
    model.check_context(workload.isl + workload.osl)
    slo = Slo(ttft_s=args.ttft_p90 / 1e3, tpot_s=args.tpot_p90 / 1e3, quantile=args.quantile)
    space = _space(args, catalog, model)
    served = (args.served_model or serve_name(args.model)) if (args.emit_launch or args.emit) else ""
    if args.objective == "goodput":
        workload = _max_goodput(model, catalog, workload, slo, space)
    result = search(model, catalog, workload, slo, space)
    if result.best is None:
        raise SearchError(f"no feasible plan: {diagnose(model, catalog, workload, slo, space, result)}")
    return catalog, model, workload, slo, space, served, result


def _mode_ratio(model, workload, slo, space, catalog: Catalog) -> float:
    """Cost of the best colocated plan over the best disaggregated one (inf/0 when one is infeasible)."""
    result = search(model, catalog, workload, slo, space)
    d, c = result.best_disaggregated, result.best_colocated
    if d is None or c is None:
        return math.inf if c is not None else 0.0
    return c.cost_per_hour / d.cost_per_hour


def _sensitivity(model, catalog, workload, slo, space, result) -> sensitivity.Band | None:
    plans = [p for p in (result.best_disaggregated, result.best_colocated) if p is not None]
    if len(plans) < 2:
        return None
    used = {e.device for p in plans for e in p.entries}
    return sensitivity.band(lambda c: _mode_ratio(model, workload, slo, space, c), catalog, used)


def run(args: argparse.Namespace) -> int:
    try:
        catalog, model, workload, slo, space, served, result = _plan(args)
    except _INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    best = predict(result.best, model, catalog, workload, slo, space.layerwise_kv)
    result = msgspec.structs.replace(result, best=best)
    alts = alternatives(model, catalog, workload, slo, space) if (args.explain or args.plot) else []
    band = _sensitivity(model, catalog, workload, slo, space, result) if args.sensitivity else None
    if args.json:
        print(report.to_json(report.Report(model=args.model, workload=workload, slo=slo, result=result,
                                           alternatives=alts, catalog=report.snapshot(catalog, space),
                                           sensitivity=band)).decode())
    else:
        print(report.headline(result, workload, slo))
        if band is not None:
            print(f"colocated / disaggregated cost: {band.describe()}")
        print()
        print(report.plan_table(best, workload, slo))
        if args.explain:
            print()
            print(report.explain(result, alts))
    if args.emit_launch:
        written = emit.write_launch(best, catalog, model, served, workload.isl + workload.osl, args.emit_launch)
        print(f"wrote {len(written)} files to {args.emit_launch}", file=sys.stderr)
    if args.emit:
        objects = k8s.manifests(best, catalog, model, served, workload.isl + workload.osl, args.image,
                                space.granularity, slo)
        written = k8s.write_k8s(objects, Path(args.emit[1]))
        for kind, scalers in k8s.autoscalers(best, catalog, space.granularity).items():
            written += k8s.write_k8s(scalers, Path(args.emit[1]) / "autoscaling" / kind)
        print(f"wrote {len(written)} manifests to {args.emit[1]}", file=sys.stderr)
    if args.plot:
        report.plot_pareto(args.plot, _pareto_points(model, catalog, workload, slo, alts),
                           f"{args.model} ISL {workload.isl} OSL {workload.osl} at {workload.rate:g} req/s")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
