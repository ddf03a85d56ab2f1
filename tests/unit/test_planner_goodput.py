"""Predicted SLO attainment and goodput (planner/goodput.py): pure, no engine."""

from __future__ import annotations

import math

import pytest

from vllm_hetero_pd.planner import colocated, goodput, pd_validate
from vllm_hetero_pd.planner.catalog import load_catalog
from vllm_hetero_pd.planner.model import from_hf_config
from vllm_hetero_pd.planner.workload import Workload, WorkloadError

TINY = from_hf_config({"num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 512,
                       "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32, "vocab_size": 2048},
                      name="tiny", weight_dtype="bf16")
CPU = load_catalog().device("CPU")
LINK = load_catalog().link(CPU, CPU)
SLO = goodput.RequestSlo(ttft_s=2.0, tpot_s=0.02)


def test_attainment_inverts_a_quantile_function():
    def exponential(q: float) -> float:  # mean 1 s
        return -math.log(1 - q)

    assert goodput.attainment(exponential, math.log(2)) == pytest.approx(0.5, abs=1e-6)
    assert goodput.attainment(exponential, 1e-12) == pytest.approx(0.0, abs=1e-6)
    assert goodput.attainment(lambda q: math.inf, 10.0) == pytest.approx(0.0, abs=1e-6)
    assert goodput.attainment(lambda q: 0.1, 1.0) == goodput.MAX_QUANTILE


def test_joint_attainment_is_the_product_and_goodput_the_rate_times_it():
    def latency(q: float) -> tuple[float, float]:
        return q, 2 * q  # TTFT uniform on [0, 1], TPOT on [0, 2]

    got = goodput.predicted(3.0, latency, goodput.RequestSlo(ttft_s=0.5, tpot_s=0.5))
    assert got.attainment == pytest.approx(0.5 * 0.25, abs=1e-6)
    assert got.goodput == pytest.approx(3.0 * 0.125, abs=1e-5)
    assert got.ttft_s == (0.5, 0.9) and got.tpot_s == (1.0, 1.8)


def test_points_use_the_planner_models_quantiles():
    wl = Workload(isl=1024, osl=192, rate=0.8)
    mono = goodput.colocated_point(TINY, CPU, wl, SLO)
    pd = goodput.pd_point(TINY, CPU, CPU, LINK, wl, SLO)
    assert mono.ttft_s == pytest.approx(tuple(colocated.predict(TINY, CPU, 1, wl, 0.8, q)[0] for q in (0.5, 0.9)))
    assert pd.tpot_s == pytest.approx(pd_validate.predict(TINY, CPU, CPU, LINK, wl).tpot)
    assert 0.9 < mono.attainment <= 1 and 0.9 < pd.attainment <= 1


def test_past_capacity_nothing_is_predicted_to_meet_the_slo():
    wl = Workload(isl=1024, osl=192, rate=50.0)
    assert goodput.colocated_point(TINY, CPU, wl, SLO).goodput == 0.0
    assert goodput.pd_point(TINY, CPU, CPU, LINK, wl, SLO).goodput == pytest.approx(0.0, abs=1e-6)


def test_slo_must_be_positive():
    with pytest.raises(WorkloadError, match="--tpot-slo-ms"):
        goodput.RequestSlo(ttft_s=1.0, tpot_s=0.0)
