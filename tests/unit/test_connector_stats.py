"""Connector stats aggregate across TP workers the way vLLM combines them before Prometheus."""

from vllm_hetero_pd.connector.stats import HeteroConnectorStats, TransferStats


def test_aggregate_concatenates_samples_sums_counters_and_keeps_the_fullest_staging():
    a = HeteroConnectorStats.of([TransferStats(bytes=100, transfer_s=0.01, translate_s=0.002)], 1, 0, 0.25)
    b = HeteroConnectorStats.of([TransferStats(bytes=300, transfer_s=0.03)], 0, 2, 0.5)
    merged = a.aggregate(b)
    assert merged.data["bytes"] == [100, 300] and merged.data["handshake_failures"] == 2
    assert merged.data["staging_occupancy"] == 0.5
    summary = merged.reduce()
    assert summary["num_loads"] == 2 and summary["failed"] == 1
    assert abs(summary["avg_transfer_ms"] - 20.0) < 1e-9 and abs(summary["avg_translate_ms"] - 1.0) < 1e-9


def test_empty_and_reset():
    stats = HeteroConnectorStats.of([], 0, 0, 0.0)
    assert stats.is_empty()
    stats = HeteroConnectorStats.of([], 1, 0, 0.0)
    assert not stats.is_empty()
    stats.reset()
    assert stats.is_empty()
