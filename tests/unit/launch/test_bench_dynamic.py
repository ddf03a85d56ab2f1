"""``bench dynamic`` without engines: the schedule, stream folding, goodput and quantiles, the router's
/metrics and log as a time series, the tables, and the router configurations it starts."""

import argparse
import datetime
import math

import msgspec
import pytest
from prometheus_client import generate_latest

from vllm_hetero_pd.launch import bench_dynamic
from vllm_hetero_pd.launch.dynamic_report import (
    ALL,
    ConfigReport,
    Slo,
    goal_lines,
    largest_delta,
    markdown,
    mismatches,
    phase_stats,
    plot,
    sensitivity_lines,
    stats_by_phase,
    summary_lines,
)
from vllm_hetero_pd.launch.phased_workload import Phase, ScheduledRequest, phase_starts, schedule
from vllm_hetero_pd.launch.role_timeline import FlipInterval, flips, in_flight_during, role_sample
from vllm_hetero_pd.launch.timed_stream import StreamResult, fold
from vllm_hetero_pd.router.config import load_config
from vllm_hetero_pd.router.metrics import RouterMetrics
from vllm_hetero_pd.testing.compare import Completion

PREFILL = Phase(name="prefill-heavy", rate=1.3, duration_s=60, prompt_tokens=(1024, 1800), max_tokens=(4, 8))
DECODE = Phase(name="decode-heavy", rate=2.5, duration_s=40, prompt_tokens=(16, 64), max_tokens=(128, 256))
SLO = Slo(ttft_s=1.0, tpot_s=0.02, source="test")


def default_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_dynamic.add_arguments(parser)
    return parser.parse_args(list(argv))


# ---------------------------------------------------------------------------------------------- schedule

def test_schedule_is_deterministic_and_seeded():
    assert schedule([PREFILL, DECODE], 2048, 7) == schedule([PREFILL, DECODE], 2048, 7)
    assert schedule([PREFILL, DECODE], 2048, 7) != schedule([PREFILL, DECODE], 2048, 8)


def test_schedule_keeps_each_phase_in_its_stretch_and_ranges():
    requests = schedule([PREFILL, DECODE], 2048, 0)
    assert [r.index for r in requests] == list(range(len(requests)))
    assert [r.at_s for r in requests] == sorted(r.at_s for r in requests)
    first = [r for r in requests if r.phase == PREFILL.name]
    second = [r for r in requests if r.phase == DECODE.name]
    assert requests == first + second
    assert all(0 <= r.at_s < 60 for r in first) and all(60 <= r.at_s < 100 for r in second)
    for phase, group in ((PREFILL, first), (DECODE, second)):
        assert all(phase.prompt_tokens[0] <= len(r.prompt) <= phase.prompt_tokens[1] for r in group)
        assert all(phase.max_tokens[0] <= r.max_tokens <= phase.max_tokens[1] for r in group)
        assert abs(len(group) - phase.rate * phase.duration_s) < 4 * math.sqrt(phase.rate * phase.duration_s)
    assert all(16 <= t < 2048 for r in requests for t in r.prompt)
    assert len({tuple(r.prompt[:16]) for r in requests}) == len(requests)  # no shared prefixes
    assert phase_starts([PREFILL, DECODE]) == [0.0, 60.0]


def test_the_defaults_give_issue_15s_150_requests_and_quick_fewer():
    full = schedule(bench_dynamic.phases(default_args()), 2048, 0)
    quick = schedule(bench_dynamic.phases(default_args("--quick")), 2048, 0)
    assert len(full) >= bench_dynamic.MIN_REQUESTS
    assert 40 <= len(quick) < len(full)
    assert bench_dynamic.phases(default_args("--decode-s", "15", "--decode-max-tokens", "32,64"))[1] == Phase(
        name="decode-heavy", rate=1.2, duration_s=15, prompt_tokens=(16, 64), max_tokens=(32, 64))


