"""The pure parts of ``bench planner-pd`` (real-pair P/D validation); no engine starts here."""

from __future__ import annotations

import argparse
import inspect
import math

import msgspec
import pytest

from vllm_hetero_pd.planner import pd_validate, perf
from vllm_hetero_pd.planner.catalog import load_catalog
from vllm_hetero_pd.planner.model import from_hf_config
from vllm_hetero_pd.planner.workload import Workload

TINY = from_hf_config({"num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 512,
                       "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32, "vocab_size": 2048},
                      name="tiny", weight_dtype="bf16")
CPU = load_catalog().device("CPU")
LINK = load_catalog().link(CPU, CPU)


def test_link_fit_recovers_latency_and_rate_from_sequential_ttfts():
    truth = msgspec.structs.replace(LINK, latency_s=0.012, gb_s=0.8)
    samples = []
    for tokens in (64, 512):
        kv = perf.kv_transfer_s(TINY, CPU, 1, perf.endpoint(CPU, 1), truth, tokens)
        ttft = perf.prefill_s(TINY, CPU, 1, tokens) + kv + perf.decode_step_s(TINY, CPU, 1, 1, tokens)
        samples.append((tokens, ttft))
    fitted = pd_validate.fit_link(TINY, CPU, CPU, LINK, samples)
    assert fitted.latency_s == pytest.approx(0.012, rel=1e-6) and fitted.gb_s == pytest.approx(0.8, rel=1e-6)
    assert fitted.source.startswith("fitted")


def test_prediction_at_vanishing_load_is_the_unloaded_path():
    wl = Workload(isl=256, osl=32, rate=1e-9)
    got = pd_validate.predict(TINY, CPU, CPU, LINK, wl)
    service = perf.prefill_s(TINY, CPU, 1, 256)
    kv = perf.kv_transfer_s(TINY, CPU, 1, perf.endpoint(CPU, 1), LINK, 256)
    step = perf.decode_step_s(TINY, CPU, 1, 1, wl.mean_context)
    assert got.ttft[0] == pytest.approx(service + kv + step, rel=1e-6)
    assert got.tpot[0] == pytest.approx(step, rel=1e-6)
    loaded = pd_validate.predict(TINY, CPU, CPU, LINK, Workload(isl=256, osl=32, rate=0.6 / service))
    assert loaded.ttft[1] > loaded.ttft[0] >= got.ttft[0] and loaded.tpot[1] >= loaded.tpot[0]


def test_arrivals_are_poisson_at_the_rate():
    times = pd_validate.arrivals(2.0, 4000, seed=1)
    assert times[0] == 0 and (times[-1] / len(times)) == pytest.approx(0.5, rel=0.05)


def test_errors_noise_and_table():
    lat = pd_validate.Latencies
    point = pd_validate.PointResult(isl=256, osl=32, rate=1.5, predicted=lat((0.1, 0.2), (0.01, 0.02)),
                                    measured=[lat((0.125, 0.2), (0.01, 0.025)), lat((0.1, 0.25), (0.011, 0.025))])
    # against the mean of the two runs: TTFT 112.5 and 225 ms, TPOT 10.5 and 25 ms
    assert point.errors() == pytest.approx([0.1 / 0.1125 - 1, 0.2 / 0.225 - 1, 0.01 / 0.0105 - 1, -0.2])
    assert point.noise() == pytest.approx([0.25, 0.25, 0.1, 0.0])
    text = pd_validate.table([point])
    assert "| 256 | 32 | 1.5 | 100.0 / 112.5 | 200.0 / 225.0 | 10.0 / 10.5 |" in text
    assert "-11%, -11%, -5%, -20%" in text
    once = msgspec.structs.replace(point, measured=point.measured[:1])
    assert once.errors() == pytest.approx([-0.2, 0.0, 0.0, -0.2]) and once.noise() is None
    assert "25%, 25%, 10%, 0%" in text


def test_the_bench_command_parses_without_starting_engines():
    parser = argparse.ArgumentParser()
    pd_validate.add_arguments(parser)
    args = parser.parse_args(["--model", "/m", "--prefill-url", "http://p", "--decode-url", "http://d",
                              "--router-url", "http://r", "--load", "0.1,0.3,0.5", "--requests", "40"])
    assert args.load == "0.1,0.3,0.5" and args.repeat == "all" and args.isl == 2048
    from vllm_hetero_pd.bench import BENCHMARKS

    assert BENCHMARKS["planner-pd"][0] == "vllm_hetero_pd.planner.pd_validate"


def test_quantiles_of_nothing_are_nan_not_an_error():
    """A 2-token link-calibration request can stream in one chunk: no TPOT, but its TTFT counts."""
    assert all(math.isnan(q) for q in pd_validate.quantiles([]))
    assert pd_validate.quantiles([1.0, 3.0])[0] == 2.0


def test_measure_uses_the_calibration_clients_timeout():
    """``_measure`` imports its HTTP client settings from ``calibrate`` lazily: the names must exist."""
    from vllm_hetero_pd.planner import calibrate

    source = inspect.getsource(pd_validate._measure)
    imported = source.split("from vllm_hetero_pd.planner.calibrate import ")[1].split("\n")[0]
    assert all(hasattr(calibrate, name.strip()) for name in imported.split(","))


def test_contention_slows_each_engine_for_the_share_of_time_the_other_is_busy():
    service = perf.prefill_s(TINY, CPU, 1, 256)
    wl = Workload(isl=256, osl=32, rate=0.5 / service)
    alone = pd_validate.predict(TINY, CPU, CPU, LINK, wl)
    assert pd_validate.predict(TINY, CPU, CPU, LINK, wl, pd_validate.Contention(1.0, 1.0)) == alone
    slow_prefill = pd_validate.predict(TINY, CPU, CPU, LINK, wl, pd_validate.Contention(prefill=1.5))
    assert slow_prefill.ttft[0] > alone.ttft[0] and slow_prefill.tpot[0] == pytest.approx(alone.tpot[0])
    slow_decode = pd_validate.predict(TINY, CPU, CPU, LINK, wl, pd_validate.Contention(decode=2.0))
    # the prefill is busy half the time, so decode steps take 1.5x (and the batch grows with them)
    assert slow_decode.tpot[0] >= 1.5 * alone.tpot[0] and slow_decode.ttft[0] > alone.ttft[0]
    idle = Workload(isl=256, osl=32, rate=1e-9)  # nothing to contend with at vanishing load
    assert pd_validate.predict(TINY, CPU, CPU, LINK, idle, pd_validate.Contention(2.0, 2.0)).ttft[0] == pytest.approx(
        pd_validate.predict(TINY, CPU, CPU, LINK, idle).ttft[0], rel=1e-6)


def test_median_error_skips_infinite_predictions():
    lat = pd_validate.Latencies
    points = [pd_validate.PointResult(isl=256, osl=32, rate=1.0, predicted=lat((0.1, math.inf), (0.01, 0.02)),
                                      measured=[lat((0.2, 0.2), (0.01, 0.01))])]
    assert pd_validate.median_error(points) == pytest.approx(0.5)  # |-50%|, |0%|, |+100%| -> 50%


EXPOSITION = """# HELP vllm:request_prefill_time_seconds Histogram of time spent in PREFILL phase for request.
# TYPE vllm:request_prefill_time_seconds histogram
vllm:request_prefill_time_seconds_bucket{engine="0",le="0.3",model_name="m"} 3.0
vllm:request_prefill_time_seconds_sum{engine="0",model_name="m"} 0.75
vllm:request_prefill_time_seconds_count{engine="0",model_name="m"} 3.0
vllm:request_queue_time_seconds_sum{engine="0",model_name="m"} 0.25
vllm:request_queue_time_seconds_count{engine="0",model_name="m"} 3.0
vllm:request_decode_time_seconds_sum{engine="0",model_name="m"} 9.0
"""


def test_the_prefill_engines_own_means_come_from_histogram_differences():
    before = pd_validate.histogram_totals(EXPOSITION)
    assert before == {"vllm:request_prefill_time_seconds": (0.75, 3.0), "vllm:request_queue_time_seconds": (0.25, 3.0)}
    after = pd_validate.histogram_totals(EXPOSITION.replace("0.75", "1.35").replace("0.25", "0.45")
                                         .replace("count{engine=\"0\",model_name=\"m\"} 3.0",
                                                  "count{engine=\"0\",model_name=\"m\"} 5.0"))
    times = pd_validate.engine_times(before, after)  # 2 requests: 0.6 s of prefill, 0.2 s of waiting
    assert times.prefill_s == pytest.approx(0.3) and times.queue_s == pytest.approx(0.1)
    assert math.isnan(pd_validate.engine_times(before, before).prefill_s)
    lat = pd_validate.Latencies((0.1, 0.2), (0.01, 0.02))
    point = pd_validate.PointResult(isl=256, osl=32, rate=1.5, predicted=lat, measured=[lat], service_s=0.25,
                                    engine=[times])
    assert "| 1.5 | 250.0 / 300.0 | 100.0 |" in pd_validate.engine_table([point])
