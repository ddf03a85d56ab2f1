"""The router's HTTP front (``http_server``): OpenAI-compatible front, P/D flow, admin, health, metrics.

One request's journey (``Router.generate``):

1. check the client key, read the body (size-limited), parse it and strip client
   ``kv_transfer_params`` (``protocol.parse_request``); a batch of prompts or ``n > 1`` is fanned
   out into one single-prompt, ``n=1`` part per choice (``protocol.fan_out``), and the parts'
   exchanges run concurrently;
2. prefill (``Router._prefill``): pick a prefill instance by policy, send it the ``max_tokens=1``
   request, keep its ``kv_transfer_params``; on failure try another instance; when none can
   serve, let decode prefill locally if ``local_prefill_fallback`` allows (also done up front for
   prompts shorter than ``min_disagg_tokens``);
3. decode (``Router._decode``): pick a decode instance, send the client's request plus those
   params, and check the answer *before* replying: a 5xx status, a dropped connection or a first
   SSE event that is an error (vLLM streams errors under HTTP 200) counts as a failure before the
   first byte. Recovery, in order: another decode with the same params if the failed one never
   received the request (connection refused), else another decode after a fresh prefill (a decode
   that got the request may already have consumed the prefill's blocks); when no other decode is
   left and the last one answered 5xx (how vLLM reports a failed KV load), that decode again after
   a fresh prefill, then that decode prefilling locally if ``local_prefill_fallback`` allows;
4. relay decode's answer (the parts' answers merged in vLLM's format); if a stream breaks after
   the first byte, send an SSE error event and close the stream without ``[DONE]`` so the client
   cannot mistake it for a complete answer.

A client that disconnects cancels the request's handler (``http_server``, as aiohttp's ``handler_cancellation``): the
upstream calls in progress are closed, so vLLM aborts them, and nothing further is started.

The same ``X-Request-Id`` (the client's, or a generated one) goes to prefill and decode and back
to the client; part ``i`` of a fanned-out request uses ``<id>-<i>``. Start in-process with
``await start_router(config)`` or as a subprocess with
``vllm-hetero-pd proxy --port N --prefill URL --decode URL``.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vllm_hetero_pd.router.config import ConfigError, InstanceConfig, Role, RouterConfig
from vllm_hetero_pd.router.http_server import (
    BodyTooLarge,
    HttpServer,
    Request,
    Response,
    Routes,
    StreamResponse,
    json_response,
)
from vllm_hetero_pd.router.metrics import ErrorCause, RecoveryAction, RequestOutcome, RouterMetrics
from vllm_hetero_pd.router.pool import AdminError, Instance, Pool
from vllm_hetero_pd.router.protocol import (
    BadRequestError,
    ClientRequest,
    Endpoint,
    PrefillError,
    decode_body,
    encode_body,
    fan_out,
    is_usage_chunk,
    merge_answers,
    merge_usage,
    parse_request,
    prefill_body,
    read_kv_transfer_params,
    relabel_chunk,
    report_reused_blocks,
)
from vllm_hetero_pd.router.roles import RoleController
from vllm_hetero_pd.router.routing import Route, Routing, output_tokens
from vllm_hetero_pd.router.upstream import (
    Response as UpstreamResponse,
)
from vllm_hetero_pd.router.upstream import (
    Timeouts,
    UpstreamClient,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
_DONE_EVENT = b"data: [DONE]\n\n"
_API_KEY_HINT = "missing or wrong API key: send Authorization: Bearer <key>"
_PEEK_LIMIT_BYTES = 1 << 16  # stop looking for the end of the first SSE event after this much
_MERGE_QUEUE_CHUNKS = 64  # chunks read ahead from the parts' streams while the client is slower


class RouteError(Exception):
    """Ends a request with an HTTP error before any byte of the answer was sent."""

    def __init__(self, status: int, cause: ErrorCause, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.cause = cause


class UpstreamFailure(Exception):
    """An instance failed a call in a way another instance may not (5xx, timeout, broken connection).

    ``delivered`` is False only when the connection could not be opened, i.e. the instance
    certainly never saw the request. ``status`` is the 5xx status (or in-stream error code) the
    instance answered with, None when it did not answer.
    """

    def __init__(self, message: str, delivered: bool = True, status: int | None = None) -> None:
        super().__init__(message)
        self.delivered = delivered
        self.status = status

    @property
    def answered_5xx(self) -> bool:
        """The instance is up and reported an internal error (vLLM's answer to a failed KV load)."""
        return self.status is not None and self.status >= 500


class UpstreamRejection(Exception):
    """An instance answered 4xx: the request itself is at fault, so it is relayed, not retried."""

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body
        self.content_type = content_type

    def labelled(self, label: str) -> UpstreamRejection:
        """The same rejection with ``label`` (the part that got it) before its OpenAI error message."""
        try:
            body = msgspec.json.decode(self.body)
        except (msgspec.DecodeError, RecursionError):
            return self
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict) or not isinstance(error.get("message"), str):
            return self
        error["message"] = f"{label}: {error['message']}"
        return UpstreamRejection(self.status, msgspec.json.encode(body), self.content_type)


