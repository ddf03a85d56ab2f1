"""The router's HTTP server (aiohttp): OpenAI-compatible front, P/D flow, admin, health, metrics.

One request's journey (``Router.generate``):

1. check the client key, read the body (size-limited), parse it and strip client
   ``kv_transfer_params`` (``protocol.parse_request``);
2. prefill (``Router._prefill``): pick a prefill instance by policy, send it the ``max_tokens=1``
   request, keep its ``kv_transfer_params``; on failure try another instance; when none can
   serve, let decode prefill locally if ``local_prefill_fallback`` allows (also done up front for
   prompts shorter than ``min_disagg_tokens``);
3. decode (``Router._decode``): pick a decode instance, send the client's request plus those
   params, and check the answer *before* replying: a 5xx status, a dropped connection or a first
   SSE event that is an error (vLLM streams errors under HTTP 200) counts as a failure before the
   first byte, and the request moves to another decode instance. Prefill is re-run for it unless
   the failed instance never received the request (connection refused), because a decode that
   got the request may already have consumed the prefill instance's blocks;
4. relay decode's answer; if a stream breaks after the first byte, send an SSE error event and
   close the stream without ``[DONE]`` so the client cannot mistake it for a complete answer.

The same ``X-Request-Id`` (the client's, or a generated one) goes to prefill and decode and back
to the client. Start in-process with ``await start_router(config)`` or as a subprocess with
``vllm-hetero-pd proxy --port N --prefill URL --decode URL``.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
import uuid
from typing import Any

import aiohttp
import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vllm_hetero_pd.router.config import ConfigError, InstanceConfig, RouterConfig, Role
from vllm_hetero_pd.router.metrics import ErrorCause, RouterMetrics
from vllm_hetero_pd.router.pool import AdminError, Instance, Pool
from vllm_hetero_pd.router.protocol import (
    BadRequestError,
    ClientRequest,
    Endpoint,
    PrefillError,
    decode_body,
    parse_request,
    prefill_body,
    read_kv_transfer_params,
)

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
_DONE_EVENT = b"data: [DONE]\n\n"
_API_KEY_HINT = "missing or wrong API key: send Authorization: Bearer <key>"
_PEEK_LIMIT_BYTES = 1 << 16  # stop looking for the end of the first SSE event after this much


class RouteError(Exception):
    """Ends a request with an HTTP error before any byte of the answer was sent."""

    def __init__(self, status: int, cause: ErrorCause, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.cause = cause


class UpstreamFailure(Exception):
    """An instance failed a call in a way another instance may not (5xx, timeout, broken connection).

    ``delivered`` is False only when the connection could not be opened, i.e. the instance
    certainly never saw the request.
    """

    def __init__(self, message: str, delivered: bool = True) -> None:
        super().__init__(message)
        self.delivered = delivered


class UpstreamRejection(Exception):
    """An instance answered 4xx: the request itself is at fault, so it is relayed, not retried."""

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body
        self.content_type = content_type


class AdminChange(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /admin/{add,remove,drain}``; ``weight`` is used by ``add`` only."""

    role: Role
    url: str
    weight: float = 1.0


