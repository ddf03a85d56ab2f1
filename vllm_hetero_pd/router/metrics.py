"""Prometheus metrics of one router, in its own registry so several routers can live in one process.

Accounting invariant (checked by the load test): every proxied request ends in exactly one
``requests_total`` outcome, ``ok`` or ``error``, and every ``error`` has exactly one
``errors_total`` cause (``RequestOutcome`` records it once, whatever ends the request). Retries,
recoveries and ejections are counted separately and never end a request.
"""

from __future__ import annotations

import enum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from vllm_hetero_pd.router.protocol import Endpoint

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_COST_BUCKETS = (0, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)  # prefill-token equivalents
_PAIR_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ErrorCause(str, enum.Enum):
    """Why a request ended in an error (the ``cause`` label)."""

    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    BODY_TOO_LARGE = "body_too_large"
    NO_PREFILL_INSTANCE = "no_prefill_instance"
    NO_DECODE_INSTANCE = "no_decode_instance"
    PREFILL_FAILED = "prefill_failed"
    DECODE_FAILED = "decode_failed"
    UPSTREAM_CLIENT_ERROR = "upstream_client_error"
    STREAM_INTERRUPTED = "stream_interrupted"
    CLIENT_DISCONNECTED = "client_disconnected"
    INTERNAL = "internal"