class Prefilled(NamedTuple):
    """A prefill's ``kv_transfer_params`` (opaque, forwarded verbatim) and the prefill that issued them."""

    params: dict[str, Any]
    url: str


class Opened:
    """A decode answer that passed every check made before the client's first byte.

    ``head`` is the whole JSON body (not streamed) or the first SSE event(s) (streamed: the rest
    comes from ``upstream``). The decode instance counts as in flight until ``close()``.
    """

    __slots__ = ("instance", "start", "head", "upstream", "_untrack")

    def __init__(self, instance: Instance, start: float, head: bytes, upstream: UpstreamResponse | None,
                 untrack: Callable[[], None]) -> None:
        self.instance = instance
        self.start = start
        self.head = head
        self.upstream = upstream
        self._untrack = untrack

    def also_on_close(self, release: Callable[[], None]) -> None:
        untrack = self._untrack

        def both() -> None:
            untrack()
            release()

        self._untrack = both

    def close(self) -> None:
        """Release the upstream connection (closing it if unread, so vLLM aborts) and the in-flight count."""
        if self.upstream is not None:
            self.upstream.release()
        self._untrack()


class StreamEnd(NamedTuple):
    """How a relayed stream ends: ``last``, the bytes sent with the end of the HTTP stream (the
    ``[DONE]`` chunk, or the SSE error event when ``broke``)."""

    last: bytes
    broke: bool