class Router:
    """Pools, the upstream HTTP session, metrics and the P/D flow of one router."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        max_failures = config.health.max_failures
        self.pools = {
            Role.PREFILL: Pool(Role.PREFILL, config.prefill.policy, config.prefill.instances, max_failures,
                               self.metrics),
            Role.DECODE: Pool(Role.DECODE, config.decode.policy, config.decode.instances, max_failures, self.metrics),
        }
        t = config.timeouts
        self._prefill_timeout = aiohttp.ClientTimeout(total=t.prefill_s, connect=t.connect_s)
        self._decode_timeout = aiohttp.ClientTimeout(total=t.decode_total_s, connect=t.connect_s)
        self._stream_timeout = aiohttp.ClientTimeout(total=t.decode_total_s, connect=t.connect_s,
                                                     sock_read=t.decode_idle_s)
        self._upstream_auth = {"Authorization": f"Bearer {config.upstream_api_key}"} if config.upstream_api_key else {}
        self.session: aiohttp.ClientSession | None = None

    @property
    def prefill(self) -> Pool:
        return self.pools[Role.PREFILL]

    @property
    def decode(self) -> Pool:
        return self.pools[Role.DECODE]

    # ------------------------------------------------------------------ client endpoints

    async def generate(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        try:
            if not _bearer_matches(request, self.config.api_key):
                raise RouteError(401, ErrorCause.UNAUTHORIZED, _API_KEY_HINT)
            try:
                raw = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise RouteError(413, ErrorCause.BODY_TOO_LARGE,
                                 f"request body exceeds {self.config.max_body_bytes} bytes; send a smaller request "
                                 "or raise max_body_bytes") from None
            try:
                parsed = parse_request(raw, endpoint)
            except BadRequestError as exc:
                raise RouteError(400, ErrorCause.BAD_REQUEST, str(exc)) from None
            if parsed.stripped_kv_transfer_params:
                self.metrics.stripped_kv_params.inc()
            kv_params = await self._prefill(parsed, request_id)
            return await self._decode(request, parsed, kv_params, request_id)
        except RouteError as exc:
            self.metrics.error(endpoint.value, exc.cause)
            return error_response(exc.status, str(exc), request_id)
        except UpstreamRejection as exc:
            self.metrics.error(endpoint.value, ErrorCause.UPSTREAM_CLIENT_ERROR)
            return web.Response(status=exc.status, body=exc.body, content_type=exc.content_type,
                                headers={REQUEST_ID_HEADER: request_id})
        except Exception:
            logger.exception("request %s: internal router error", request_id)
            self.metrics.error(endpoint.value, ErrorCause.INTERNAL)
            return error_response(500, "internal router error; see the router's log", request_id)

    async def models(self, request: web.Request) -> web.Response:
        if not _bearer_matches(request, self.config.api_key):
            return error_response(401, _API_KEY_HINT, None)
        failures = []
        for instance in [i for i in self.decode.instances if i.available]:
            try:
                async with self.session.get(instance.url + "/v1/models", headers=self._upstream_auth,
                                            timeout=self._prefill_timeout) as response:
                    body = await response.read()
                    if response.status == 200:
                        return web.Response(body=body, content_type="application/json")
                    failures.append(f"{instance.url}: HTTP {response.status}")
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                failures.append(f"{instance.url}: {exc!r}")
        return error_response(503, "no decode instance listed its models: " + ("; ".join(failures) or "none available"),
                              None)

    async def health(self, request: web.Request) -> web.Response:
        num_prefill = sum(i.available for i in self.prefill.instances)
        num_decode = sum(i.available for i in self.decode.instances)
        ready = num_decode > 0 and (num_prefill > 0 or self.config.local_prefill_fallback)
        return web.json_response(
            {"status": "ok" if ready else "unavailable", "prefill_available": num_prefill,
             "decode_available": num_decode},
            status=200 if ready else 503,
        )

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ------------------------------------------------------------------ admin endpoints

    async def admin(self, request: web.Request) -> web.Response:
        if self.config.admin_token is None:
            return error_response(403, "admin endpoints are disabled; start the router with an admin token", None)
        if not _bearer_matches(request, self.config.admin_token):
            return error_response(401, "missing or wrong admin token: send Authorization: Bearer <admin token>", None)
        action = request.match_info["action"]
        if request.method == "GET":
            if action != "instances":
                return error_response(404, f"unknown admin resource {action!r}; use GET /admin/instances", None)
            return web.json_response([i.describe() for pool in self.pools.values() for i in pool.instances])
        try:
            change = msgspec.json.decode(await request.read(), type=AdminChange)
            pool = self.pools[change.role]
            if action == "add":
                instance = pool.add(InstanceConfig(url=change.url, weight=change.weight))
            elif action == "remove":
                instance = pool.remove(change.url)
            elif action == "drain":
                instance = pool.drain(change.url)
            else:
                return error_response(404, f"unknown admin action {action!r}; use add, remove or drain", None)
        except (msgspec.DecodeError, msgspec.ValidationError, ConfigError, AdminError) as exc:
            return error_response(400, f"admin {action}: {exc}", None)
        logger.info("admin %s %s instance %s", action, instance.role.value, instance.url)
        return web.json_response(instance.describe())

    # ------------------------------------------------------------------ prefill

    async def _prefill(self, parsed: ClientRequest, request_id: str) -> dict[str, Any] | None:
        """Return prefill's ``kv_transfer_params``, or None when decode should prefill locally."""
        if parsed.num_prompt_tokens < self.config.min_disagg_tokens:
            self.metrics.local_prefill.labels("short_prompt").inc()
            return None
        failures: list[str] = []
        tried: set[str] = set()
        body = prefill_body(parsed)
        for attempt in range(self.config.max_attempts):
            instance = self.prefill.pick(parsed.num_prompt_tokens, frozenset(tried))
            if instance is None:
                break
            tried.add(instance.url)
            if attempt:
                self.metrics.retries.labels(Role.PREFILL.value).inc()
            try:
                with self.prefill.track(instance, parsed.num_prompt_tokens):
                    return await self._call_prefill(instance, parsed.endpoint, body, request_id)
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
        response, raw = await self._post(f"prefill {instance.url}", instance.url + endpoint.value, body, request_id,
                                         self._prefill_timeout, self.config.timeouts.prefill_s)
        try:
            params = read_kv_transfer_params(raw, instance.url)
        except PrefillError as exc:
            raise UpstreamFailure(str(exc)) from None
        self.prefill.record_success(instance)
        instance.latency_histogram.observe(time.perf_counter() - start)
        return params

    async def _post(self, who: str, url: str, body: bytes, request_id: str, timeout: aiohttp.ClientTimeout,
                    timeout_s: float) -> tuple[aiohttp.ClientResponse, bytes]:
        """One non-streaming upstream call; transport failures become ``UpstreamFailure`` naming ``who``."""
        try:
            async with self.session.post(url, data=body, headers=self._headers(request_id),
                                         timeout=timeout) as response:
                raw = await response.read()
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamFailure(f"{who} unreachable: {exc.os_error!r}", delivered=False) from None
        except asyncio.TimeoutError:
            raise UpstreamFailure(f"{who} timed out after {timeout_s} s") from None
        except aiohttp.ClientError as exc:
            raise UpstreamFailure(f"{who} failed: {exc!r}") from None
        _check_status(response, raw, who)
        return response, raw

    # ------------------------------------------------------------------ decode

    async def _decode(self, request: web.Request, parsed: ClientRequest, kv_params: dict[str, Any] | None,
                      request_id: str) -> web.StreamResponse:
        failures: list[str] = []
        failure: UpstreamFailure | None = None
        tried: set[str] = set()
        for attempt in range(self.config.max_attempts):
            instance = self.decode.pick(parsed.num_prompt_tokens, frozenset(tried))
            if instance is None:
                break
            tried.add(instance.url)
            if attempt:
                self.metrics.retries.labels(Role.DECODE.value).inc()
                if kv_params is not None and failure is not None and failure.delivered:
                    kv_params = await self._prefill(parsed, request_id)
            with self.decode.track(instance, parsed.num_prompt_tokens):
                try:
                    if parsed.stream:
                        return await self._stream_decode(request, instance, parsed, kv_params, request_id)
                    return await self._call_decode(instance, parsed, kv_params, request_id)
                except UpstreamFailure as exc:
                    failure = exc
                    self.decode.record_failure(instance, str(exc))
                    failures.append(str(exc))
                    logger.warning("request %s: %s", request_id, exc)
        if failures:
            raise RouteError(502, ErrorCause.DECODE_FAILED, "decode failed: " + "; ".join(failures))
        raise RouteError(503, ErrorCause.NO_DECODE_INSTANCE,
                         "no decode instance is available (all ejected, draining or removed)")

    async def _call_decode(self, instance: Instance, parsed: ClientRequest, kv_params: dict[str, Any] | None,
                           request_id: str) -> web.Response:
        start = time.perf_counter()
        response, raw = await self._post(f"decode {instance.url}", instance.url + parsed.endpoint.value,
                                         decode_body(parsed, kv_params), request_id, self._decode_timeout,
                                         self.config.timeouts.decode_total_s)
        self.decode.record_success(instance)
        elapsed = time.perf_counter() - start
        instance.first_byte_histogram.observe(elapsed)
        instance.latency_histogram.observe(elapsed)
        self.metrics.ok(parsed.endpoint.value)
        return web.Response(body=raw, status=response.status, content_type="application/json",
                            headers={REQUEST_ID_HEADER: request_id})

    async def _stream_decode(self, request: web.Request, instance: Instance, parsed: ClientRequest,
                             kv_params: dict[str, Any] | None, request_id: str) -> web.StreamResponse:
        start = time.perf_counter()
        upstream, head = await self._open_stream(instance, parsed, kv_params, request_id)
        instance.first_byte_histogram.observe(time.perf_counter() - start)
        try:
            return await self._relay_stream(request, instance, parsed, upstream, head, start, request_id)
        finally:
            upstream.release()

    async def _relay_stream(self, request: web.Request, instance: Instance, parsed: ClientRequest,
                            upstream: aiohttp.ClientResponse, head: bytes, start: float,
                            request_id: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               REQUEST_ID_HEADER: request_id})
        try:
            await response.prepare(request)
            await response.write(head)
        except ConnectionResetError:
            self.metrics.error(parsed.endpoint.value, ErrorCause.CLIENT_DISCONNECTED)
            return response
        tail = head[-len(_DONE_EVENT):]
        while True:
            try:
                chunk = await upstream.content.readany()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                reason = f"decode {instance.url} stream broke: {exc!r}"
                break
            if not chunk:
                reason = None if tail.endswith(_DONE_EVENT) else f"decode {instance.url} ended without [DONE]"
                break
            tail = (tail + chunk)[-len(_DONE_EVENT):]
            try:
                await response.write(chunk)
            except ConnectionResetError:
                self.metrics.error(parsed.endpoint.value, ErrorCause.CLIENT_DISCONNECTED)
                return response
        if reason is None:
            self.decode.record_success(instance)
            instance.latency_histogram.observe(time.perf_counter() - start)
            self.metrics.ok(parsed.endpoint.value)
        else:
            logger.warning("request %s: %s", request_id, reason)
            self.decode.record_failure(instance, reason)
            self.metrics.error(parsed.endpoint.value, ErrorCause.STREAM_INTERRUPTED)
            separator = b"" if tail.endswith(b"\n\n") else b"\n\n"
            try:
                await response.write(separator + _sse_error(502, reason))
            except ConnectionResetError:
                return response
        try:
            await response.write_eof()
        except ConnectionResetError:
            pass
        return response

    async def _open_stream(self, instance: Instance, parsed: ClientRequest, kv_params: dict[str, Any] | None,
                           request_id: str) -> tuple[aiohttp.ClientResponse, bytes]:
        """Send the streaming decode request and read its first SSE event, within decode_first_byte_s."""
        first_byte_s = self.config.timeouts.decode_first_byte_s
        try:
            return await asyncio.wait_for(self._first_event(instance, parsed, kv_params, request_id), first_byte_s)
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamFailure(f"decode {instance.url} unreachable: {exc.os_error!r}", delivered=False) from None
        except asyncio.TimeoutError:
            raise UpstreamFailure(f"decode {instance.url} sent no first event within {first_byte_s} s") from None
        except aiohttp.ClientError as exc:
            raise UpstreamFailure(f"decode {instance.url} failed before its first event: {exc!r}") from None

    async def _first_event(self, instance: Instance, parsed: ClientRequest, kv_params: dict[str, Any] | None,
                           request_id: str) -> tuple[aiohttp.ClientResponse, bytes]:
        upstream = await self.session.post(instance.url + parsed.endpoint.value, data=decode_body(parsed, kv_params),
                                           headers=self._headers(request_id), timeout=self._stream_timeout)
        try:
            if upstream.status >= 400:
                _check_status(upstream, await upstream.read(), f"decode {instance.url}")
            head = b""
            while b"\n\n" not in head and len(head) < _PEEK_LIMIT_BYTES:
                chunk = await upstream.content.readany()
                if not chunk:
                    break
                head += chunk
            if not head:
                raise UpstreamFailure(f"decode {instance.url} closed its stream before the first event")
            if _is_error_event(head):
                raise UpstreamFailure(f"decode {instance.url} streamed an error first: {head[:300]!r}")
            return upstream, head
        except BaseException:
            upstream.close()
            raise

    def _headers(self, request_id: str) -> dict[str, str]:
        return {"Content-Type": "application/json", REQUEST_ID_HEADER: request_id, **self._upstream_auth}

    # ------------------------------------------------------------------ lifecycle

    async def run_health_probes(self) -> None:
        """Probe all instances every ``health.interval_s`` until cancelled; they start out admitted."""
        while True:
            await asyncio.sleep(self.config.health.interval_s)
            await asyncio.gather(*(pool.probe(self.session, self.config.health) for pool in self.pools.values()))


