"""``bench goodput``'s pure parts: schedule, scoring, summary, crossover, tables. No engine starts here."""

from __future__ import annotations

import argparse
from pathlib import Path

import msgspec
import pytest

from vllm_hetero_pd.launch import bench_goodput, goodput
from vllm_hetero_pd.launch.goodput import Mix, Run, Spread, Timing, summarize
from vllm_hetero_pd.planner.calibrate import Completion
from vllm_hetero_pd.planner.goodput import Predicted, RequestSlo

SLO = RequestSlo(ttft_s=2.0, tpot_s=0.02)
OK, SLOW_START, SLOW_STREAM = Timing(0.5, 0.01), Timing(3.0, 0.01), Timing(0.5, 0.05)


def run(config: str, rate: float, timings: list[Timing], repeat: int = 0, errors: int = 0) -> Run:
    return Run(config=config, rate=rate, repeat=repeat, timings=timings, errors=["boom"] * errors)


def test_schedule_is_deterministic_in_range_and_poisson():
    mix = Mix(isl=(512, 1536), osl=(128, 256))
    first, again = goodput.schedule(mix, 1.5, 2000, seed=7), goodput.schedule(mix, 1.5, 2000, seed=7)
    assert first == again and first != goodput.schedule(mix, 1.5, 2000, seed=8)
    assert all(512 <= r.isl <= 1536 and 128 <= r.osl <= 256 for r in first)
    assert first[0].offset_s == 0 and first[-1].offset_s / len(first) == pytest.approx(1 / 1.5, rel=0.06)
    assert sum(r.isl for r in first) / len(first) == pytest.approx(mix.mean_isl, rel=0.03)
    assert [r.offset_s for r in first] == sorted(r.offset_s for r in first)


def test_mix_rejects_ranges_it_cannot_score():
    with pytest.raises(ValueError, match="--isl"):
        Mix(isl=(600, 500))
    with pytest.raises(ValueError, match="TPOT needs two tokens"):
        Mix(osl=(1, 8))


def test_tpot_counts_tokens_asked_for_not_chunks():
    burst = Completion(start=0.0, chunk_times=(0.4, 0.5, 1.4))  # 11 tokens in 3 chunks
    got = goodput.timing(burst, 11)
    assert got.ttft_s == pytest.approx(0.4) and got.tpot_s == pytest.approx(0.1)


def test_attainment_misses_and_failures():
    r = run("pd", 2.0, [OK, OK, SLOW_START, SLOW_STREAM, Timing(3.0, 0.05)], errors=1)
    assert r.attainment(SLO) == pytest.approx(2 / 6)
    assert r.misses(SLO) == (2, 2)
    ttft_p50, ttft_p90, tpot_p50, _ = r.latencies()
    assert ttft_p50 == pytest.approx(0.5) and ttft_p90 == pytest.approx(3.0) and tpot_p50 == pytest.approx(0.01)


def test_summary_is_mean_and_range_over_repetitions_with_the_prediction():
    runs = [run("monolithic", 1.0, [OK] * 4, 0), run("monolithic", 1.0, [OK, OK, SLOW_START, SLOW_START], 1),
            run("pd", 1.0, [OK] * 4, 0), run("pd", 1.0, [OK] * 4, 1)]
    predicted = Predicted(rate=1.0, ttft_s=(0.4, 0.6), tpot_s=(0.01, 0.012), attainment=0.95)
    mono, pd = summarize(runs, SLO, {("pd", 1.0): predicted})
    assert (mono.config, pd.config) == ("monolithic", "pd")
    assert mono.goodput == Spread(0.75, 0.5, 1.0) and mono.miss_ttft == 2 and mono.requests == 8
    assert mono.ttft_p90_s.high == pytest.approx(3.0) and mono.predicted is None
    assert pd.goodput == Spread(1.0, 1.0, 1.0) and pd.predicted == predicted
    assert goodput.spread([1.0, 2.0, 6.0]) == Spread(3.0, 1.0, 6.0)


def _points(mono: list[list[float]], pd: list[list[float]], rates=(0.5, 1.0, 1.5)):
    """Points whose per-repetition attainments are given per rate (4 requests each: 0, .25, ... 1)."""
    runs = []
    for config, shares in (("monolithic", mono), ("pd", pd)):
        for rate, per_rep in zip(rates, shares):
            for rep, share in enumerate(per_rep):
                met = round(4 * share)
                runs.append(run(config, rate, [OK] * met + [SLOW_START] * (4 - met), rep))
    return summarize(runs, SLO, {})


def test_crossover_needs_the_ranges_apart():
    apart = _points([[1, 1], [0.5, 0.75], [0.25, 0.25]], [[1, 1], [1, 1], [0.5, 0.75]])
    assert goodput.crossover(apart) == 1.0
    overlapping = _points([[1, 1], [0.5, 1], [0.25, 0.5]], [[1, 1], [0.75, 1], [0.5, 0.5]])
    assert goodput.crossover(overlapping) is None
    text = goodput.verdict(overlapping, SLO)
    assert text.startswith("P/D does not beat monolithic here (0.5-1.5 req/s; ahead on the mean at 1, 1.5 req/s")
    assert "over TTFT 2000 ms" in text and "At the lowest rate (0.5 req/s) TTFT p50 is 500 ms" in text
    assert "Monolithic leads most at 0.5 req/s" not in text  # equal there: it leads nowhere
    assert "Monolithic is never ahead on the mean; closest at 0.5 req/s: goodput 0.50 (P/D) vs 0.50" in text
    mono_ahead = goodput.verdict(_points([[1, 1], [1, 1], [0.75, 0.75]], [[1, 1], [1, 1], [0.5, 0.75]]), SLO)
    assert "Monolithic leads most at 1.5 req/s: goodput 0.94 (0.75-1.12) (P/D) vs 1.12" in mono_ahead
    won = goodput.verdict(apart, SLO)
    assert won.startswith("P/D beats monolithic from 1 req/s: goodput 1.00 vs 0.62 (0.50-0.75)")
    assert won.endswith("it wins at 1, 1.5 req/s.") and goodput.wins(apart) == [1.0, 1.5]