@pytest.mark.parametrize("bad", [dict(rate=0), dict(duration_s=-1), dict(prompt_tokens=(9, 8)),
                                 dict(max_tokens=(0, 4))])
def test_phase_refuses_nonsense(bad):
    with pytest.raises(ValueError, match="phase p"):
        Phase(**{**dict(name="p", rate=1, duration_s=1, prompt_tokens=(1, 2), max_tokens=(1, 2)), **bad})


# ---------------------------------------------------------------------------------------------- streams

def chunk(ids: list[int]) -> bytes:
    top = [{f"token_id:{i}": -0.5} for i in ids]
    return b"data: " + msgspec.json.encode({"choices": [{"index": 0, "token_ids": ids,
                                                         "logprobs": {"top_logprobs": top}}]}) + b"\n"


def test_fold_times_tokens_not_chunks():
    lines = [(0.30, chunk([5])), (0.31, b"\n"), (0.32, chunk([6])), (0.40, chunk([7, 8, 9])), (0.41, b"data: [DONE]\n")]
    got = fold(3, 5, 200, 1000.0, lines)
    assert not got.lost and got.index == 3
    assert got.ttft_s == pytest.approx(0.30)
    assert got.tpot_s == pytest.approx((0.40 - 0.30) / 4)  # four tokens after the first chunk
    assert got.completion.token_ids == [5, 6, 7, 8, 9]
    assert got.completion.top_logprobs[2] == {"token_id:7": -0.5}
    assert got.start_s == 1000.0 and got.end_s == pytest.approx(1000.41)


def test_one_chunk_has_no_tpot():
    got = fold(0, 2, 200, 0.0, [(0.5, chunk([1, 2])), (0.5, b"data: [DONE]\n")])
    assert got.tpot_s is None and got.ttft_s == 0.5 and not got.lost


@pytest.mark.parametrize("status, lines, reason", [
    (503, [(0.1, b'{"error": "no decode"}')], "HTTP 503"),
    (200, [(0.1, chunk([1])), (0.2, b'data: {"error": {"message": "decode failed"}}\n')], "error event"),
    (200, [(0.1, chunk([1]))], "missing"),
    (200, [(0.1, chunk([1])), (0.2, b"data: [DONE]\n")], "1 of 2 tokens"),
])
def test_fold_counts_errors_and_truncated_streams_as_lost(status, lines, reason):
    got = fold(0, 2, status, 0.0, lines)
    assert got.lost and reason in got.error


# ---------------------------------------------------------------------------------------------- goodput

def result(index: int, ttft: float | None, tpot: float | None = 0.01) -> StreamResult:
    if ttft is None:
        return StreamResult(index=index, start_s=0.0, end_s=1.0, status=0, error="connection")
    return StreamResult(index=index, start_s=0.0, end_s=1.0, status=200, ttft_s=ttft, tpot_s=tpot,
                        completion=Completion(token_ids=[index], top_logprobs=[{"a": -1.0}]))


def test_goodput_counts_both_slos_and_lost_requests_against_it():
    results = [result(0, 0.5), result(1, 1.5), result(2, 0.5, 0.03), result(3, 0.9, None), result(4, None)]
    stats = phase_stats(results, SLO)
    assert (stats.requests, stats.lost, stats.good) == (5, 1, 2)  # 0 and 3 (no TPOT: judged by TTFT)
    assert stats.goodput == pytest.approx(0.4)
    assert stats.ttft_p50_s == pytest.approx(0.7)  # numpy's linear quantile over the 4 not lost
    assert stats.ttft_p90_s == pytest.approx(1.32)
    assert stats.tpot_p50_s == pytest.approx(0.01)
    empty = phase_stats([], SLO)
    assert math.isnan(empty.goodput) and math.isnan(empty.ttft_p50_s)


