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
    assert point.errors() == pytest.approx([-0.2, 0.0, 0.0, -0.2])
    assert point.noise() == pytest.approx([0.25, 0.25, 0.1, 0.0])
    text = pd_validate.table([point])
    assert "| 256 | 32 | 1.5 | 100.0 / 125.0 | 200.0 / 200.0 |" in text and "-20%, +0%, +0%, -20%" in text
    assert "25%, 25%, 10%, 0%" in text


def test_the_bench_command_parses_without_starting_engines():
    parser = argparse.ArgumentParser()
    pd_validate.add_arguments(parser)
    args = parser.parse_args(["--model", "/m", "--prefill-url", "http://p", "--decode-url", "http://d",
                              "--router-url", "http://r", "--load", "0.1,0.3,0.5", "--requests", "40"])
    assert args.load == "0.1,0.3,0.5" and args.repeat == 1
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