class AdminChange(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /admin/{add,remove,drain}``; ``weight`` and the ``kv_*`` fields (as in
    ``InstanceConfig``) are used by ``add`` only."""

    role: Role
    url: str
    weight: float = 1.0
    kv_events: str | None = None
    kv_events_replay: str | None = None
    kv_format: str = ""


class Router:
    """Pools, the upstream HTTP client, metrics and the P/D flow of one router."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        max_failures = config.health.max_failures
        self.pools = {
            Role.PREFILL: Pool(Role.PREFILL, config.prefill.policy, config.prefill.instances, max_failures,
                               self.metrics, config.scoring),
            Role.DECODE: Pool(Role.DECODE, config.decode.policy, config.decode.instances, max_failures, self.metrics,
                              config.scoring),
        }
        self.roles = RoleController(config, self.pools, self.metrics)
        self.routing = Routing(config, self.pools, self.metrics)
        t = config.timeouts
        self._prefill_timeout = Timeouts(total_s=t.prefill_s, connect_s=t.connect_s)
        self._decode_timeout = Timeouts(total_s=t.decode_total_s, connect_s=t.connect_s)
        self._stream_timeout = Timeouts(total_s=t.decode_total_s, connect_s=t.connect_s, idle_s=t.decode_idle_s)
        self._upstream_auth = {"Authorization": f"Bearer {config.upstream_api_key}"} if config.upstream_api_key else {}
        self._same_decode_recovery = (RecoveryAction.SAME_DECODE_FRESH_PREFILL,) + (
            (RecoveryAction.LOCAL_PREFILL,) if config.local_prefill_fallback else ())
        self.upstream = UpstreamClient()

    @property
    def prefill(self) -> Pool:
        return self.pools[Role.PREFILL]

    @property
    def decode(self) -> Pool:
        return self.pools[Role.DECODE]

    # ------------------------------------------------------------------ client endpoints

    async def generate(self, request: Request, endpoint: Endpoint) -> Response | StreamResponse:
        request_id = request.headers.get(REQUEST_ID_HEADER) or os.urandom(16).hex()  # uuid4().hex's form, cheaper
        outcome = RequestOutcome(self.metrics, endpoint)
        try:
            parsed = await self._read_request(request, endpoint)
            parts = fan_out(parsed, self.config.max_fan_out)
            if len(parts) == 1:
                opened = [await self._exchange(parsed, request_id)]
            else:
                opened = await self._exchange_all(parts, request_id)
            if parsed.stream:
                return await self._relay(request, parts, opened, request_id, outcome)
            return self._reply(parts, opened, request_id, outcome)
        except BadRequestError as exc:
            outcome.error(ErrorCause.BAD_REQUEST)
            return error_response(400, str(exc), request_id)
        except RouteError as exc:
            outcome.error(exc.cause)
            return error_response(exc.status, str(exc), request_id)
        except UpstreamRejection as exc:
            outcome.error(ErrorCause.UPSTREAM_CLIENT_ERROR)
            return Response(status=exc.status, body=exc.body, content_type=exc.content_type,
                                headers={REQUEST_ID_HEADER: request_id})
        except asyncio.CancelledError:  # the client went away (handler_cancellation); nothing to answer
            outcome.error(ErrorCause.CLIENT_DISCONNECTED)
            raise
        except Exception:
            logger.exception("request %s: internal router error", request_id)
            outcome.error(ErrorCause.INTERNAL)
            return error_response(500, "internal router error; see the router's log", request_id)

    async def _read_request(self, request: Request, endpoint: Endpoint) -> ClientRequest:
        """Authenticate, read and parse the client's request (raises ``RouteError``/``BadRequestError``)."""
        if not _bearer_matches(request, self.config.api_key):
            raise RouteError(401, ErrorCause.UNAUTHORIZED, _API_KEY_HINT)
        try:
            raw = await request.read()
        except BodyTooLarge:
            raise RouteError(413, ErrorCause.BODY_TOO_LARGE,
                             f"request body exceeds {self.config.max_body_bytes} bytes; send a smaller request "
                             "or raise max_body_bytes") from None
        parsed = parse_request(raw, endpoint)
        if parsed.stripped_kv_transfer_params:
            self.metrics.stripped_kv_params.inc()
        return parsed

    async def models(self, request: Request) -> Response:
        if not _bearer_matches(request, self.config.api_key):
            return error_response(401, _API_KEY_HINT, None)
        failures = []
        for instance in [i for i in self.decode.instances if i.available]:
            try:
                response = await self.upstream.request("GET", instance.url, "/v1/models", self._prefill_timeout,
                                                       self._upstream_auth)
                body = await response.read()
            except UpstreamError as exc:
                failures.append(f"{instance.url}: {exc!r}")
                continue
            if response.status == 200:
                return Response(body=body, content_type="application/json")
            failures.append(f"{instance.url}: HTTP {response.status}")
        return error_response(503, "no decode instance listed its models: " + ("; ".join(failures) or "none available"),
                              None)

    async def health(self, request: Request) -> Response:
        num_prefill = sum(i.available for i in self.prefill.instances)
        num_decode = sum(i.available for i in self.decode.instances)
        ready = num_decode > 0 and (num_prefill > 0 or self.config.local_prefill_fallback)
        return json_response(
            {"status": "ok" if ready else "unavailable", "prefill_available": num_prefill,
             "decode_available": num_decode},
            status=200 if ready else 503,
        )

    async def metrics_page(self, request: Request) -> Response:
        return Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ------------------------------------------------------------------ admin endpoints

    def _admin_refusal(self, request: Request) -> Response | None:
        """The 403/401 answer to an admin call without the admin token; None when it may proceed."""
        if self.config.admin_token is None:
            return error_response(403, "admin endpoints are disabled; start the router with an admin token", None)
        if not _bearer_matches(request, self.config.admin_token):
            return error_response(401, "missing or wrong admin token: send Authorization: Bearer <admin token>", None)
        return None

    async def admin(self, request: Request) -> Response:
        if (refused := self._admin_refusal(request)) is not None:
            return refused
        action = request.match_info["action"]
        if request.method == "GET":
            if action != "instances":
                return error_response(404, f"unknown admin resource {action!r}; use GET /admin/instances", None)
            return json_response([i.describe() for pool in self.pools.values() for i in pool.instances])
        try:
            change = msgspec.json.decode(await request.read(), type=AdminChange)
            pool = self.pools[change.role]
            if action == "add":
                instance = pool.add(InstanceConfig(url=change.url, weight=change.weight, kv_events=change.kv_events,
                                                   kv_events_replay=change.kv_events_replay,
                                                   kv_format=change.kv_format))
                self.routing.watch(instance)
            elif action == "remove":
                instance = pool.remove(change.url)
                self.routing.unwatch(instance)
            elif action == "drain":
                instance = pool.drain(change.url)
            else:
                return error_response(404, f"unknown admin action {action!r}; use add, remove or drain", None)
        except (msgspec.DecodeError, msgspec.ValidationError, ConfigError, AdminError) as exc:
            return error_response(400, f"admin {action}: {exc}", None)
        logger.info("admin %s %s instance %s", action, instance.role.value, instance.url)
        return json_response(instance.describe())

    async def debug_route(self, request: Request) -> Response:
        """Admin only. ``POST /debug/route[?endpoint=chat]`` with a request body: how it would be
        routed now, sending nothing. ``GET /debug/route?request_id=ID``: how a recent request was."""
        if (refused := self._admin_refusal(request)) is not None:
            return refused
        if not self.routing.enabled:
            return error_response(409, "/debug/route explains kv_aware routing, which is off: set a kv_aware "
                                  "policy, pairs rules, or a tokenizer with min_disagg_tokens", None)
        if request.method == "GET":
            request_id = request.query.get("request_id", "")
            explained = self.routing.recent.get(request_id)
            if explained is None:
                return error_response(404, f"no recent route for request id {request_id!r}; the router keeps the "
                                      "last 256 (a fanned-out part is <id>-<i>)", None)
            return json_response(explained)
        endpoint = Endpoint.CHAT if request.query.get("endpoint") == "chat" else Endpoint.COMPLETIONS
        try:
            parsed = parse_request(await request.read(), endpoint)
            parts = fan_out(parsed, self.config.max_fan_out)
        except BadRequestError as exc:
            return error_response(400, str(exc), None)
        routes = [self.routing.plan(part) for part in parts]
        return json_response([None if r is None else self.routing.explain(r) for r in routes])

    # ------------------------------------------------------------------ one exchange per part

    async def _exchange(self, parsed: ClientRequest, request_id: str) -> Opened:
        """Prefill, then decode with recovery: the decode's answer, checked up to its first byte.

        With ``kv_aware`` routing the pair is chosen first (``Routing.plan``), so that the prefill
        can be one the decode can read and the decision can weigh what each instance caches."""
        self.roles.observe(parsed.num_prompt_tokens,
                           output_tokens(parsed.body, self.config.scoring.expected_output_tokens))
        if not self.routing.enabled:
            return await self._decode(parsed, await self._prefill(parsed, request_id), request_id)
        route = self.routing.plan(parsed)
        if route is None:
            raise RouteError(503, ErrorCause.NO_DECODE_INSTANCE,
                             "no decode instance is available (all ejected, draining or removed)")
        # the chosen decode's KV is spoken for from now on, so that concurrent choices see it
        decode, num_kv_tokens = route.decode, route.num_kv_tokens
        decode.num_active_kv_tokens += num_kv_tokens

        def release() -> None:
            decode.num_active_kv_tokens -= num_kv_tokens

        try:
            prefilled = await self._prefill(parsed, request_id, route)
            self.routing.record(route, request_id, None if prefilled is None else prefilled.url)
            opened = await self._decode(parsed, prefilled, request_id, route)
        except BaseException:
            release()
            raise
        opened.also_on_close(release)
        return opened

    async def _exchange_all(self, parts: list[ClientRequest], request_id: str) -> list[Opened]:
        """Every part's exchange, concurrently (at most ``max_fan_out``); the first failure cancels
        the others, closes what they opened, and fails the request naming its part."""
        tasks = [asyncio.ensure_future(self._exchange_part(part, f"{request_id}-{i}")) for i, part in enumerate(parts)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            for result in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(result, Opened):
                    result.close()
            raise

    async def _exchange_part(self, part: ClientRequest, request_id: str) -> Opened:
        try:
            return await self._exchange(part, request_id)
        except RouteError as exc:
            raise RouteError(exc.status, exc.cause, f"{part.part_label}: {exc}") from None
        except BadRequestError as exc:
            raise BadRequestError(f"{part.part_label}: {exc}") from None
        except UpstreamRejection as exc:
            raise exc.labelled(part.part_label) from None

    # ------------------------------------------------------------------ prefill

    async def _prefill(self, parsed: ClientRequest, request_id: str, route: Route | None = None,
                       decode: Instance | None = None) -> Prefilled | None:
        """Return prefill's ``kv_transfer_params``, or None when decode should prefill locally.

        With a ``route`` the first attempt goes to its prefill and later ones to the best other
        prefill the decode (``decode``, else the route's) can read."""
        if route is None and parsed.num_prompt_tokens < self.config.min_disagg_tokens:
            self.metrics.local_prefill.labels("short_prompt").inc()
            return None
        if route is not None and route.local_reason in ("short_prompt", "same_instance") and decode is None:
            self.metrics.local_prefill.labels(route.local_reason).inc()
            return None
        failures: list[str] = []
        tried: set[str] = set()
        body = encode_body(prefill_body(parsed.body))
        for attempt in range(self.config.max_attempts):
            if route is None:
                instance = self.prefill.pick(parsed.num_prompt_tokens, frozenset(tried))
            elif attempt == 0 and decode is None:
                instance = route.prefill
            else:
                instance = self.routing.retry_prefill(route, decode or route.decode, tried)
            if instance is None:
                break
            tried.add(instance.url)
            if attempt:
                self.metrics.retries.labels(Role.PREFILL.value).inc()
            num_tokens = parsed.num_prompt_tokens if route is None else route.uncached(instance)
            leg = body if route is None or instance.config.kv_events is None else encode_body(
                report_reused_blocks(prefill_body(parsed.body)))
            try:
                with self.prefill.track(instance, num_tokens):
                    if route is not None:
                        self.routing.prefill_sent(route, instance)
                    return Prefilled(await self._call_prefill(instance, parsed.endpoint, leg, request_id),
                                     instance.url)
            except UpstreamFailure as exc:
                self.prefill.record_failure(instance, str(exc))
                failures.append(str(exc))
                logger.warning("request %s: %s", request_id, exc)
        if self.config.local_prefill_fallback:
            self.metrics.local_prefill.labels("prefill_failed" if failures else "no_prefill_instance").inc()
            return None
        if failures:
            raise RouteError(502, ErrorCause.PREFILL_FAILED, "prefill failed: " + "; ".join(failures))
        raise RouteError(503, ErrorCause.NO_PREFILL_INSTANCE,
                         "no prefill instance is available (all ejected, draining or removed)")

    async def _call_prefill(self, instance: Instance, endpoint: Endpoint, body: bytes,
                            request_id: str) -> dict[str, Any]:
        start = time.perf_counter()
        raw = await self._post(f"prefill {instance.url}", instance.url, endpoint.value, body, request_id,
                               self._prefill_timeout)
        try:
            params = read_kv_transfer_params(raw, instance.url)
        except PrefillError as exc:
            raise UpstreamFailure(str(exc)) from None
        self.prefill.record_success(instance)
        instance.latency_histogram.observe(time.perf_counter() - start)
        return params

    async def _post(self, who: str, url: str, path: str, body: bytes, request_id: str, timeouts: Timeouts) -> bytes:
        """One non-streaming upstream call; transport failures become ``UpstreamFailure`` naming ``who``."""
        try:
            response = await self.upstream.request("POST", url, path, timeouts, self._headers(request_id), body)
            raw = await response.read()
        except UpstreamUnreachable as exc:
            raise UpstreamFailure(f"{who} unreachable: {exc.os_error!r}", delivered=False) from None
        except UpstreamTimeout:
            raise UpstreamFailure(f"{who} timed out after {timeouts.total_s} s") from None
        except UpstreamError as exc:
            raise UpstreamFailure(f"{who} failed: {exc!r}") from None
        _check_status(response, raw, who)
        return raw

    # ------------------------------------------------------------------ decode

    async def _decode(self, parsed: ClientRequest, prefilled: Prefilled | None, request_id: str,
                      route: Route | None = None) -> Opened:
        """Decode on one instance after another, then recover on the last one (module docstring, step 3)."""
        failures: list[str] = []
        failure: UpstreamFailure | None = None
        instance: Instance | None = None
        tried: set[str] = set()
        for attempt in range(self.config.max_attempts):
            if route is not None and attempt == 0:
                candidate = route.decode
            else:
                exclude = frozenset(tried)
                if route is not None and prefilled is not None and not failure.delivered:
                    exclude |= self.routing.compatible_decodes(prefilled.url)  # it must read these params
                candidate = self.decode.pick(parsed.num_prompt_tokens, exclude)
            if candidate is None:
                break
            instance = candidate
            tried.add(instance.url)
            if failure is not None:
                self.metrics.retries.labels(Role.DECODE.value).inc()
                if prefilled is not None and not failure.delivered:
                    self.metrics.recoveries.labels(RecoveryAction.OTHER_DECODE_SAME_PARAMS.value).inc()
                elif prefilled is not None:
                    self.metrics.recoveries.labels(RecoveryAction.OTHER_DECODE_FRESH_PREFILL.value).inc()
                    prefilled = await self._prefill(parsed, request_id, route, instance)
            try:
                return await self._decode_once(instance, parsed, prefilled, request_id, route)
            except UpstreamFailure as exc:
                failure = self._decode_failed(instance, exc, "", failures, request_id)
        if failure is None:
            raise RouteError(503, ErrorCause.NO_DECODE_INSTANCE,
                             "no decode instance is available (all ejected, draining or removed)")
        for action in self._same_decode_recovery:
            if prefilled is None or not failure.answered_5xx:
                break
            self.metrics.recoveries.labels(action.value).inc()
            if action is RecoveryAction.LOCAL_PREFILL:
                self.metrics.local_prefill.labels("decode_failed").inc()
                prefilled = None
            else:
                prefilled = await self._prefill(parsed, request_id, route, instance)
            try:
                return await self._decode_once(instance, parsed, prefilled, request_id, route)
            except UpstreamFailure as exc:
                failure = self._decode_failed(instance, exc, f"{action.value}: ", failures, request_id)
        raise RouteError(502, ErrorCause.DECODE_FAILED, "decode failed: " + "; ".join(failures))

    def _decode_failed(self, instance: Instance, exc: UpstreamFailure, prefix: str, failures: list[str],
                       request_id: str) -> UpstreamFailure:
        self.decode.record_failure(instance, str(exc))
        failures.append(prefix + str(exc))
        logger.warning("request %s: %s%s", request_id, prefix, exc)
        return exc

    async def _decode_once(self, instance: Instance, parsed: ClientRequest, prefilled: Prefilled | None,
                           request_id: str, route: Route | None = None) -> Opened:
        """One decode call, up to the first event of a stream or the whole body of an answer."""
        if route is not None:  # its KV tokens were counted when the route was planned (_exchange)
            self.routing.decode_sent(route, instance, None if prefilled is None else prefilled.url)
        tracked = self.decode.track(instance, parsed.num_prompt_tokens)
        start = time.perf_counter()
        params = None if prefilled is None else prefilled.params
        try:
            if parsed.stream:
                upstream, head = await self._open_stream(instance, parsed, params, request_id)
            else:
                upstream, head = None, await self._post(
                    f"decode {instance.url}", instance.url, parsed.endpoint.value, decode_body(parsed, params),
                    request_id, self._decode_timeout)
        except BaseException as exc:
            tracked.close()
            if isinstance(exc, UpstreamFailure) and exc.answered_5xx and prefilled is not None:
                raise UpstreamFailure(f"{exc}, after it was handed the KV of prefill {prefilled.url}: it most likely "
                                      "could not load that KV; see the decode's log", status=exc.status) from None
            raise
        instance.first_byte_histogram.observe(time.perf_counter() - start)
        return Opened(instance, start, head, upstream, tracked.close)

    def _decode_succeeded(self, opened: Opened) -> None:
        self.decode.record_success(opened.instance)
        opened.instance.latency_histogram.observe(time.perf_counter() - opened.start)

    def _stream_broke(self, opened: Opened, reason: str, request_id: str) -> None:
        logger.warning("request %s: %s", request_id, reason)
        self.decode.record_failure(opened.instance, reason)

    async def _open_stream(self, instance: Instance, parsed: ClientRequest, params: dict[str, Any] | None,
                           request_id: str) -> tuple[UpstreamResponse, bytes]:
        """Send the streaming decode request and read its first SSE event, within decode_first_byte_s."""
        first_byte_s = self.config.timeouts.decode_first_byte_s
        try:
            return await asyncio.wait_for(self._first_event(instance, parsed, params, request_id), first_byte_s)
        except UpstreamUnreachable as exc:
            raise UpstreamFailure(f"decode {instance.url} unreachable: {exc.os_error!r}", delivered=False) from None
        except (asyncio.TimeoutError, UpstreamTimeout):
            raise UpstreamFailure(f"decode {instance.url} sent no first event within {first_byte_s} s") from None
        except UpstreamError as exc:
            raise UpstreamFailure(f"decode {instance.url} failed before its first event: {exc!r}") from None

    async def _first_event(self, instance: Instance, parsed: ClientRequest, params: dict[str, Any] | None,
                           request_id: str) -> tuple[UpstreamResponse, bytes]:
        upstream = await self.upstream.request("POST", instance.url, parsed.endpoint.value, self._stream_timeout,
                                               self._headers(request_id), decode_body(parsed, params))
        try:
            if upstream.status >= 400:
                _check_status(upstream, await upstream.read(), f"decode {instance.url}")
            head = b""
            while b"\n\n" not in head and len(head) < _PEEK_LIMIT_BYTES:
                chunk = await upstream.read_chunk(idle_bound=False)  # _open_stream bounds this wait
                if not chunk:
                    break
                head += chunk
            if not head:
                raise UpstreamFailure(f"decode {instance.url} closed its stream before the first event")
            status = _error_event_status(head)
            if status is not None:
                raise UpstreamFailure(f"decode {instance.url} streamed an error first: {head[:300]!r}", status=status)
            return upstream, head
        except BaseException:
            upstream.close()
            raise

    def _headers(self, request_id: str) -> dict[str, str]:
        return {"Content-Type": "application/json", REQUEST_ID_HEADER: request_id, **self._upstream_auth}

    # ------------------------------------------------------------------ answering the client

    def _reply(self, parts: list[ClientRequest], opened: list[Opened], request_id: str,
               outcome: RequestOutcome) -> Response:
        """The non-streamed answer: decode's body as is, or the parts' answers merged."""
        try:
            body = opened[0].head if len(opened) == 1 else encode_body(
                merge_answers(parts, [_answer_json(part, o) for part, o in zip(parts, opened)]))
        finally:
            for o in opened:
                o.close()
        for o in opened:
            self._decode_succeeded(o)
        outcome.ok()
        return Response(body=body, content_type="application/json", headers={REQUEST_ID_HEADER: request_id})

    async def _relay(self, request: Request, parts: list[ClientRequest], opened: list[Opened], request_id: str,
                     outcome: RequestOutcome) -> StreamResponse:
        """Stream the answer; a stream that breaks after the first byte ends with an SSE error, no [DONE]."""
        response = StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                         REQUEST_ID_HEADER: request_id})
        try:
            await response.prepare(request)
            if len(opened) == 1:
                end = await self._relay_one(response, opened[0], request_id)
            else:
                end = await self._relay_merged(response, parts, opened, request_id)
            if end.broke:
                outcome.error(ErrorCause.STREAM_INTERRUPTED)
            else:
                outcome.ok()
            await response.write_eof(end.last)
        except ConnectionResetError:
            outcome.error(ErrorCause.CLIENT_DISCONNECTED)
        finally:
            for o in opened:
                o.close()
        return response

    async def _relay_one(self, response: StreamResponse, opened: Opened, request_id: str) -> StreamEnd:
        """Relay one decode stream byte for byte, parsing nothing.

        A chunk that ends with ``[DONE]`` is held back until the decode's stream ends (vLLM ends it
        right after), so that it leaves with the end of the HTTP stream in one write, not two."""
        held = opened.head
        tail = held[-len(_DONE_EVENT):]
        while True:
            if held and not tail.endswith(_DONE_EVENT):
                await response.write(held)
                held = b""
            try:
                chunk = await opened.upstream.read_chunk()
            except UpstreamError as exc:
                reason = f"decode {opened.instance.url} stream broke: {exc!r}"
                break
            if not chunk:
                reason = None if tail.endswith(_DONE_EVENT) else f"decode {opened.instance.url} ended without [DONE]"
                break
            if held:
                await response.write(held)
            held = chunk
            tail = chunk[-len(_DONE_EVENT):] if len(chunk) >= len(_DONE_EVENT) else (tail + chunk)[-len(_DONE_EVENT):]
        if reason is None:
            self._decode_succeeded(opened)
            return StreamEnd(held, broke=False)
        self._stream_broke(opened, reason, request_id)
        return StreamEnd(held + (b"" if tail.endswith(b"\n\n") else b"\n\n") + _sse_error(502, reason), broke=True)

    async def _relay_merged(self, response: StreamResponse, parts: list[ClientRequest], opened: list[Opened],
                            request_id: str) -> StreamEnd:
        """Relay the parts' streams as vLLM streams a batch: chunks as they come with their choice
        index, then one merged usage chunk and one ``[DONE]`` (or the SSE error if a part broke)."""
        first = _first_chunk(opened[0].head)
        queue: asyncio.Queue[tuple[int, dict[str, Any] | str | None]] = asyncio.Queue(_MERGE_QUEUE_CHUNKS)
        readers = [asyncio.ensure_future(_read_part(o, i, queue)) for i, o in enumerate(opened)]
        usage_chunks: list[dict[str, Any] | None] = [None] * len(parts)
        try:
            remaining = len(parts)
            while remaining:
                index, item = await queue.get()
                if isinstance(item, dict):
                    if is_usage_chunk(item):
                        usage_chunks[index] = item
                    else:
                        await response.write(_sse_data(relabel_chunk(item, index, first)))
                elif item is None:
                    remaining -= 1
                    self._decode_succeeded(opened[index])
                else:
                    self._stream_broke(opened[index], item, request_id)
                    return StreamEnd(_sse_error(502, f"{parts[index].part_label}: {item}"), broke=True)
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        template = next((chunk for chunk in usage_chunks if chunk is not None), None)
        if template is None:
            return StreamEnd(_DONE_EVENT, broke=False)
        usage = merge_usage(parts, [chunk and chunk["usage"] for chunk in usage_chunks])
        return StreamEnd(_sse_data({**relabel_chunk(template, 0, first), "usage": usage}) + _DONE_EVENT, broke=False)

    # ------------------------------------------------------------------ lifecycle

    async def run_health_probes(self) -> None:
        """Probe all instances every ``health.interval_s`` until cancelled; they start out admitted."""
        while True:
            await asyncio.sleep(self.config.health.interval_s)
            await asyncio.gather(*(pool.probe(self.upstream, self.config.health) for pool in self.pools.values()))