def _check_status(response: aiohttp.ClientResponse, raw: bytes, who: str) -> None:
    if response.status >= 500:
        raise UpstreamFailure(f"{who} answered HTTP {response.status}: {raw[:300]!r}")
    if response.status >= 400:
        raise UpstreamRejection(response.status, raw, response.content_type)


def _is_error_event(head: bytes) -> bool:
    """True if the first SSE event is ``data: {"error": ...}`` (vLLM's in-stream error)."""
    event = head.split(b"\n\n", 1)[0]
    if not event.startswith(b"data:") or b"error" not in event:
        return False
    try:
        data = msgspec.json.decode(event[5:].strip())
    except msgspec.DecodeError:
        return False
    return isinstance(data, dict) and ("error" in data or data.get("object") == "error")


def _bearer_matches(request: web.Request, secret: str | None) -> bool:
    if secret is None:
        return True
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), secret.encode())


def _error_json(status: int, message: str) -> dict[str, Any]:
    """OpenAI/vLLM error shape."""
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "RouterError"), "code": status}}


_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
                404: "NotFoundError", 413: "RequestTooLargeError", 502: "BadGatewayError",
                503: "ServiceUnavailableError"}


def error_response(status: int, message: str, request_id: str | None) -> web.Response:
    headers = {REQUEST_ID_HEADER: request_id} if request_id else None
    return web.json_response(_error_json(status, message), status=status, headers=headers)


