"""Instance pools: live load, health, ejection and re-admission, admin changes.

A ``Pool`` owns the mutable state of its instances; ``policy.choose`` decides from a frozen
snapshot of it. Health works on consecutive failures: a failed request or probe adds one, a
successful request resets the count, and at ``max_failures`` the instance is ejected (no new
requests). Only successful health probes re-admit it, so traffic returns to an instance only
after it has answered.

Probes alone never reset the count of an admitted instance, so an instance whose ``/health``
answers but whose requests fail is still ejected. To keep such an instance from flapping, a
re-admitted instance is on probation (its next failure ejects it again), and the k-th ejection
in a row without a successful request in between needs 2^(k-1) consecutive successful probes
(at most ``_MAX_PROBES_TO_READMIT``) before re-admission.
"""

from __future__ import annotations

import asyncio
import logging

from vllm_hetero_pd.router.config import HealthConfig, InstanceConfig, Policy, Role, ScoringConfig
from vllm_hetero_pd.router.load import LoadSample, TransferRate
from vllm_hetero_pd.router.metrics import RouterMetrics
from vllm_hetero_pd.router.policy import Candidate, choose
from vllm_hetero_pd.router.prefix import PrefixView
from vllm_hetero_pd.router.upstream import Timeouts, UpstreamClient, UpstreamError

logger = logging.getLogger(__name__)

_MAX_PROBES_TO_READMIT = 32


class AdminError(ValueError):
    """An admin change that cannot be applied (unknown or duplicate instance)."""


class Instance:
    """Runtime state of one instance. Mutated only by its ``Pool``."""

    __slots__ = ("role", "url", "weight", "config", "num_active_requests", "num_pending_tokens", "num_active_kv_tokens",
                 "consecutive_failures", "ejected", "num_ejections_in_row", "num_good_probes", "draining", "assigned",
                 "rr_pass", "latency_histogram", "first_byte_histogram", "prefix", "load",
                 "num_kv_tokens_since_scrape", "transfer_rate", "translate_rate")

    def __init__(self, role: Role, config: InstanceConfig, rr_pass: float, metrics: RouterMetrics,
                 scoring: ScoringConfig | None = None) -> None:
        scoring = scoring or ScoringConfig()
        self.role = role
        self.url = config.url.rstrip("/")
        self.weight = config.weight
        self.config = config
        self.num_active_requests = 0
        self.num_pending_tokens = 0
        self.num_active_kv_tokens = 0  # decode: prompt + expected output of the requests on it
        # what the kv_aware policies know of it (see prefix.py, load.py)
        self.prefix = PrefixView(config.kv_events is not None, scoring.approx_capacity_blocks, scoring.approx_ttl_s,
                                 scoring.resync_s)
        self.load: LoadSample | None = None
        self.num_kv_tokens_since_scrape = 0
        self.transfer_rate = TransferRate()
        self.translate_rate = TransferRate()
        self.consecutive_failures = 0
        self.ejected = False
        self.num_ejections_in_row = 0
        self.num_good_probes = 0
        self.draining = False
        self.assigned = True  # False while a mixed instance serves (or drains towards) its other role
        self.rr_pass = rr_pass
        # read at scrape time, so a request costs no gauge updates; other children resolved once
        # (labels() takes a lock and a dict lookup on every call)
        metrics.in_flight.labels(role.value, self.url).set_function(lambda: self.num_active_requests)
        histogram = metrics.prefill_latency if role is Role.PREFILL else metrics.decode_latency
        self.latency_histogram = histogram.labels(self.url)
        self.first_byte_histogram = metrics.decode_first_byte.labels(self.url) if role is Role.DECODE else None

    @property
    def available(self) -> bool:
        return not self.ejected and not self.draining and self.assigned

    def describe(self) -> dict:
        return {
            "url": self.url, "role": self.role.value, "weight": self.weight, "ejected": self.ejected,
            "draining": self.draining, "assigned": self.assigned, "num_active_requests": self.num_active_requests,
            "num_pending_tokens": self.num_pending_tokens, "consecutive_failures": self.consecutive_failures,
            "kv_format": self.config.kv_format, "kv_events": self.config.kv_events,
            "kv_usage": None if self.load is None else self.load.kv_usage,
            "num_waiting": None if self.load is None else self.load.num_waiting,
            "prefix_blocks_events": None if self.prefix.events is None else self.prefix.events.num_blocks,
            "prefix_blocks_sent": self.prefix.sent.num_blocks,
        }


