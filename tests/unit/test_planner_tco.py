"""TCO mode: owned-hardware $/h from capex, capital cost, power and facility, every input sourced."""

from __future__ import annotations

import json

import msgspec
import pytest

from vllm_hetero_pd.cli import main
from vllm_hetero_pd.planner.catalog import CatalogError, load_catalog

CATALOG = load_catalog()
BASE = ["plan", "--model", "llama-3.1-70b", "--dtype", "fp8", "--isl", "4096", "--osl", "512", "--rate", "10",
        "--ttft-p90", "2000", "--tpot-p90", "50", "--devices", "H100,B200,Gaudi3", "--json"]


def test_h100_owned_cost_per_hour_by_hand():
    # capital: $30,000 x 1.4 = $42,000; annuity at 8 % over 4 years = 0.08 / (1 - 1.08^-4) = 0.30192
    #   -> $12,680.7 / year / 8760 h = $1.4476/h
    # energy: (700 W x 0.7 + 500 W) = 0.99 kW x PUE 1.2 x $0.08/kWh = $0.0950/h
    # facility: (700 + 500) W = 1.2 kW x $150/kW-month x 12 / 8760 = $0.2466/h
    # total $1.789/h (rental: $2.99/h)
    assert CATALOG.tco.per_hour(CATALOG.device("H100")) == pytest.approx(1.789, rel=0.005)
    assert CATALOG.owned().device("H100").price_per_hour == pytest.approx(1.789, rel=0.005)
    assert "TCO: capex" in CATALOG.owned().device("H100").sources["price_per_hour"]


def test_every_tco_default_has_a_source_or_says_it_is_an_assumption():
    tco = CATALOG.tco
    for field, source in tco.sources.items():
        assert source.strip(), field
    assert set(tco.sources) == set(tco.__struct_fields__) - {"sources"}
    for dev in CATALOG.devices.values():
        assert dev.capex_usd > 0 and dev.sources["capex_usd"].strip(), dev.name
    unsourced = [d.name for d in CATALOG.devices.values() if "[assumption]" in d.sources["capex_usd"]]
    assert set(unsourced) == {"A100", "L40S", "MI325X", "MI355X", "CPU"}  # no public price we could cite


def test_a_catalog_tco_section_needs_sources(tmp_path):
    bad = tmp_path / "tco.yaml"
    fields = {f: 1.0 for f in CATALOG.tco.__struct_fields__ if f != "sources"}
    bad.write_bytes(msgspec.yaml.encode({"tco": {**fields, "sources": {"pue": "mine"}}}))
    with pytest.raises(CatalogError, match="tco: no source for system_capex_fraction"):
        load_catalog([bad])


def test_cli_tco_mode_prices_plans_by_ownership_and_reports_both_token_bases(capsys):
    assert main(BASE) == 0
    rental = json.loads(capsys.readouterr().out)["result"]["best"]
    assert main([*BASE, "--cost", "tco", "--tco", "usd_per_kwh=0.2,pue=1.5"]) == 0
    doc = json.loads(capsys.readouterr().out)
    owned = doc["result"]["best"]
    assert owned["cost_per_hour"] < rental["cost_per_hour"]  # ownership is cheaper than these rentals
    # $/Mtok of input + output = $/h / ((4096 + 512) tokens x 10 req/s x 3600 s) x 1e6
    assert owned["cost_per_mtok_all"] == pytest.approx(owned["cost_per_hour"] / (4608 * 10 * 3600) * 1e6)
    assert owned["cost_per_mtok"] == pytest.approx(owned["cost_per_mtok_all"] * 4608 / 512)
    assert doc["catalog"]["devices"]["B200"]["price_per_hour"] == pytest.approx(
        CATALOG.tco.__class__(**{**msgspec.structs.asdict(CATALOG.tco), "usd_per_kwh": 0.2, "pue": 1.5}).per_hour(
            CATALOG.device("B200")))


def test_cli_rejects_an_unknown_tco_input(capsys):
    assert main([*BASE, "--cost", "tco", "--tco", "pu=1.4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tco pu: not a TCO input; known: system_capex_fraction" in err