def _check_status(response: UpstreamResponse, raw: bytes, who: str) -> None:
    if response.status >= 500:
        raise UpstreamFailure(f"{who} answered HTTP {response.status}: {raw[:300]!r}", status=response.status)
    if response.status >= 400:
        raise UpstreamRejection(response.status, raw, response.content_type)


def _json_object(raw: bytes) -> dict[str, Any] | None:
    """``raw`` as a JSON object, or None if it is anything else (including JSON nested too deep)."""
    try:
        value = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _is_error(event: dict[str, Any]) -> bool:
    """vLLM's in-stream error: ``{"error": {...}}`` (or the older ``{"object": "error", ...}``)."""
    return "error" in event or event.get("object") == "error"


def _error_event_status(head: bytes) -> int | None:
    """The code of the first SSE event if it is an error (500 when it names none), else None."""
    event = head.split(b"\n\n", 1)[0]
    if not event.startswith(b"data:") or b"error" not in event:
        return None
    data = _json_object(event[5:].strip())
    if data is None or not _is_error(data):
        return None
    code = data["error"].get("code") if isinstance(data.get("error"), dict) else data.get("code")
    return code if isinstance(code, int) else 500


def _first_chunk(head: bytes) -> dict[str, Any]:
    """The first SSE event of a stream as a JSON object ({} if it is none)."""
    event = head.split(b"\n\n", 1)[0]
    return (_json_object(event[5:].strip()) if event.startswith(b"data:") else None) or {}