def test_stats_by_phase_splits_by_schedule():
    requests = schedule([msgspec.structs.replace(PREFILL, duration_s=5), msgspec.structs.replace(DECODE, duration_s=5)],
                        2048, 1)
    results = [result(r.index, 0.5 if r.phase == PREFILL.name else 2.0) for r in requests]
    stats = stats_by_phase(requests, results, SLO, [PREFILL.name, DECODE.name])
    assert list(stats) == [PREFILL.name, DECODE.name, ALL]
    assert stats[PREFILL.name].goodput == 1.0 and stats[DECODE.name].goodput == 0.0
    assert stats[ALL].requests == len(requests)


def test_mismatches_name_the_request_and_skip_lost_ones():
    references = [Completion(token_ids=[i], top_logprobs=[{"a": -1.0}]) for i in range(4)]
    results = [result(0, 0.1), result(1, None), result(2, 0.1), result(3, 0.1)]
    results[2] = msgspec.structs.replace(results[2], completion=Completion(token_ids=[9], top_logprobs=[{"a": -1.0}]))
    results[3] = msgspec.structs.replace(results[3], completion=Completion(token_ids=[3], top_logprobs=[{"a": -1.1}]))
    found, near = mismatches(references, results)
    assert set(found) == {2} and near == [], "0.1 is within the batched tolerance; 9 is not in the top-k"
    assert "token ids differ" in found[2]
    strict, _ = mismatches(references, results, tolerance=0.05)
    assert set(strict) == {2, 3} and "logprobs differ" in strict[3]
    assert largest_delta(references, results) == pytest.approx(0.1)  # over answers with equal ids only


# ---------------------------------------------------------------------------------------------- time series

def test_role_sample_reads_the_routers_own_metrics_page():
    metrics = RouterMetrics()
    a, b = "http://127.0.0.1:8101", "http://127.0.0.1:8102"
    for url, prefill, decode in ((a, 1, 0), (b, 0, 0)):
        metrics.instance_role.labels(url, "prefill").set(prefill)
        metrics.instance_role.labels(url, "decode").set(decode)
    metrics.desired_replicas.labels("prefill").set(2)
    metrics.desired_replicas.labels("decode").set(1)
    metrics.window.labels("isl_tokens").set(1400)
    metrics.role_flips.labels(b, "decode").inc()
    sample = role_sample(12.5, generate_latest(metrics.registry).decode())
    assert sample.at_s == 12.5
    assert sample.roles == {a: "prefill", b: "draining"}
    assert sample.desired_replicas == {"prefill": 2.0, "decode": 1.0}
    assert sample.window == {"isl_tokens": 1400.0}
    assert sample.role_flips == 1.0
    assert role_sample(0.0, "").roles == {}


def log_time(text: str) -> float:
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


ROUTER_LOG = """\
2026-01-02 10:00:00,100 INFO vllm.hetero_pd.router.roles: ratio: flip (load 1.20 -> best 0.60 with 2 ...)
2026-01-02 10:00:00,101 INFO vllm.hetero_pd.router.roles: role flip: http://127.0.0.1:8102 decode -> prefill; \
draining 2 decode request(s) in flight first
2026-01-02 10:00:00,120 INFO aiohttp.access: 127.0.0.1 "GET /metrics HTTP/1.1" 200
2026-01-02 10:00:01,351 INFO vllm.hetero_pd.router.roles: role flip: http://127.0.0.1:8102 now serves prefill \
(drain finished after 1.2 s)
2026-01-02 10:01:10,000 INFO vllm.hetero_pd.router.roles: role flip: http://127.0.0.1:8102 prefill -> decode; \
draining 1 prefill request(s) in flight first
"""


