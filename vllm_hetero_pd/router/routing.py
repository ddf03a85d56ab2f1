"""The ``kv_aware`` routing glue: live instance state in, ``scoring.choose_pair`` out, and the
background work that keeps that state fresh (KV event subscribers, ``/metrics`` polls).

``Routing.plan(part)`` runs once per P/D exchange, before prefill: it counts the prompt
(``tokens.py``), asks each instance's ``PrefixView`` how much of it is cached, builds the
candidates (``scoring.PrefillCandidate``/``DecodeCandidate``) and returns a ``Route``: the decode,
the prefill (None: the decode prefills locally, and why), and the decision to explain on
``/debug/route``. A pool whose policy is not ``kv_aware`` still chooses its instance by its own
policy, and the other pool is scored against that one. ``Routing.enabled`` is False when
neither pool is ``kv_aware``, no ``pairs`` rule is set and no tokenizer is needed: the router
then keeps its plain path, with no tokenisation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgspec

from vllm_hetero_pd.router.config import Policy, Role, RouterConfig
from vllm_hetero_pd.router.kv_events import Subscriber, run_forever
from vllm_hetero_pd.router.load import parse_metrics
from vllm_hetero_pd.router.metrics import RouterMetrics
from vllm_hetero_pd.router.pool import Instance, Pool
from vllm_hetero_pd.router.prefix import block_keys
from vllm_hetero_pd.router.protocol import ClientRequest, Endpoint
from vllm_hetero_pd.router.scoring import (
    Decision,
    DecodeCandidate,
    PrefillCandidate,
    best_prefill_for,
    choose_pair,
    compatible,
)
from vllm_hetero_pd.router.tokens import CHARS_PER_TOKEN, Prompt, PromptTokenizer, prompt_of
from vllm_hetero_pd.router.upstream import Timeouts, UpstreamClient, UpstreamError

logger = logging.getLogger(__name__)

_RECENT_ROUTES = 256  # decisions kept for GET /debug/route?request_id=...


class Route:
    """One exchange's routing: where it goes and what the choice was made from."""

    __slots__ = ("prompt", "decode", "prefill", "local_reason", "cached", "sources", "decision", "prefills",
                 "decodes", "num_kv_tokens", "_keys")

    def __init__(self, prompt: Prompt, keys: dict[int, list[int]]) -> None:
        self.prompt = prompt
        self.decode: Instance | None = None
        self.prefill: Instance | None = None
        self.local_reason: str | None = None
        self.cached: dict[str, int] = {}  # url -> cached prompt tokens
        self.sources: dict[str, str] = {}  # url -> events | sent | none
        self.decision: Decision | None = None
        self.prefills: list[Instance] = []
        self.decodes: list[Instance] = []
        self.num_kv_tokens = 0  # prompt + expected output: what the decode will hold
        self._keys = keys

    def keys(self, block_size: int) -> list[int]:
        keys = self._keys.get(block_size)
        if keys is None:
            keys = self._keys[block_size] = block_keys(self.prompt.units, block_size, self.prompt.salt)
        return keys

    def uncached(self, instance: Instance) -> int:
        return self.prompt.num_tokens - self.cached.get(instance.url, 0)