class Tracked:
    """One request counted on an instance until ``close()``, which may be called more than once.

    A plain object, not a generator context manager: it is made twice per request on the router's
    hot path (docs/router.md, Benchmark)."""

    __slots__ = ("instance", "num_prompt_tokens", "num_kv_tokens", "closed")

    def __init__(self, instance: Instance, num_prompt_tokens: int, num_kv_tokens: int) -> None:
        self.instance, self.num_prompt_tokens, self.num_kv_tokens = instance, num_prompt_tokens, num_kv_tokens
        self.closed = False
        instance.num_active_requests += 1
        instance.num_pending_tokens += num_prompt_tokens
        instance.num_active_kv_tokens += num_kv_tokens

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            instance = self.instance
            instance.num_active_requests -= 1
            instance.num_pending_tokens -= self.num_prompt_tokens
            instance.num_active_kv_tokens -= self.num_kv_tokens

    def __enter__(self) -> Tracked:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Pool:
    """The instances of one role and the policy that picks among them."""

    def __init__(self, role: Role, policy: Policy, configs: tuple[InstanceConfig, ...], max_failures: int,
                 metrics: RouterMetrics, scoring: ScoringConfig | None = None) -> None:
        self.role = role
        self.policy = policy
        self.max_failures = max_failures
        self.metrics = metrics
        self.scoring = scoring
        self.instances: list[Instance] = []
        for config in configs:
            self.add(config)

    def pick(self, num_prompt_tokens: int, exclude: frozenset[str] = frozenset()) -> Instance | None:
        """Choose an available instance not in ``exclude`` (URLs already tried); None if there is none.

        ``kv_aware`` pools are chosen by ``routing.py``; asked here (e.g. for a retry) they pick as
        ``least_work`` does."""
        eligible = self.eligible(exclude)
        if len(eligible) <= 1:  # nothing to weigh: one instance in the pool, or one left
            chosen = eligible[0] if eligible else None
        else:
            candidates = [
                Candidate(weight=i.weight, num_pending_tokens=i.num_pending_tokens,
                          num_active_requests=i.num_active_requests, rr_pass=i.rr_pass)
                for i in eligible
            ]
            policy = Policy.LEAST_WORK if self.policy is Policy.KV_AWARE else self.policy
            chosen = eligible[choose(policy, self.role, candidates, num_prompt_tokens)]
        if chosen is not None:
            self.picked(chosen)
        return chosen

    def eligible(self, exclude: frozenset[str] = frozenset()) -> list[Instance]:
        return [i for i in self.instances if i.available and i.url not in exclude]

    def picked(self, instance: Instance) -> None:
        """Advance the round-robin pass of an instance chosen (by any policy)."""
        instance.rr_pass += 1.0 / instance.weight

    def track(self, instance: Instance, num_prompt_tokens: int, num_kv_tokens: int = 0) -> Tracked:
        """Count a request as in flight on ``instance`` from now until ``Tracked.close`` (or the end
        of a ``with`` block): its prompt tokens still to compute (prefill) or the KV tokens it holds
        (decode)."""
        return Tracked(instance, num_prompt_tokens, num_kv_tokens)

    def record_success(self, instance: Instance) -> None:
        instance.consecutive_failures = 0
        instance.num_ejections_in_row = 0

    def record_failure(self, instance: Instance, reason: str) -> None:
        instance.consecutive_failures += 1
        if not instance.ejected and instance.consecutive_failures >= self.max_failures:
            instance.ejected = True
            instance.num_ejections_in_row += 1
            instance.num_good_probes = 0
            self.metrics.ejections.labels(self.role.value).inc()
            self.metrics.healthy.labels(self.role.value, instance.url).set(0)
            logger.warning("ejected %s instance %s after %d consecutive failures (last: %s)", self.role.value,
                           instance.url, instance.consecutive_failures, reason)

    def record_probe(self, instance: Instance, ok: bool, reason: str) -> None:
        """Apply one health probe's result (see the module docstring for the rules)."""
        if not ok:
            instance.num_good_probes = 0
            self.record_failure(instance, reason)
            return
        if not instance.ejected:
            return
        instance.num_good_probes += 1
        if instance.num_good_probes >= min(2 ** (instance.num_ejections_in_row - 1), _MAX_PROBES_TO_READMIT):
            self._readmit(instance)

    def _readmit(self, instance: Instance) -> None:
        instance.rr_pass = max(instance.rr_pass, self._min_pass())  # no catch-up burst
        instance.prefix.reset("re-admitted after an ejection: it may have restarted")
        instance.ejected = False
        instance.consecutive_failures = self.max_failures - 1  # probation
        self.metrics.readmissions.labels(self.role.value).inc()
        self.metrics.healthy.labels(self.role.value, instance.url).set(1)
        logger.info("re-admitted %s instance %s: its health probe succeeded", self.role.value, instance.url)

    async def probe(self, client: UpstreamClient, health: HealthConfig) -> None:
        """Probe every instance once, concurrently; ejects and re-admits as results say."""
        timeouts = Timeouts(total_s=health.timeout_s, connect_s=health.timeout_s)
        await asyncio.gather(*(self._probe_one(client, health.path, timeouts, i) for i in list(self.instances)))

    async def _probe_one(self, client: UpstreamClient, path: str, timeouts: Timeouts, instance: Instance) -> None:
        try:
            response = await client.request("GET", instance.url, path, timeouts)
            await response.read()  # to the end, so the connection is reused
            ok = response.status == 200
            reason = f"health probe answered HTTP {response.status}"
        except UpstreamError as exc:
            ok, reason = False, f"health probe failed: {exc!r}"
        self.record_probe(instance, ok, reason)

    def add(self, config: InstanceConfig) -> Instance:
        url = config.url.rstrip("/")
        if self.find(url) is not None:
            raise AdminError(f"{self.role.value} instance {url} already exists; remove it first to change it")
        instance = Instance(self.role, config, self._min_pass(), self.metrics, self.scoring)
        self.instances.append(instance)
        self.metrics.healthy.labels(self.role.value, url).set(1)
        return instance

    def remove(self, url: str) -> Instance:
        """Forget the instance; requests already on it finish normally."""
        instance = self._get(url)
        self.instances.remove(instance)
        self.metrics.healthy.remove(self.role.value, instance.url)
        return instance

    def drain(self, url: str) -> Instance:
        """Send no new requests to the instance; requests already on it finish normally."""
        instance = self._get(url)
        instance.draining = True
        return instance

    def assign(self, instance: Instance, assigned: bool) -> None:
        """Open (or close) the instance to this pool's role; an opened one starts at the pool's
        lowest round-robin pass, like a re-admitted one, so it gets no catch-up burst."""
        if assigned and not instance.assigned:
            instance.rr_pass = max(instance.rr_pass, self._min_pass())
        instance.assigned = assigned

    def find(self, url: str) -> Instance | None:
        url = url.rstrip("/")
        return next((i for i in self.instances if i.url == url), None)

    def _get(self, url: str) -> Instance:
        instance = self.find(url)
        if instance is None:
            known = ", ".join(i.url for i in self.instances) or "none"
            raise AdminError(f"no {self.role.value} instance {url}; known: {known}")
        return instance

    def _min_pass(self) -> float:
        return min((i.rr_pass for i in self.instances if i.available), default=0.0)