def test_flips_come_from_the_router_log_with_open_ones_left_open():
    got = flips(ROUTER_LOG)
    assert got == [
        FlipInterval(instance="http://127.0.0.1:8102", from_role="decode", to_role="prefill",
                     start_s=log_time("2026-01-02 10:00:00,101"), end_s=log_time("2026-01-02 10:00:01,351")),
        FlipInterval(instance="http://127.0.0.1:8102", from_role="prefill", to_role="decode",
                     start_s=log_time("2026-01-02 10:01:10,000"), end_s=None),
    ]
    start, end = got[0].start_s, got[0].end_s
    assert in_flight_during(start - 5, start + 0.1, got, run_end_s=end + 100)  # was running when it began
    assert in_flight_during(end - 0.1, end + 3, got, run_end_s=end + 100)  # started while it drained
    assert not in_flight_during(end + 1, end + 2, got, run_end_s=end + 100)
    assert in_flight_during(got[1].start_s + 50, got[1].start_s + 60, got, run_end_s=got[1].start_s + 99)


# ---------------------------------------------------------------------------------------------- tables

def report(name: str, good: dict[str, int], **kw) -> ConfigReport:
    phases = {p: phase_stats([result(i, 0.1) for i in range(g)] + [result(99, 5.0)], SLO) for p, g in good.items()}
    fields = dict(role_flips=0, mismatches=0, in_flight_during_flips=0, mismatches_during_flips=0,
                  near_ties=0, max_logprob_delta=0.0, kv_usage_after={"a": 0.0})
    return ConfigReport(name=name, phases=phases, **{**fields, **kw})


def test_goal_lines_compare_with_the_better_static_split_per_phase():
    reports = [report("static-2p1d", {"p1": 10, "p2": 2, ALL: 12}), report("static-1p2d", {"p1": 4, "p2": 9, ALL: 13}),
               report("dynamic", {"p1": 10, "p2": 8, ALL: 18}, role_flips=2)]
    assert goal_lines(reports, "dynamic") == [
        "* p1: dynamic 10 good vs best static 10 (static-2p1d): met (goal >=)",
        "* p2: dynamic 8 good vs best static 9 (static-1p2d): missed (goal >=)",
        "* whole run: dynamic 18 good vs best static 13 (static-1p2d): met (goal >)",
    ]
    assert goal_lines(reports[:2], "dynamic") == []


def test_summary_takes_medians_over_rounds_and_counts_the_rounds_that_met_the_goal():
    rounds = [[report("static-2p1d", {"p1": 10, ALL: 10}), report("dynamic", {"p1": 9, ALL: 12})],
              [report("dynamic", {"p1": 12, ALL: 14}), report("static-2p1d", {"p1": 11, ALL: 11})],
              [report("static-2p1d", {"p1": 7, ALL: 7}), report("dynamic", {"p1": 11, ALL: 11})]]
    lines = summary_lines(rounds, "dynamic")
    assert "| dynamic | p1 | 10 | 9, 12, 11 | 11 | 9-12 | 100 | 10.0 | 10.0 |" in lines
    assert "| static-2p1d | p1 | 11 | 10, 11, 7 | 10 | 7-11 | 100 | 10.0 | 10.0 |" in lines
    assert "* p1: dynamic 11 good vs best static 10 (static-2p1d): met (goal >=); met in 2 of 3 rounds" in lines
    assert "* whole run: dynamic 12 good vs best static 10 (static-2p1d): met (goal >); met in 3 of 3 rounds" in lines


def test_sensitivity_rescores_the_same_requests_at_each_tpot_slo():
    requests = [ScheduledRequest(index=i, at_s=float(i), phase="p1", prompt=[1], max_tokens=4) for i in range(3)]
    results = {"a": [result(0, 0.1, tpot=0.005), result(1, 0.1, tpot=0.015), result(2, 0.1, tpot=0.035)]}
    lines = sensitivity_lines(requests, [results, results], SLO, (0.5, 1.0, 2.0), ["p1"])
    assert lines[0] == "| config | phase | TPOT <= 10.0 ms (0.5x) | TPOT <= 20.0 ms (1x) | TPOT <= 40.0 ms (2x) |"
    assert lines[2:] == ["| a | p1 | 1 | 2 | 3 |", "| a | whole run | 1 | 2 | 3 |"]