def test_predicted_win_needs_a_margin():
    rates = [0.5, 1.0, 1.5]
    assert goodput.first_win(rates, [0.5, 1.0, 1.0], [0.5, 1.005, 1.4]) == 1.5
    assert goodput.first_win(rates, [0.5, 1.0, 1.5], [0.5, 1.0, 1.5]) is None


def test_tables_render_measured_and_predicted_cells():
    points = _points([[1, 0.5]], [[1, 1]], rates=(0.8,))
    pred = Predicted(rate=0.8, ttft_s=(0.25, 0.5), tpot_s=(0.0125, float("inf")), attainment=0.5)
    points = [points[0], msgspec.structs.replace(points[1], predicted=pred)]
    table = goodput.goodput_table(points)
    assert "| 0.8 | 0.60 (0.40-0.80) / - | 75% | 0.80 / 0.40 | 100% |" in table
    lat = goodput.latency_table(points)
    assert "| 0.8 | P/D (1 + 1 cores) | 500 / 250 | 500 / 500 | 10.0 / 12.5 | 10.0 / inf | 0, 0, 0 / 8 |" in lat
    assert "| 0.8 | monolithic (2 cores) | 1125 (500-1750) | " in lat  # p50 of 0.5 s x2 + 3 s x2 is 1.75 s


def test_expected_duration_fits_the_half_hour():
    assert goodput.expected_s([0.4, 0.8, 1.2, 1.6], 24, 3, calibrate=True) < 30 * 60
    assert goodput.expected_s([0.4, 0.8, 1.2, 1.6], 8, 1, calibrate=True) < 8 * 60


def test_engines_bind_both_cores_to_monolithic_and_one_each_to_the_pair():
    mono, prefill, decode = bench_goodput.engine_specs("/m", (2, 3))
    assert (mono.role, mono.cpu_cores, mono.kv_transfer_config) == ("monolithic", "2,3", None)
    assert (prefill.cpu_cores, decode.cpu_cores) == ("2", "3")
    assert "--no-enable-prefix-caching" in mono.extra_args + prefill.extra_args + decode.extra_args


def test_the_command_parses_and_is_registered():
    parser = argparse.ArgumentParser()
    bench_goodput.add_arguments(parser)
    quick = bench_goodput.settings(parser.parse_args(["--quick", "--cores", "0,1"]))
    assert (quick.requests, quick.repeat, quick.rates, quick.cores) == (8, 1, [0.4, 0.8, 1.2, 1.6], (0, 1))
    full = bench_goodput.settings(parser.parse_args(["--cores", "0,1", "--repeat", "5"]))
    assert (full.requests, full.repeat, full.mix.isl, full.slo.tpot_s) == (24, 5, (512, 1536), 0.02)
    for bad, message in ((["--cores", "1,1"], "two distinct cores"), (["--isl", "600-500"], "--isl"),
                         (["--rates", "0,1"], "--rates")):
        with pytest.raises(ValueError, match=message):
            bench_goodput.settings(parser.parse_args(["--cores", "0,1", *bad]))
    line = bench_goodput.header(quick, 2.0, 3.0, Path("cal.yaml"))[1]
    assert line.startswith("Load average 2.00 before, 3.00 after (noisy); 1 repetition(s) of 8 requests per rate")
    from vllm_hetero_pd.bench import BENCHMARKS

    assert BENCHMARKS["goodput"][0] == "vllm_hetero_pd.launch.bench_goodput"


def test_a_sweep_against_fake_engines_scores_every_request_and_reports(tmp_path):
    """The measuring path end to end on in-process fakes (one behind the real router): no vLLM."""
    import asyncio
    import threading

    from vllm_hetero_pd.testing.fake_backend import FakeCluster, FakeVllm

    ready, stop = threading.Event(), threading.Event()
    urls: dict[str, str] = {}

    async def serve() -> None:
        mono = FakeVllm("both", "mono", token_interval_s=0.001, record=False)
        await mono.start()
        async with FakeCluster(token_interval_s=0.001, record=False) as cluster:
            urls.update(monolithic=mono.url, pd=cluster.url)
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.02)
        await mono.stop()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    try:
        assert ready.wait(20)
        mix = Mix(isl=(8, 16), osl=(4, 6))
        runs = bench_goodput.sweep(urls, mix, [20.0, 40.0], 5, 2, 2048, 0, SLO, tmp_path)
    finally:
        stop.set()
        thread.join(20)
    assert [(r.config, r.rate, r.repeat) for r in runs][:4] == [("monolithic", 20.0, 0), ("pd", 20.0, 0),
                                                               ("pd", 40.0, 0), ("monolithic", 40.0, 0)]
    assert all(len(r.timings) == 5 and not r.errors for r in runs)
    assert msgspec.json.decode((tmp_path / "runs.json").read_bytes(), type=list[Run]) == runs
    points = summarize(runs, SLO, {})
    text = bench_goodput.report(["header"], points, SLO, None, 40.0)
    assert "Measured crossover: none in the sweep; the planner predicts P/D does not beat monolithic up to 40" in text
    assert "P/D does not beat monolithic here (20-40 req/s" in text
