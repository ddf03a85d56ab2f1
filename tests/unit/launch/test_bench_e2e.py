"""The benchmark's table logic: per-request averages from histogram deltas and the ratios issue 4 names."""

import pytest

from vllm_hetero_pd.launch.bench_e2e import markdown_table, ratios, summarize


def serve(ttft: float, n: int = 30) -> dict:
    return {"completed": n, "p50_ttft_ms": ttft, "p90_ttft_ms": ttft * 2, "p50_tpot_ms": 5.0}


def test_summarize_uses_deltas_per_request():
    before = {"transfer_sum": 1.0, "transfer_count": 10, "bytes": 1000, "translate_sum": 0.5}
    after = {"transfer_sum": 1.3, "transfer_count": 40, "bytes": 1000 + 30 * 4096, "translate_sum": 0.8}
    row = summarize("ours-bs32-to-bs128", serve(12.0), before, after)
    assert row.transfer_ms_per_req == pytest.approx(10.0)
    assert row.translate_ms_per_req == pytest.approx(10.0)
    assert row.bytes_per_req == pytest.approx(4096)


def test_summarize_rejects_a_run_without_transfers():
    same = {"transfer_sum": 1.0, "transfer_count": 10, "bytes": 5}
    with pytest.raises(RuntimeError, match="no KV transfers"):
        summarize("ours-bs128-to-bs128", serve(10.0), same, same)


def test_ratios_and_table():
    deltas = ({"transfer_sum": 0, "transfer_count": 0, "bytes": 0},
              {"transfer_sum": 0.03, "transfer_count": 30, "bytes": 30 * 1_000_000})
    results = {"upstream-nixl": summarize("upstream-nixl", serve(20.0), None, None),
               "ours-bs128-to-bs128": summarize("ours-bs128-to-bs128", serve(10.0), *deltas),
               "ours-bs32-to-bs128": summarize("ours-bs32-to-bs128", serve(15.0), None, None)}
    got = ratios(results, raw_bytes_per_s=2e9)
    assert got["ttft_p50 ours-same-format / upstream"] == pytest.approx(0.5)
    assert got["ttft_p50 ours-bs32-to-bs128 / ours-same-format"] == pytest.approx(1.5)
    assert got["transfer bytes/s ours-bs128-to-bs128 / raw NIXL"] == pytest.approx(0.5)  # 1e6 B per 1 ms = 1e9 B/s
    table = markdown_table({n: [r] for n, r in results.items()}, {k: [v] for k, v in got.items()}, [2e9], (0.5, 0.7))
    assert "| ours-bs128-to-bs128 | 30 | 10.00 |" in table and "0.500" in table and "NOISY" not in table


def test_rounds_are_shown_as_mean_and_range_and_a_loaded_host_is_marked_noisy():
    rounds = {"monolithic": [summarize("monolithic", serve(t), None, None) for t in (10.0, 12.0, 14.0)]}
    table = markdown_table(rounds, {"some ratio": [0.5, 1.0, 1.5]}, [], (2.0, 2.5))
    assert "| monolithic | 90 | 12.00 (10.00-14.00) |" in table and "| some ratio | 1.000 (0.500-1.500) |" in table
    assert "NOISY" in table and "3 round(s)" in table