def test_rounds_rotate_the_order_of_the_configurations():
    assert bench_dynamic.rounds_order(["a", "b", "c"], 4) == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"],
                                                              ["a", "b", "c"]]


def test_markdown_has_a_row_per_config_and_phase_and_the_correctness_table():
    reports = [report("static-2p1d", {"p1": 3, ALL: 3}),
               report("dynamic", {"p1": 3, ALL: 3}, role_flips=2, in_flight_during_flips=5)]
    text = markdown(reports, SLO, ["# title"], "dynamic", control=(2, 1, 0.125))
    assert text.startswith("# title\n\nSLO: TTFT <= 1000 ms and TPOT <= 20.0 ms (test).")
    assert "| static-2p1d | p1 | 4 | 3 | 0.75 | 100 | 3530 | 10.0 | 10.0 |" in text
    assert "| dynamic | 2 | 0 | 0 | 0 | 0.000 | 5 | 0 | 0.00 |" in text
    assert "| monolithic, same schedule (control) | - | - | 2 | 1 | 0.125 | - | - | - |" in text
    assert "* whole run: dynamic 3 good vs best static 3 (static-2p1d): missed (goal >)" in text


def test_plot_writes_a_png(tmp_path):
    series = [role_sample(100.0 + t, generate_latest(_metrics_at(t)).decode()) for t in range(6)]
    plot(series, 100.0, [0.0, 3.0], "test", tmp_path / "roles.png")
    assert (tmp_path / "roles.png").read_bytes()[:4] == b"\x89PNG"


def _metrics_at(t: int):
    metrics = RouterMetrics()
    metrics.instance_role.labels("http://h:1", "prefill").set(t < 3)
    metrics.instance_role.labels("http://h:1", "decode").set(t > 3)
    metrics.desired_replicas.labels("prefill").set(2 if t < 3 else 1)
    return metrics.registry


# ---------------------------------------------------------------------------------------------- router configs

def test_router_configs_pin_the_static_splits_and_mix_the_dynamic_one(tmp_path):
    urls = ["http://127.0.0.1:8101", "http://127.0.0.1:8102", "http://127.0.0.1:8103"]
    slo = Slo(ttft_s=2.0, tpot_s=0.025, source="test")
    ratio = bench_dynamic.ratio_config("llama-3.1-8b", slo, tmp_path, None)
    assert (ratio.window_s, ratio.interval_s, ratio.hold_s, ratio.cooldown_s, ratio.min_requests) == (8, 1, 2, 8, 4)
    assert ratio.catalog == (str(tmp_path / "catalog.yaml"),) and ratio.device == bench_dynamic.DEVICE
    assert (ratio.ttft_ms, ratio.tpot_ms) == (2000, 25)
    splits = {}
    for name in bench_dynamic.SPLITS:
        config = bench_dynamic.router_config(name, urls, str(tmp_path), ratio)
        path = tmp_path / f"{name}.yaml"
        path.write_bytes(msgspec.yaml.encode(config))
        assert load_config(path) == config  # what the router process will read
        splits[name] = ([i.url for i in config.prefill.instances], [i.url for i in config.decode.instances],
                        [i.url for i in config.mixed], config.ratio is not None)
    assert splits == {"static-2p1d": (urls[:2], urls[2:], [], False), "static-1p2d": (urls[:1], urls[1:], [], False),
                      "dynamic": ([], [], urls, True)}


def test_engines_are_numbered_by_url_unbound_with_one_thread_unless_a_layout_binds_them(monkeypatch):
    monkeypatch.setattr(bench_dynamic.os, "sched_getaffinity", lambda _: {0, 1})
    specs = bench_dynamic.engine_specs("/model")
    urls = [f"http://127.0.0.1:{s.http_port}" for s in specs]
    assert urls == sorted(urls)
    assert [s.cpu_cores for s in specs] == ["nobind"] * 3 and {s.env["OMP_NUM_THREADS"] for s in specs} == {"1"}
    assert {s.role for s in specs} == {"both"} and specs[0].kv_transfer_config["kv_role"] == "kv_both"
    assert [s.cpu_cores for s in bench_dynamic.engine_specs("/model", (0, 1, 0))] == ["0", "1", "0"]


