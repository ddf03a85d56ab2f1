"""``bench router``: the throughput goal is the mean of per-round ratios, and the bench runs end to end."""

from __future__ import annotations

import json

import pytest

from vllm_hetero_pd.router.bench import ModeResult, main, spread


def result(direct: tuple[float, ...], routed: tuple[float, ...], added_ms: float = 0.2) -> ModeResult:
    return ModeResult(stream=False, direct_p50_ms=1.0, direct_p99_ms=2.0, router_p50_ms=1.0 + added_ms,
                      router_p99_ms=3.0, direct_req_per_s=direct, router_req_per_s=routed,
                      router_cpu_us_per_req=(400.0,) * len(routed), direct_others_cpu_us_per_req=(600.0,) * len(routed),
                      routed_others_cpu_us_per_req=(350.0,) * len(routed))


def test_the_ratio_is_the_mean_of_each_rounds_back_to_back_ratio():
    r = result((1000.0, 2000.0, 1000.0), (900.0, 1400.0, 700.0))
    assert r.ratios == (0.9, 0.7, 0.7)
    assert abs(r.throughput_ratio - 2.3 / 3) < 1e-12
    assert not r.meets_goal  # mean 0.77 < 0.8, although one round reached 0.9
    assert result((1000.0, 1000.0), (800.0, 900.0)).meets_goal
    assert not result((1000.0,), (900.0,), added_ms=1.5).meets_goal
    assert spread((0.9, 0.7, 0.8), 2) == "0.80 (0.70-0.90)"
    assert r.cpu_bound_ratio == pytest.approx(600 / 750)  # the cores' prediction: 600 µs direct, 350 + 400 routed


def test_a_short_run_measures_every_round_of_both_modes(tmp_path, capsys):
    out = tmp_path / "router.json"
    # 200 requests a round: CPU time is counted in 10 ms clock ticks, and 40 requests of the router's
    # ~0.4 ms each could fall between two ticks and read as 0
    assert main(["--latency-requests", "5", "--requests", "200", "--concurrency", "4", "--repeat", "2",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [row["stream"] for row in rows] == [False, True]
    for row in rows:
        assert len(row["direct_req_per_s"]) == len(row["router_req_per_s"]) == len(row["ratios"]) == 2
        assert all(x > 0 for x in row["router_cpu_us_per_req"]) and "start" in row["load_average"]
        assert all(x > 0 for x in row["direct_others_cpu_us_per_req"] + row["routed_others_cpu_us_per_req"])
        assert 0 < row["cpu_bound_ratio"] < 5
    assert "load average before" in capsys.readouterr().out


def test_repeat_must_be_positive():
    with pytest.raises(SystemExit, match="--repeat"):
        main(["--repeat", "0"])


@pytest.mark.parametrize("relay", ["bare-aiohttp", "bare-httptools"])
def test_a_bare_relay_serves_the_routed_path_of_both_modes(tmp_path, capsys, relay):
    """The bare relays answer what the bench checks (status 200, streams ending in [DONE]) over real HTTP."""
    out = tmp_path / "relay.json"
    assert main(["--relay", relay, "--latency-requests", "5", "--requests", "40", "--concurrency", "4",
                 "--repeat", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [row["stream"] for row in rows] == [False, True] and all(row["router_req_per_s"][0] > 0 for row in rows)
    assert capsys.readouterr().out.startswith(relay)


def test_router_args_are_refused_for_a_bare_relay():
    with pytest.raises(SystemExit, match="--router-arg"):
        main(["--relay", "bare-httptools", "--router-arg=--prefill-policy=kv_aware"])