class RecoveryAction(str, enum.Enum):
    """What the router tried after a decode failed (the ``action`` label), in the order it tries them."""

    OTHER_DECODE_SAME_PARAMS = "other_decode_same_params"  # the failed decode never got the request
    OTHER_DECODE_FRESH_PREFILL = "other_decode_fresh_prefill"
    SAME_DECODE_FRESH_PREFILL = "same_decode_fresh_prefill"  # no other decode left; it answered 5xx
    LOCAL_PREFILL = "local_prefill"  # that failed too: the decode prefills the prompt itself


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "hetero_pd_router_requests", "Proxied requests by endpoint and final outcome", ["endpoint", "outcome"],
            registry=r,
        )
        self.errors = Counter("hetero_pd_router_errors", "Requests that ended in an error, by cause", ["cause"],
                              registry=r)
        self.in_flight = Gauge(
            "hetero_pd_router_in_flight", "Requests in flight per instance", ["role", "instance"], registry=r
        )
        self.healthy = Gauge(
            "hetero_pd_router_instance_healthy", "1 if the instance is admitted, 0 if ejected", ["role", "instance"],
            registry=r,
        )
        self.prefill_latency = Histogram(
            "hetero_pd_router_prefill_seconds", "Prefill call duration (successful calls)", ["instance"],
            buckets=_LATENCY_BUCKETS_S, registry=r,
        )
        self.decode_first_byte = Histogram(
            "hetero_pd_router_decode_first_byte_seconds", "Decode call start to response headers", ["instance"],
            buckets=_LATENCY_BUCKETS_S, registry=r,
        )
        self.decode_latency = Histogram(
            "hetero_pd_router_decode_seconds", "Decode call duration until the last byte (successful calls)",
            ["instance"], buckets=_LATENCY_BUCKETS_S, registry=r,
        )
        self.retries = Counter("hetero_pd_router_retries", "Attempts repeated on another instance", ["role"],
                               registry=r)
        self.ejections = Counter("hetero_pd_router_ejections", "Instances ejected after consecutive failures",
                                 ["role"], registry=r)
        self.readmissions = Counter("hetero_pd_router_readmissions", "Ejected instances re-admitted by a probe",
                                    ["role"], registry=r)
        self.recoveries = Counter(
            "hetero_pd_router_decode_recoveries", "Attempts to recover a request from a failed decode, by action",
            ["action"], registry=r,
        )
        self.local_prefill = Counter(
            "hetero_pd_router_local_prefill", "Requests prefilled by the decode instance itself", ["reason"],
            registry=r,
        )
        # kv_aware routing: one sample per routed part (see routing.py)
        self.routes = Counter(
            "hetero_pd_router_routes", "Routing decisions by chosen pair (prefill 'local': the decode prefills)",
            ["prefill", "decode"], registry=r,
        )
        self.prompt_tokens = Counter(
            "hetero_pd_router_prompt_tokens", "Prompt tokens routed to each instance (exact with a tokenizer)",
            ["role", "instance"], registry=r,
        )
        self.prefix_hit_tokens = Counter(
            "hetero_pd_router_prefix_hit_tokens", "Prompt tokens the chosen instance was expected to have cached, "
            "by where the router knew it from (events, sent)", ["role", "instance", "source"], registry=r,
        )
        self.route_cost = Histogram(
            "hetero_pd_router_route_cost", "Cost of the chosen pair by term (prefill-token equivalents)", ["term"],
            buckets=_COST_BUCKETS, registry=r,
        )
        self.pair_transfer = Histogram(
            "hetero_pd_router_pair_transfer_seconds", "Expected KV transfer + translation time of the chosen pair",
            ["prefill", "decode"], buckets=_PAIR_BUCKETS_S, registry=r,
        )
        self.over_watermark = Counter(
            "hetero_pd_router_decode_over_watermark", "Requests sent to a decode whose KV would pass the watermark "
            "(every decode would)", ["decode"], registry=r,
        )
        self.kv_events = Counter(
            "hetero_pd_router_kv_events", "KV cache events applied, by instance and kind", ["instance", "kind"],
            registry=r,
        )
        self.kv_event_gaps = Counter(
            "hetero_pd_router_kv_event_gaps", "Breaks in an instance's KV event stream, by outcome (replayed, "
            "rebuilt, restarted)", ["instance", "outcome"], registry=r,
        )
        self.prefix_view_synced = Gauge(
            "hetero_pd_router_prefix_view_synced", "1 while the instance's prefix view follows its KV events, 0 "
            "while the router's own record of what it sent answers", ["role", "instance"], registry=r,
        )
        self.kv_usage = Gauge(
            "hetero_pd_router_instance_kv_usage", "KV cache usage an instance last reported (vllm:kv_cache_usage_perc)",
            ["role", "instance"], registry=r,
        )
        self.scrape_failures = Counter(
            "hetero_pd_router_scrape_failures", "Failed polls of an instance's /metrics", ["instance"], registry=r,
        )
        # the ratio controller and desired replicas (ratio.py, roles.py)
        self.ratio_decisions = Counter(
            "hetero_pd_router_ratio_decisions", "Ratio controller evaluations, by what they did (ratio.Action)",
            ["action"], registry=r,
        )
        self.role_flips = Counter(
            "hetero_pd_router_role_flips", "Mixed instances sent to another role", ["instance", "to_role"], registry=r,
        )
        self.role_drains = Counter(
            "hetero_pd_router_role_drains", "Flips whose old role drained, by outcome (finished, timed_out)",
            ["outcome"], registry=r,
        )
        self.instance_role = Gauge(
            "hetero_pd_router_instance_role", "1 while the instance takes new requests of the role, else 0",
            ["instance", "role"], registry=r,
        )
        self.desired_replicas = Gauge(
            "hetero_pd_router_desired_replicas", "Instances a pool needs at the observed workload under the SLO "
            "(planner model), for HPA/KEDA", ["pool"], registry=r,
        )
        self.split_load = Gauge(
            "hetero_pd_router_split_load", "Utilisation of the busier role, for the current and the best split",
            ["split"], registry=r,
        )
        self.window = Gauge(
            "hetero_pd_router_window", "The observed workload: requests_per_s, isl_tokens, osl_tokens, requests",
            ["stat"], registry=r,
        )
        self.stripped_kv_params = Counter(
            "hetero_pd_router_stripped_kv_transfer_params", "Client requests whose kv_transfer_params were removed",
            registry=r,
        )

        self._ok_counters = {e.value: self.requests.labels(e.value, "ok") for e in Endpoint}

    def error(self, endpoint: str, cause: ErrorCause) -> None:
        self.requests.labels(endpoint, "error").inc()
        self.errors.labels(cause.value).inc()

    def ok(self, endpoint: str) -> None:
        self._ok_counters[endpoint].inc()


class RequestOutcome:
    """The one outcome of one client request: the first ``ok``/``error`` counts, later ones are ignored.

    A request can end in several ways at once (its stream completes just as the client leaves and
    the handler is cancelled); the accounting invariant needs exactly one of them counted.
    """

    __slots__ = ("metrics", "endpoint", "recorded")

    def __init__(self, metrics: RouterMetrics, endpoint: Endpoint) -> None:
        self.metrics = metrics
        self.endpoint = endpoint.value
        self.recorded = False

    def ok(self) -> None:
        if not self.recorded:
            self.recorded = True
            self.metrics.ok(self.endpoint)

    def error(self, cause: ErrorCause) -> None:
        if not self.recorded:
            self.recorded = True
            self.metrics.error(self.endpoint, cause)