def _sse_error(status: int, message: str) -> bytes:
    return b"data: " + msgspec.json.encode(_error_json(status, message)) + b"\n\n"


ROUTER_KEY = web.AppKey("router", Router)


def build_app(config: RouterConfig) -> web.Application:
    """The aiohttp application; the upstream session and health probes start with it."""
    router = Router(config)
    app = web.Application(client_max_size=config.max_body_bytes)
    app[ROUTER_KEY] = router

    async def lifecycle(app: web.Application):
        # no cookie jar: instances set no cookies, and a jar costs work on every request
        router.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
                                               cookie_jar=aiohttp.DummyCookieJar())
        probes = asyncio.create_task(router.run_health_probes())
        yield
        probes.cancel()
        await asyncio.gather(probes, return_exceptions=True)
        await router.session.close()

    app.cleanup_ctx.append(lifecycle)
    for endpoint in Endpoint:
        app.router.add_post(endpoint.value, functools.partial(router.generate, endpoint=endpoint))
    app.router.add_get("/v1/models", router.models)
    app.router.add_get("/health", router.health)
    app.router.add_get("/metrics", router.metrics_page)
    app.router.add_route("*", "/admin/{action}", router.admin)
    return app


class RunningRouter:
    """A router serving on a port in the current event loop (for tests and embedding)."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self.runner = runner
        self.url = f"http://{host}:{port}"

    @property
    def router(self) -> Router:
        return self.runner.app[ROUTER_KEY]

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_router(config: RouterConfig, port: int | None = None) -> RunningRouter:
    """Serve ``config`` on ``config.host`` and ``port`` (default ``config.port``; 0 picks a free port)."""
    runner = web.AppRunner(build_app(config), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port if port is None else port, reuse_address=True)
    await site.start()
    bound_port = runner.addresses[0][1]
    logger.info("router listening on http://%s:%d", config.host, bound_port)
    return RunningRouter(runner, config.host, bound_port)
