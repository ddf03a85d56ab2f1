"""Uncertainty: the band of a cost ratio over every unmeasured catalog input, and what moves it most."""

from __future__ import annotations

import json

import pytest

from vllm_hetero_pd.cli import main
from vllm_hetero_pd.planner import reproduce, sensitivity
from vllm_hetero_pd.planner.catalog import load_catalog
from vllm_hetero_pd.planner.model import load_model
from vllm_hetero_pd.planner.workload import Slo, Workload

CATALOG = load_catalog()


def test_only_unmeasured_inputs_are_swept():
    inputs = set(sensitivity.uncertain_inputs(CATALOG, {"H100", "Gaudi3"}, tco=False))
    assert ("Gaudi3", "price_per_hour") in inputs and ("Gaudi3", "memory_efficiency") in inputs
    assert ("H100", "price_per_hour") not in inputs  # a quoted Lambda price
    assert ("H100", "fp8_efficiency") not in inputs  # MLE's measured MAMF
    owned = set(sensitivity.uncertain_inputs(CATALOG, {"H100"}, tco=True))
    assert ("tco", "amortisation_years") in owned and not any(f == "price_per_hour" for _, f in owned)


def test_moves_keep_efficiencies_physical():
    moved = sensitivity.moved(CATALOG, "Gaudi2", "bf16_efficiency", 1.2)
    assert moved.devices["Gaudi2"].bf16_efficiency == 1.0  # 0.969 x 1.2 capped
    assert sensitivity.moved(CATALOG, "tco", "pue", 1.3).tco.pue == pytest.approx(1.2 * 1.3)


def test_band_spans_the_swings_ranked_by_width():
    def ratio(catalog):  # depends on one input only
        return catalog.devices["Gaudi3"].price_per_hour / 1.99
    band = sensitivity.band(ratio, CATALOG, {"Gaudi3"})
    assert band.base == pytest.approx(1.0)
    assert (band.low, band.high) == pytest.approx((0.7, 1.3))
    assert band.swings[0].input == "Gaudi3.price_per_hour" and all(s.width == 0 for s in band.swings[1:])
    assert "moved most by Gaudi3.price_per_hour 0.70-1.30x" in band.describe()


def test_cli_reports_the_band_of_its_mode_ratio(capsys):
    code = main(["plan", "--model", "llama-3.1-70b", "--dtype", "fp8", "--isl", "4096", "--osl", "512", "--rate", "10",
                 "--ttft-p90", "2000", "--tpot-p90", "50", "--devices", "B200,Gaudi3", "--json", "--sensitivity"])
    band = json.loads(capsys.readouterr().out)["sensitivity"]
    assert code == 0 and band["low"] <= band["base"] <= band["high"] and band["swings"]


def test_reproduction_claim_is_moved_most_by_the_inferred_gaudi3_inputs():
    model = load_model("llama-3.1-70b", weight_dtype="fp8")
    workload, slo = Workload(isl=512, osl=4096, rate=50), Slo(ttft_s=1.0, tpot_s=0.05)
    band = reproduce.claim_band(CATALOG, model, workload, slo, "B200:Gaudi3", ("H100:H100",), tco=False)
    assert band.low < band.base < band.high
    assert {s.input for s in band.swings[:3]} & {"Gaudi3.price_per_hour", "Gaudi3.memory_efficiency"}