def _answer_json(part: ClientRequest, opened: Opened) -> dict[str, Any]:
    """A part's non-streamed answer, which must be a completion object to be merged."""
    answer = _json_object(opened.head)
    if answer is None or not isinstance(answer.get("choices"), list):
        raise RouteError(502, ErrorCause.DECODE_FAILED, f"{part.part_label}: decode {opened.instance.url} answered "
                         "with a body that is not a completion object")
    return answer


async def _read_part(opened: Opened, index: int, queue: asyncio.Queue) -> None:
    """Put ``(index, chunk)`` for each chunk of one part's stream, then ``(index, None)`` after its
    ``[DONE]``, or ``(index, reason)`` when it broke."""
    await queue.put((index, await _pump_part(opened, index, queue)))


async def _pump_part(opened: Opened, index: int, queue: asyncio.Queue) -> str | None:
    url = opened.instance.url
    buffer = opened.head
    while True:
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            if not event.startswith(b"data:"):
                continue  # an SSE comment or keep-alive
            data = event[5:].strip()
            if data == b"[DONE]":
                return None
            chunk = _json_object(data)
            if chunk is None or _is_error(chunk):
                return f"decode {url} streamed {data[:300]!r} instead of a completion chunk"
            await queue.put((index, chunk))
        try:
            more = await opened.upstream.read_chunk()
        except UpstreamError as exc:
            return f"decode {url} stream broke: {exc!r}"
        if not more:
            return f"decode {url} ended without [DONE]"
        buffer += more