class Routing:
    def __init__(self, config: RouterConfig, pools: dict[Role, Pool], metrics: RouterMetrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.scoring = config.scoring
        self.pools = pools
        self.metrics = metrics
        self.clock = clock
        self.tokenizer = PromptTokenizer(config.tokenizer) if config.tokenizer else None
        kv_aware = Policy.KV_AWARE in (config.prefill.policy, config.decode.policy)
        # mixed instances need the pair chosen up front: one instance chosen for both prefills locally
        self.enabled = (kv_aware or bool(config.pairs) or bool(config.mixed)
                        or (self.tokenizer is not None and config.min_disagg_tokens > 0))
        self.recent: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._tasks: dict[str, asyncio.Task] = {}

    @property
    def prefill(self) -> Pool:
        return self.pools[Role.PREFILL]

    @property
    def decode(self) -> Pool:
        return self.pools[Role.DECODE]

    # ------------------------------------------------------------------ one decision

    def prompt(self, part: ClientRequest) -> Prompt:
        return prompt_of(part.body, part.endpoint is Endpoint.CHAT, self.tokenizer)

    def plan(self, part: ClientRequest, exclude_decodes: frozenset[str] = frozenset()) -> Route | None:
        """Choose the pair for one exchange; None when no decode instance is available."""
        route = Route(self.prompt(part), {})
        decodes = self.decode.eligible(exclude_decodes)
        prefills = self.prefill.eligible()
        if not decodes:
            return None
        now = self.clock()
        if self.decode.policy is not Policy.KV_AWARE:
            with_prefill = [d for d in decodes if any(self._compatible(p, d) for p in prefills)] or decodes
            chosen = self.decode.pick(route.prompt.num_tokens, frozenset(i.url for i in decodes
                                                                         if i not in with_prefill) | exclude_decodes)
            decodes = [chosen]
        if self.prefill.policy is not Policy.KV_AWARE and prefills:
            compatible_ones = [p for p in prefills if any(self._compatible(p, d) for d in decodes)]
            if compatible_ones:
                chosen_prefill = self.prefill.pick(route.prompt.num_tokens,
                                                   frozenset(p.url for p in prefills if p not in compatible_ones))
                prefills = [chosen_prefill]
            else:
                prefills = []
        for instance in (*prefills, *decodes):
            self._match(route, instance, now)
        route.prefills, route.decodes = prefills, decodes
        output = output_tokens(part.body, self.scoring.expected_output_tokens)
        decision = choose_pair([self._prefill_candidate(p, route) for p in prefills],
                               [self._decode_candidate(d, route) for d in decodes],
                               route.prompt.num_tokens, output, self.scoring, self.config.pairs,
                               self.config.min_disagg_tokens)
        route.decision = decision
        route.num_kv_tokens = route.prompt.num_tokens + output
        route.decode = decodes[decision.decode]
        route.prefill = None if decision.prefill is None else prefills[decision.prefill]
        route.local_reason = decision.local_reason
        if self.decode.policy is Policy.KV_AWARE:
            self.decode.picked(route.decode)
        if route.prefill is not None and self.prefill.policy is Policy.KV_AWARE:
            self.prefill.picked(route.prefill)
        return route

    def retry_prefill(self, route: Route, decode: Instance, tried: set[str]) -> Instance | None:
        """Another prefill for ``decode`` after one failed (or for a fresh prefill on a new decode)."""
        prefills = [p for p in self.prefill.eligible(frozenset(tried) | {decode.url}) if self._compatible(p, decode)]
        if not prefills:
            return None
        now = self.clock()
        for instance in (*prefills, decode):
            if instance.url not in route.cached:
                self._match(route, instance, now)
        index = best_prefill_for(self._decode_candidate(decode, route),
                                 [self._prefill_candidate(p, route) for p in prefills], route.prompt.num_tokens,
                                 self.scoring, self.config.pairs)
        if index is None:
            return None
        self.prefill.picked(prefills[index])
        return prefills[index]

    def compatible_decodes(self, prefill_url: str) -> frozenset[str]:
        """URLs of decodes that cannot read this prefill's KV (to exclude on a decode retry)."""
        prefill = self.prefill.find(prefill_url)
        if prefill is None:
            return frozenset()
        return frozenset(d.url for d in self.decode.instances if not self._compatible(prefill, d))

    def _compatible(self, prefill: Instance, decode: Instance) -> bool:
        return compatible(self.config.pairs, _bare_prefill(prefill), _bare_decode(decode))

    def _match(self, route: Route, instance: Instance, now: float) -> None:
        prompt = route.prompt
        size = self.scoring.block_size if prompt.exact else self.scoring.block_size * CHARS_PER_TOKEN
        cached, source = instance.prefix.match(route.keys, prompt.num_tokens, prompt.exact, size, now)
        route.cached[instance.url] = cached
        route.sources[instance.url] = source

    def _prefill_candidate(self, instance: Instance, route: Route) -> PrefillCandidate:
        cached = route.cached.get(instance.url, 0) if self.prefill.policy is Policy.KV_AWARE else 0
        return PrefillCandidate(url=instance.url, weight=instance.weight,
                                num_pending_tokens=instance.num_pending_tokens, num_cached_tokens=cached,
                                kv_format=instance.config.kv_format,
                                rr_pass=instance.rr_pass)

    def _decode_candidate(self, instance: Instance, route: Route) -> DecodeCandidate:
        load = instance.load
        used = instance.num_active_kv_tokens
        capacity = waiting = None
        if load is not None and load.kv_usage is not None and load.capacity_tokens:
            used = max(used, int(load.kv_usage * load.capacity_tokens) + instance.num_kv_tokens_since_scrape)
            capacity = load.capacity_tokens
        if load is not None:
            waiting = load.num_waiting
        return DecodeCandidate(url=instance.url, weight=instance.weight, num_used_tokens=used,
                               num_cached_tokens=route.cached.get(instance.url, 0), num_waiting=waiting or 0,
                               capacity_tokens=capacity, transfer_s_per_token=instance.transfer_rate.seconds_per_token,
                               translate_s_per_token=instance.translate_rate.seconds_per_token,
                               kv_format=instance.config.kv_format, rr_pass=instance.rr_pass)

    # ------------------------------------------------------------------ what was sent

    def prefill_sent(self, route: Route, instance: Instance) -> None:
        """A prefill leg went to ``instance``: it will cache the prompt."""
        self._sent(route, instance, Role.PREFILL)

    def decode_sent(self, route: Route, instance: Instance, prefill_url: str | None) -> None:
        """A decode leg went to ``instance`` (with params from ``prefill_url``, or prefilling locally)."""
        self._sent(route, instance, Role.DECODE)
        instance.num_kv_tokens_since_scrape += route.num_kv_tokens
        if prefill_url is not None:
            moved = route.uncached(instance)
            instance.transfer_rate.add_tokens(moved)
            prefill = self.prefill.find(prefill_url)
            if prefill is not None and prefill.config.kv_format != instance.config.kv_format:
                instance.translate_rate.add_tokens(moved)

    def _sent(self, route: Route, instance: Instance, role: Role) -> None:
        prompt = route.prompt
        size = self.scoring.block_size if prompt.exact else self.scoring.block_size * CHARS_PER_TOKEN
        instance.prefix.sent.add(route.keys(size), self.clock())
        m = self.metrics
        m.prompt_tokens.labels(role.value, instance.url).inc(prompt.num_tokens)
        cached = route.cached.get(instance.url, 0)
        if cached:
            m.prefix_hit_tokens.labels(role.value, instance.url, route.sources.get(instance.url, "none")).inc(cached)

    def record(self, route: Route, request_id: str, prefill_url: str | None) -> None:
        """Count the decision once the exchange's prefill leg is settled (``prefill_url`` None: local)."""
        m = self.metrics
        decode_url = route.decode.url
        m.routes.labels(prefill_url or "local", decode_url).inc()
        decision = route.decision
        if decision is None:
            return
        chosen = next((s for s in decision.pairs if route.prefill is not None
                       and s.decode == decision.decode and s.prefill == decision.prefill), None)
        score = decision.decode_scores[decision.decode]
        m.route_cost.labels("decode").observe(score.cost)
        if score.over_watermark:
            m.over_watermark.labels(decode_url).inc()
        if chosen is not None:
            m.route_cost.labels("prefill").observe(max(0.0, chosen.prefill_cost))
            m.route_cost.labels("pair").observe(chosen.pair_cost)
            m.pair_transfer.labels(route.prefill.url, decode_url).observe(chosen.transfer_s)
        self.recent[request_id] = self.explain(route)
        while len(self.recent) > _RECENT_ROUTES:
            self.recent.popitem(last=False)

    def explain(self, route: Route) -> dict[str, Any]:
        """The decision as JSON: the prompt count, every candidate's inputs and costs, the choice."""
        decision = route.decision
        prompt = route.prompt
        out: dict[str, Any] = {
            "num_prompt_tokens": prompt.num_tokens, "tokens_exact": prompt.exact,
            "decode": route.decode.url if route.decode else None,
            "prefill": route.prefill.url if route.prefill else None, "local_prefill_reason": route.local_reason,
            "min_disagg_tokens": self.config.min_disagg_tokens,
            "policies": {"prefill": self.prefill.policy.value, "decode": self.decode.policy.value},
        }
        if decision is None:
            return out
        out["decodes"] = [
            {"url": d.url, "cached_tokens": route.cached.get(d.url, 0), "cached_from": route.sources.get(d.url),
             "cost": s.cost, "over_watermark": s.over_watermark, "projected_kv_usage": s.projected_usage,
             **msgspec.structs.asdict(self._decode_candidate(d, route))}
            for d, s in zip(route.decodes, decision.decode_scores)]
        out["prefills"] = [
            {"url": p.url, "cached_tokens": route.cached.get(p.url, 0), "cached_from": route.sources.get(p.url),
             **msgspec.structs.asdict(self._prefill_candidate(p, route))} for p in route.prefills]
        out["pairs"] = [
            {"prefill": route.prefills[s.prefill].url, "decode": route.decodes[s.decode].url,
             "prefill_cost": s.prefill_cost, "pair_cost": s.pair_cost, "decode_cost": s.decode_cost,
             "transfer_s": s.transfer_s, "total": s.total} for s in decision.pairs]
        return out

    # ------------------------------------------------------------------ background

    def start(self, client: UpstreamClient) -> None:
        """Start the subscribers and the /metrics poll (when enabled); ``stop()`` ends them."""
        if not self.enabled:
            return
        for pool in self.pools.values():
            for instance in pool.instances:
                self.watch(instance)
        self._tasks["/metrics"] = asyncio.create_task(self._poll_metrics(client))

    def watch(self, instance: Instance) -> None:
        """Follow a (new) instance's KV events, if it publishes any."""
        if not self.enabled or instance.config.kv_events is None or instance.url in self._tasks:
            return
        url = instance.url

        def on_batch(counts: dict[str, int]) -> None:
            for kind, n in counts.items():
                if n:
                    self.metrics.kv_events.labels(url, kind).inc(n)

        subscriber = Subscriber(url, instance.config.kv_events, instance.config.kv_events_replay, instance.prefix,
                                on_batch=on_batch,
                                on_gap=lambda outcome: self.metrics.kv_event_gaps.labels(url, outcome).inc(),
                                clock=self.clock)
        self._tasks[url] = asyncio.create_task(run_forever(subscriber))

    def unwatch(self, instance: Instance) -> None:
        task = self._tasks.pop(instance.url, None)
        if task is not None:
            task.cancel()

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _poll_metrics(self, client: UpstreamClient) -> None:
        timeout_s = max(self.scoring.metrics_interval_s, 1.0)
        timeouts = Timeouts(total_s=timeout_s, connect_s=timeout_s)
        while True:
            instances = [i for pool in self.pools.values() for i in pool.instances if not i.ejected]
            await asyncio.gather(*(self._scrape(client, i, timeouts) for i in instances))
            now = self.clock()
            for instance in instances:
                self.metrics.prefix_view_synced.labels(instance.role.value, instance.url).set(
                    1 if instance.prefix.synced(now) else 0)
            await asyncio.sleep(self.scoring.metrics_interval_s)

    async def _scrape(self, client: UpstreamClient, instance: Instance, timeouts: Timeouts) -> None:
        try:
            response = await client.request("GET", instance.url, "/metrics", timeouts)
            raw = await response.read()
            if response.status != 200:
                raise UpstreamError(f"HTTP {response.status}")
            text = raw.decode()
        except (UpstreamError, UnicodeDecodeError) as exc:
            self.metrics.scrape_failures.labels(instance.url).inc()
            logger.debug("polling %s/metrics failed: %r", instance.url, exc)
            return
        sample = parse_metrics(text)
        old = instance.load
        if old is not None and old.start_time and sample.start_time and sample.start_time != old.start_time:
            logger.warning("%s %s restarted (process_start_time_seconds changed); clearing its prefix view",
                           instance.role.value, instance.url)
            instance.prefix.reset("the server restarted (process_start_time_seconds changed)")
        instance.load = sample
        instance.num_kv_tokens_since_scrape = 0
        instance.transfer_rate.update(sample.transfer_s_total)
        instance.translate_rate.update(sample.translate_s_total)
        if sample.kv_usage is not None:
            self.metrics.kv_usage.labels(instance.role.value, instance.url).set(sample.kv_usage)


def output_tokens(body: dict[str, Any], default: int) -> int:
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def _bare_prefill(instance: Instance) -> PrefillCandidate:
    return PrefillCandidate(url=instance.url, weight=instance.weight, num_pending_tokens=0,
                            kv_format=instance.config.kv_format)


def _bare_decode(instance: Instance) -> DecodeCandidate:
    return DecodeCandidate(url=instance.url, weight=instance.weight, num_used_tokens=0,
                           kv_format=instance.config.kv_format)
