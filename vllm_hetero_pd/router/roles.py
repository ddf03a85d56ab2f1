"""Roles of mixed-pool instances: which role each serves, flips with draining, and the loop that
asks ``ratio.decide`` what to do (the decision itself is pure, in ``ratio.py``).

A mixed instance (``RouterConfig.mixed``: an engine started with ``kv_role: kv_both``) is an
``Instance`` in each pool, the two sharing one prefix view; ``Pool.assign`` opens or closes it to
a pool's role. Without ``ratio`` both roles stay open, and each request's pair is chosen among
all instances that may take each role by the pools' policies and ``scoring`` (an instance chosen
for both prefills locally). With ``ratio`` each mixed instance serves one role, and a flip:

1. closes the old role: no new requests of it go there;
2. lets the old role's work finish there: prefill legs, decode streams, and exchanges already
   routed to it (their KV is counted from the moment of the choice). It takes no new requests
   of either role meanwhile, so no request in flight is slowed by new work;
3. opens the new role once that work is done, or after ``max_drain_s`` (logged).

No request is moved, cancelled or refused: a flip only changes where new requests go.

The same evaluation sets the desired-replica gauges: per pool, the instances of its cheapest
shape (price per request/s in that role) needed at the observed workload (``ratio.desired_replicas``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from vllm_hetero_pd.log import get_logger
from vllm_hetero_pd.router.capacity import CapacityModel
from vllm_hetero_pd.router.config import InstanceConfig, Role, RouterConfig
from vllm_hetero_pd.router.metrics import RouterMetrics
from vllm_hetero_pd.router.pool import Instance, Pool
from vllm_hetero_pd.router.ratio import (
    Action,
    Decision,
    Mixed,
    Observation,
    Pinned,
    RoleCapacity,
    State,
    decide,
    desired_replicas,
)
from vllm_hetero_pd.router.window import WorkloadWindow

logger = get_logger(__name__)

_SETTLE_S = 0.25  # how often a draining flip is checked for completion


class MixedInstance:
    """One mixed instance: its ``Instance`` in each pool and where it stands in a flip."""

    __slots__ = ("config", "instances", "role", "draining_from", "drain_started_s")

    def __init__(self, config: InstanceConfig, prefill: Instance, decode: Instance) -> None:
        self.config = config
        self.instances = {Role.PREFILL: prefill, Role.DECODE: decode}
        self.role: Role | None = None  # None: both roles open (no ratio controller)
        self.draining_from: Role | None = None
        self.drain_started_s = 0.0

    @property
    def url(self) -> str:
        return self.instances[Role.PREFILL].url


def _busy(instance: Instance) -> bool:
    """Work of this role still on the instance: calls in flight, or exchanges routed to it."""
    return instance.num_active_requests > 0 or instance.num_active_kv_tokens > 0


def _other(role: Role) -> Role:
    return Role.DECODE if role is Role.PREFILL else Role.PREFILL


class RoleController:
    """Owns the mixed instances' roles; with ``ratio`` set, ``run()`` evaluates and flips them."""

    def __init__(self, config: RouterConfig, pools: dict[Role, Pool], metrics: RouterMetrics,
                 clock: Callable[[], float] = time.monotonic, capacity: CapacityModel | None = None) -> None:
        self.ratio = config.ratio
        self.pools = pools
        self.metrics = metrics
        self.clock = clock
        self.capacity = capacity
        if self.ratio is not None and capacity is None:
            self.capacity = CapacityModel(self.ratio)
            self.capacity.check(config.instances)
        self.window = WorkloadWindow(self.ratio.window_s if self.ratio else 60.0, clock())
        self.state = State()
        self.last: Decision | None = None
        self.mixed = [self._add(c) for c in config.mixed]
        if self.ratio is not None:
            self._assign_initial_roles()
        for m in self.mixed:
            self._show(m)

    def _add(self, config: InstanceConfig) -> MixedInstance:
        prefill = self.pools[Role.PREFILL].add(config)
        decode = self.pools[Role.DECODE].add(config)
        decode.prefix = prefill.prefix  # one engine, one cache
        return MixedInstance(config, prefill, decode)

    def _assign_initial_roles(self) -> None:
        """``ratio.initial_prefill`` (default half) start as prefill, every role keeping an instance."""
        num = self.ratio.initial_prefill
        if num is None:
            num = len(self.mixed) // 2
            if len(self.pools[Role.PREFILL].instances) == len(self.mixed):  # no pinned prefill
                num = max(num, 1)
            if len(self.pools[Role.DECODE].instances) == len(self.mixed):  # no pinned decode
                num = min(num, len(self.mixed) - 1)
        for i, m in enumerate(self.mixed):
            m.role = Role.PREFILL if i < num else Role.DECODE
            self.pools[_other(m.role)].assign(m.instances[_other(m.role)], False)

    @property
    def active(self) -> bool:
        return self.ratio is not None

    def observe(self, num_prompt_tokens: int, num_output_tokens: int) -> None:
        """Count one P/D exchange's arrival in the window."""
        if self.ratio is not None:
            self.window.add(self.clock(), num_prompt_tokens, num_output_tokens)

    # ------------------------------------------------------------------ flips

    def flip(self, url: str, to_role: Role) -> None:
        """Move a mixed instance to ``to_role``: close its old role now, open the new one once drained."""
        m = next(m for m in self.mixed if m.url == url)
        if m.role is to_role:
            return
        old = _other(to_role)
        self.pools[old].assign(m.instances[old], False)
        m.role, m.draining_from, m.drain_started_s = to_role, old, self.clock()
        self.metrics.role_flips.labels(url, to_role.value).inc()
        logger.info("role flip: %s %s -> %s; draining %d %s request(s) in flight first", url, old.value,
                    to_role.value, m.instances[old].num_active_requests, old.value)
        self._show(m)
        self.settle()

    def settle(self) -> None:
        """Open the new role of every flip whose old role has drained (or waited ``max_drain_s``)."""
        now = self.clock()
        for m in self.mixed:
            if m.draining_from is None:
                continue
            old = m.instances[m.draining_from]
            if not _busy(old):
                outcome = "finished"
            elif now - m.drain_started_s >= self.ratio.max_drain_s:
                outcome = "timed_out"
                logger.warning("role flip: %s still has %d %s request(s) in flight after max_drain_s %g s; "
                               "opening %s anyway (kv_both serves both)", m.url, old.num_active_requests,
                               m.draining_from.value, self.ratio.max_drain_s, m.role.value)
            else:
                continue
            self.pools[m.role].assign(m.instances[m.role], True)
            m.draining_from = None
            self.metrics.role_drains.labels(outcome).inc()
            logger.info("role flip: %s now serves %s (drain %s after %.1f s)", m.url, m.role.value, outcome,
                        now - m.drain_started_s)
            self._show(m)

    def _show(self, m: MixedInstance) -> None:
        for role, instance in m.instances.items():
            self.metrics.instance_role.labels(m.url, role.value).set(1 if instance.assigned else 0)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> Decision:
        """One decision from the window and the live instances; applies its flip, sets the gauges."""
        now = self.clock()
        observed = self.window.observe(now)
        for stat, value in (("requests_per_s", observed.rate), ("isl_tokens", observed.isl),
                            ("osl_tokens", observed.osl), ("requests", observed.num_requests)):
            self.metrics.window.labels(stat).set(value)
        capacities = self._capacities(observed)
        self._set_desired_replicas(observed, capacities)
        self.state, decision = decide(now, observed, self._pinned(capacities), self._mixed(capacities), self.state,
                                      self.ratio)
        self.metrics.ratio_decisions.labels(decision.action.value).inc()
        for split, value in (("current", decision.load), ("best", decision.best_load)):
            if value is not None:
                self.metrics.split_load.labels(split).set(value)
        repeated = self.last is not None and self.last.action is decision.action
        log = logger.debug if repeated and decision.action is not Action.FLIP else logger.info
        log("ratio: %s (%s); window %.2f req/s, ISL %.0f, OSL %.0f", decision.action.value, decision.reason,
            observed.rate, observed.isl, observed.osl)
        self.last = decision
        if decision.flip is not None:
            self.flip(decision.flip.url, decision.flip.to_role)
        return decision

    def _capacities(self, observed: Observation) -> dict[str, RoleCapacity]:
        if observed.num_requests == 0:
            return {}
        configs = {i.url: i.config for pool in self.pools.values() for i in pool.instances}
        return {url: self.capacity.capacity(config, observed.isl, observed.osl) for url, config in configs.items()}

    def _pinned(self, capacities: dict[str, RoleCapacity]) -> Pinned:
        mixed = {m.url for m in self.mixed}
        live = {role: [i for i in pool.instances if i.url not in mixed and i.available]
                for role, pool in self.pools.items()}
        zero = RoleCapacity(prefill=0.0, decode=0.0)
        return Pinned(num_prefill=len(live[Role.PREFILL]), num_decode=len(live[Role.DECODE]), capacity=RoleCapacity(
            prefill=sum(capacities.get(i.url, zero).prefill for i in live[Role.PREFILL]),
            decode=sum(capacities.get(i.url, zero).decode for i in live[Role.DECODE])))

    def _mixed(self, capacities: dict[str, RoleCapacity]) -> list[Mixed]:
        """Mixed instances that are up in their role (an ejected one is nobody's capacity)."""
        zero = RoleCapacity(prefill=0.0, decode=0.0)
        return [Mixed(url=m.url, capacity=capacities.get(m.url, zero), role=m.role,
                      draining=m.draining_from is not None)
                for m in self.mixed if not m.instances[m.role].ejected and not m.instances[m.role].draining]

    def _set_desired_replicas(self, observed: Observation, capacities: dict[str, RoleCapacity]) -> None:
        """Per pool: instances of its cheapest shape (price per request/s in the role) the workload needs."""
        for role, pool in self.pools.items():
            rates = [(self.capacity.price_per_hour(i.config) / capacities[i.url].of(role), capacities[i.url].of(role))
                     for i in pool.instances if capacities and capacities[i.url].of(role) > 0]
            if not capacities:
                desired = self.ratio.min_replicas
            else:
                desired = desired_replicas(observed.rate, min(rates)[1] if rates else 0.0, self.ratio)
            self.metrics.desired_replicas.labels(role.value).set(desired)

    async def run(self) -> None:
        """Settle drains every ``_SETTLE_S`` and evaluate every ``ratio.interval_s``, until cancelled."""
        next_s = self.clock() + self.ratio.interval_s
        while True:
            await asyncio.sleep(min(_SETTLE_S, self.ratio.interval_s))
            self.settle()
            if self.clock() >= next_s:
                next_s += self.ratio.interval_s
                try:
                    self.evaluate()
                except Exception:  # a model error must not stop routing; the next interval tries again
                    logger.exception("ratio: evaluation failed")
