"""Transfer statistics: per request on the worker, aggregated by vLLM, exported to Prometheus.

Metric names (all per engine):
- ``vllm:hetero_pd_transfer_seconds``   histogram, NIXL READ time per request (all chunks)
- ``vllm:hetero_pd_translate_seconds``  histogram, shim time per request (0 on the direct path)
- ``vllm:hetero_pd_bytes_transferred``  histogram, bytes READ per request
- ``vllm:hetero_pd_failed_loads_total`` counter, requests whose KV could not be loaded
- ``vllm:hetero_pd_handshake_failures_total`` counter, handshakes with a prefill that failed
- ``vllm:hetero_pd_staging_occupancy`` gauge, fraction of staging slots in use (max over ranks)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm.v1.metrics.utils import create_metric_per_engine

KEYS = ("transfer_s", "translate_s", "bytes")


@dataclass
class TransferStats:
    """One request's load on the decode side."""

    bytes: int = 0
    transfer_s: float = 0.0
    translate_s: float = 0.0
    total_s: float = 0.0


COUNTERS = ("failed", "handshake_failures")


def _empty() -> dict[str, Any]:
    return {**{k: [] for k in KEYS}, **{k: 0 for k in COUNTERS}, "staging_occupancy": 0.0}


@dataclass
class HeteroConnectorStats(KVConnectorStats):
    data: dict[str, Any] = field(default_factory=_empty)

    @classmethod
    def of(cls, finished: list[TransferStats], failed: int, handshake_failures: int,
           staging_occupancy: float) -> HeteroConnectorStats:
        return cls(data={"transfer_s": [s.transfer_s for s in finished],
                         "translate_s": [s.translate_s for s in finished],
                         "bytes": [s.bytes for s in finished], "failed": failed,
                         "handshake_failures": handshake_failures, "staging_occupancy": staging_occupancy})

    def reset(self) -> None:
        self.data = _empty()

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k in KEYS:
            self.data[k] = self.data[k] + list(other.data.get(k, []))
        for k in COUNTERS:
            self.data[k] += other.data.get(k, 0)
        self.data["staging_occupancy"] = max(self.data["staging_occupancy"], other.data.get("staging_occupancy", 0.0))
        return self

    def reduce(self) -> dict[str, int | float]:
        n = len(self.data["bytes"])
        if not n:
            return {"num_loads": 0, "failed": self.data["failed"]}
        return {"num_loads": n, "failed": self.data["failed"],
                "avg_transfer_ms": 1000 * sum(self.data["transfer_s"]) / n,
                "avg_translate_ms": 1000 * sum(self.data["translate_s"]) / n,
                "avg_MB": sum(self.data["bytes"]) / n / 1e6}

    def is_empty(self) -> bool:
        return not self.data["bytes"] and not any(self.data[k] for k in COUNTERS)


class HeteroPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config: VllmConfig, metric_types, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        seconds = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]

        def per_engine(cls, name: str, doc: str, **kw):
            return create_metric_per_engine(cls(name=name, documentation=doc, labelnames=labelnames, **kw),
                                            self.per_engine_labelvalues)

        self.transfer = per_engine(self._histogram_cls, "vllm:hetero_pd_transfer_seconds",
                                   "NIXL READ time per request loaded by HeteroNixlConnector.", buckets=seconds)
        self.translate = per_engine(self._histogram_cls, "vllm:hetero_pd_translate_seconds",
                                    "Format translation time per request (0 when formats match).", buckets=seconds)
        self.bytes = per_engine(self._histogram_cls, "vllm:hetero_pd_bytes_transferred",
                                "Bytes READ per request.", buckets=[2 ** (10 + 2 * i) for i in range(12)])
        self.failed = per_engine(self._counter_cls, "vllm:hetero_pd_failed_loads",
                                 "Requests whose KV could not be loaded from their prefill.")
        self.handshake_failures = per_engine(self._counter_cls, "vllm:hetero_pd_handshake_failures",
                                             "Handshakes with a prefill engine that failed.")
        self.staging = per_engine(self._gauge_cls, "vllm:hetero_pd_staging_occupancy",
                                  "Fraction of the decode's staging slots in use.", multiprocess_mode="max")

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for value in transfer_stats_data.get("transfer_s", []):
            self.transfer[engine_idx].observe(value)
        for value in transfer_stats_data.get("translate_s", []):
            self.translate[engine_idx].observe(value)
        for value in transfer_stats_data.get("bytes", []):
            self.bytes[engine_idx].observe(value)
        if transfer_stats_data.get("failed"):
            self.failed[engine_idx].inc(transfer_stats_data["failed"])
        if transfer_stats_data.get("handshake_failures"):
            self.handshake_failures[engine_idx].inc(transfer_stats_data["handshake_failures"])
        self.staging[engine_idx].set(transfer_stats_data.get("staging_occupancy", 0.0))
