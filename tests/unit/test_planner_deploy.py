"""KV links per lane and NIC, and plans that fit how hardware is rented and run (review findings 4-6)."""

from __future__ import annotations

import json

import pytest

from vllm_hetero_pd.cli import main
from vllm_hetero_pd.planner import perf
from vllm_hetero_pd.planner.catalog import load_catalog
from vllm_hetero_pd.planner.model import load_model
from vllm_hetero_pd.planner.search import SearchSpace, search
from vllm_hetero_pd.planner.workload import Slo, Workload

CATALOG = load_catalog()
MODEL = load_model("llama-3.1-70b", weight_dtype="fp8")
B200, GAUDI3 = CATALOG.device("B200"), CATALOG.device("Gaudi3")
FINDING_6 = ["plan", "--model", "llama-3.1-70b", "--dtype", "fp8", "--isl", "512", "--osl", "4096", "--rate", "20",
             "--ttft-p90", "1000", "--tpot-p90", "50", "--mode", "disaggregated", "--json",
             "--inventory", "H100=8,H200=8,MI300X=8,Gaudi3=8,A100=8"]


def test_kv_moves_over_the_lanes_both_sides_have():
    # FP8 KV of 4096 tokens: 2 * 80 layers * 8 heads * 128 * 1 B * 4096 = 671,088,640 B.
    # B200 TP8 -> Gaudi3 TP1: min(8, 1) = 1 lane at min(link 50, B200 NIC 50, Gaudi3 NIC 75) = 50 GB/s
    #   = 13.42 ms; + 2 ms link latency + shim 671 MB / 200 GB/s = 3.36 ms -> 18.78 ms (the old model: 8 lanes)
    link = CATALOG.link(B200, GAUDI3)
    one = perf.kv_transfer_s(MODEL, B200, 8, perf.endpoint(GAUDI3, 1), link, 4096)
    assert one * 1e3 == pytest.approx(18.78, rel=0.01)
    # decode TP8: 8 lanes -> 1.68 + 2 + 3.36 = 7.04 ms
    eight = perf.kv_transfer_s(MODEL, B200, 8, perf.endpoint(GAUDI3, 8), link, 4096)
    assert eight * 1e3 == pytest.approx(7.04, rel=0.01)
    # an expert-parallel decode holds each request on one data-parallel rank: one lane
    assert perf.endpoint(GAUDI3, 8, ep=True).lanes == 1


def test_layerwise_overlap_leaves_one_layer_of_the_transfer_exposed():
    # prefill compute of 4096 tokens on B200 TP1 is ~175 ms, far more than the 13.4 ms on the wire, so
    # sending layer by layer leaves the last of 80 layers: 13.42 / 80 = 0.168 ms + 2 + 3.36 = 5.53 ms
    link = CATALOG.link(B200, GAUDI3)
    overlap = perf.prefill_s(MODEL, B200, 1, 4096) - B200.prefill_overhead_s
    hidden = perf.kv_transfer_s(MODEL, B200, 1, perf.endpoint(GAUDI3, 1), link, 4096, overlap)
    assert hidden * 1e3 == pytest.approx(5.53, rel=0.01)


def test_each_device_has_its_own_sourced_scale_out():
    rates = {d.name: d.scale_out_gb_s for d in CATALOG.devices.values()}
    assert rates["H100"] == rates["B200"] == 50 and rates["Gaudi3"] == 75 and rates["A100"] == 25
    assert all(CATALOG.device(n).sources["scale_out_gb_s"].strip() for n in rates)


def test_finding_6_inventory_example_now_has_a_plan(capsys):
    """8 each of H100, H200, MI300X, Gaudi3, A100: at most two decode entries find nothing."""
    assert main([*FINDING_6, "--max-entries", "2"]) == 2
    capsys.readouterr()
    assert main(FINDING_6) == 0
    best = json.loads(capsys.readouterr().out)["result"]["best"]
    assert len({e["device"] for e in best["decode"]}) >= 3
    used: dict[str, int] = {}
    for e in best["prefill"] + best["decode"]:
        used[e["device"]] = used.get(e["device"], 0) + e["count"] * e["tp"]
    assert all(n <= 8 for n in used.values())


def _space(**kw) -> SearchSpace:
    devices = ("H100", "MI300X")
    return SearchSpace(prefill_devices=devices, decode_devices=devices, colocated_devices=devices, **kw)


WORKLOAD, SLO = Workload(isl=4096, osl=512, rate=7.0), Slo(ttft_s=2.0, tpot_s=0.05)


def test_node_granularity_pays_whole_nodes_and_reports_the_idle_devices():
    plan = search(MODEL, CATALOG, WORKLOAD, SLO, _space(granularity={"H100": 8, "MI300X": 8})).best
    assert all(n % 8 == 0 for n in plan.paid_devices.values())
    price = {n: CATALOG.device(n).price_per_hour for n in plan.paid_devices}
    assert plan.cost_per_hour == pytest.approx(sum(n * price[d] for d, n in plan.paid_devices.items()))
    assert plan.idle_devices == sum(plan.paid_devices.values()) - sum(e.num_devices for e in plan.entries)
    per_device = search(MODEL, CATALOG, WORKLOAD, SLO, _space()).best
    assert per_device.cost_per_hour <= plan.cost_per_hour


def test_redundancy_and_headroom_hold_for_every_pool():
    plan = search(MODEL, CATALOG, WORKLOAD, SLO, _space(redundancy=1, headroom=0.2)).best
    for pool in (plan.prefill, plan.decode, plan.colocated):
        if pool:
            capacity = sum(e.count * e.capacity_per_instance for e in pool)
            largest = max(e.capacity_per_instance for e in pool)
            assert capacity - largest >= WORKLOAD.rate / 0.8 * (1 - 1e-9)  # N+1 after losing the largest
    assert plan.redundancy == 1 and plan.headroom == 0.2


def test_a_cost_tie_goes_to_the_colocated_plan():
    result = search(MODEL, CATALOG, WORKLOAD, SLO, SearchSpace(prefill_devices=("H100",), decode_devices=("H100",),
                                                               colocated_devices=("H100",)))
    d, c = result.best_disaggregated, result.best_colocated
    if d.cost_per_hour == pytest.approx(c.cost_per_hour):
        assert result.best.mode == "colocated"
    assert result.best.cost_per_hour == pytest.approx(min(d.cost_per_hour, c.cost_per_hour))


def test_max_num_seqs_is_modelled_and_emitted(capsys, tmp_path):
    """Decode batches stop at vLLM's max_num_seqs (1024 on B200); the scripts set the planned cap."""
    cap = perf.decode_capacity(MODEL, B200, 8, Workload(isl=512, osl=4096, rate=1), Slo(ttft_s=1, tpot_s=0.2))
    assert cap.binding == "max_num_seqs" and cap.max_num_seqs == 1024
    args = [*FINDING_6[:18], "--devices", "B200", "--emit-launch", str(tmp_path)]
    assert main(args) == 0
    best = json.loads(capsys.readouterr().out)["result"]["best"]
    for role in ("prefill", "decode"):
        script = (tmp_path / f"{role}_0.sh").read_text()
        assert f"--max-num-seqs {best[role][0]['max_num_seqs']}" in script
    assert all(e["max_num_seqs"] <= 1024 for e in best["decode"])