def test_the_report_of_a_whole_run_is_written_and_fails_on_a_mismatch(tmp_path):
    """Everything after the engines, on fake runs: catalog, SLO, predicted loads, tables, JSON, plot."""
    from vllm_hetero_pd.planner.catalog import CatalogFile, load_catalog
    from vllm_hetero_pd.planner.model import load_model
    from vllm_hetero_pd.testing.tiny_model import build_tiny_model

    model_dir = str(build_tiny_model("llama-gqa-d32", "bfloat16"))
    device = msgspec.structs.replace(load_catalog().device("CPU"), name=bench_dynamic.DEVICE)
    (tmp_path / "catalog.yaml").write_bytes(msgspec.yaml.encode(CatalogFile(devices=[device])))
    args = default_args("--quick", "--out", str(tmp_path))
    workload = bench_dynamic.phases(args)
    requests = schedule(workload, 2048, 0)
    slo = bench_dynamic.slo_for(args, load_model(model_dir, weight_dtype="bf16"), device, workload)
    ratio = bench_dynamic.ratio_config(model_dir, slo, tmp_path, None)
    references = [Completion(token_ids=[r.index], top_logprobs=[{"a": -1.0}]) for r in requests]
    urls = ["http://127.0.0.1:8101", "http://127.0.0.1:8102", "http://127.0.0.1:8103"]
    flip = FlipInterval(instance=urls[1], from_role="decode", to_role="prefill", start_s=1010.0, end_s=1011.0)

    def config_run(name: str, wrong: int | None) -> bench_dynamic.ConfigRun:
        results = [msgspec.structs.replace(result(r.index, 0.1), start_s=1000.0 + r.at_s, end_s=1001.0 + r.at_s)
                   for r in requests]
        if wrong is not None:
            results[wrong] = msgspec.structs.replace(results[wrong], completion=references[wrong + 1])
        series = [role_sample(1000.0 + t, generate_latest(_metrics_at(t)).decode()) for t in range(6)]
        return bench_dynamic.ConfigRun(name=name, start_s=1000.0, end_s=1050.0, results=results, series=series,
                                       flips=[flip] if name == "dynamic" else [], kv_usage_after={u: 0.0 for u in urls})

    runs = [config_run("static-2p1d", None), config_run("static-1p2d", None), config_run("dynamic", 10)]
    control = config_run("control", None).results
    code = bench_dynamic._report(args, tmp_path, workload, requests, references, control, [runs, runs[::-1]], slo,
                                 device, ratio, 0.5)
    assert code == 1  # request 10 differs
    table = (tmp_path / "results.md").read_text()
    assert "| phase | rate | ISL | OSL |" in table and "| dynamic | 1 | 0 | 1 | 0 | 0.000 |" in table
    saved = msgspec.json.decode((tmp_path / "results.json").read_bytes())
    assert len(saved["rounds"]) == 2 and len(saved["latencies"][1]["dynamic"]) == len(requests)
    dynamic = saved["rounds"][0][2]
    assert dynamic["differing"] == {"10": "token ids differ from position 0: 10 vs 11, not a near tie within 0.25"}
    assert dynamic["in_flight_during_flips"] == [r.index for r in requests if 9.0 < r.at_s < 11.0]
    assert set(msgspec.json.decode((tmp_path / "timeseries.json").read_bytes())[1]) == set(bench_dynamic.SPLITS)
    assert (tmp_path / "roles-dynamic-round1.png").exists() and (tmp_path / "roles-dynamic-round2.png").exists()
    assert "Goal on the medians of 2 round(s):" in table and "## Round 2" in table