def _bearer_matches(request: Request, secret: str | None) -> bool:
    if secret is None:
        return True
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), secret.encode())


def _error_json(status: int, message: str) -> dict[str, Any]:
    """OpenAI/vLLM error shape."""
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "RouterError"), "code": status}}


_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
                404: "NotFoundError", 409: "ConflictError", 413: "RequestTooLargeError", 502: "BadGatewayError",
                503: "ServiceUnavailableError"}


def error_response(status: int, message: str, request_id: str | None) -> Response:
    headers = {REQUEST_ID_HEADER: request_id} if request_id else None
    return json_response(_error_json(status, message), status=status, headers=headers)


def _sse_data(event: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(event) + b"\n\n"


def _sse_error(status: int, message: str) -> bytes:
    return _sse_data(_error_json(status, message))


def routes(router: Router) -> Routes:
    """What the router answers: the OpenAI endpoints, models, health, metrics, admin and debug."""
    table = Routes()
    for endpoint in Endpoint:
        table.add("POST", endpoint.value, functools.partial(router.generate, endpoint=endpoint))
    table.add("GET", "/v1/models", router.models)
    table.add("GET", "/health", router.health)
    table.add("GET", "/metrics", router.metrics_page)
    table.add("*", "/admin/{action}", router.admin)
    table.add("GET", "/debug/route", router.debug_route)
    table.add("POST", "/debug/route", router.debug_route)
    return table


class RunningRouter:
    """A router serving on a port in the current event loop (for tests and embedding), with its
    background tasks: health probes, the ratio controller, KV event and metrics watchers."""

    def __init__(self, router: Router, server: HttpServer, host: str, port: int) -> None:
        self.router = router
        self.server = server
        self.url = f"http://{host}:{port}"
        self._tasks = [asyncio.create_task(router.run_health_probes())]
        if router.roles.active:
            self._tasks.append(asyncio.create_task(router.roles.run()))
        router.routing.start(router.upstream)

    async def stop(self, grace_s: float = 60.0) -> None:
        """Stop listening, let requests in flight finish (``grace_s`` at most), then stop the tasks."""
        await self.server.stop(grace_s)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.router.routing.stop()
        self.router.upstream.close()


async def start_router(config: RouterConfig, port: int | None = None) -> RunningRouter:
    """Serve ``config`` on ``config.host`` and ``port`` (default ``config.port``; 0 picks a free port)."""
    router = Router(config)
    server = HttpServer(routes(router), config.max_body_bytes)
    bound_port = await server.start(config.host, config.port if port is None else port)
    logger.info("router listening on http://%s:%d", config.host, bound_port)
    return RunningRouter(router, server, config.host, bound_port)
