"""A vLLM-like OpenAI server on a real socket, for router tests, the router benchmark and demos.

It speaks the parts of vLLM's protocol the router depends on, and checks them:

* a ``prefill`` instance insists on ``max_tokens=1``, ``stream=false`` and
  ``kv_transfer_params.do_remote_decode=true`` (HTTP 400 otherwise) and answers with
  ``kv_transfer_params`` in NixlConnector's pull-mode shape, naming itself as
  ``remote_engine_id`` and the ``X-Request-Id`` as ``remote_request_id``;
* a ``decode`` instance accepts ``kv_transfer_params`` only if they name a prefill engine it was
  told about and the same request id (HTTP 400 otherwise), so a test sees any params that were
  forged, stale or mixed up; without params it prefills "locally" if ``allow_local_prefill``;
* answers stream as vLLM streams them: one SSE event per token, an optional usage event
  (``stream_options.include_usage``), then ``data: [DONE]``.

Output is deterministic: token ``i`` of a request is `` w<(hash(prompt) + i) % 1000>``, so a test
can compare an answer through the router with a direct call. ``Faults`` injects failures.

``FakeCluster`` starts fake prefill and decode pools plus a router on loopback ports in the
current event loop. Run one instance standalone:
``python -m vllm_hetero_pd.router.fake_backend --role decode --port 8200``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import zlib
from collections.abc import Sequence
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from vllm_hetero_pd.router.app import RunningRouter, start_router
from vllm_hetero_pd.router.config import InstanceConfig, Policy, PoolConfig, RouterConfig

REQUEST_ID_HEADER = "X-Request-Id"


class Faults:
    """Failure knobs, changed by tests while the server runs.

    ``fail_status``: answer the next ``fail_count`` generate requests with this status.
    ``error_event_first``: under HTTP 200, stream an error event first (vLLM reports in-stream errors so).
    ``break_after_events``: drop the connection after this many SSE events.
    ``omit_kv_params``: a prefill instance answers without ``kv_transfer_params`` (misconfigured).
    ``delay_s``: wait this long before answering a generate request.
    ``health_status``: status of ``GET /health``.
    """

    def __init__(self) -> None:
        self.fail_status = 500
        self.fail_count = 0
        self.error_event_first = False
        self.break_after_events: int | None = None
        self.omit_kv_params = False
        self.delay_s = 0.0
        self.health_status = 200


class Received(msgspec.Struct, frozen=True, kw_only=True):
    """One generate request as the fake saw it."""

    path: str
    request_id: str | None
    authorization: str | None
    body: dict[str, Any]


class FakeVllm:
    """One fake instance; ``await start()`` binds a loopback port, ``await stop()`` closes it."""

    def __init__(self, role: str, engine_id: str | None = None, *, model: str = "fake-model",
                 prefill_engine_ids: frozenset[str] = frozenset(), allow_local_prefill: bool = True,
                 token_interval_s: float = 0.0, record: bool = True) -> None:
        if role not in ("prefill", "decode"):
            raise ValueError(f"role must be 'prefill' or 'decode', got {role!r}")
        self.role = role
        self.engine_id = engine_id or f"{role}-engine"
        self.model = model
        self.prefill_engine_ids = set(prefill_engine_ids)
        self.allow_local_prefill = allow_local_prefill
        self.token_interval_s = token_interval_s
        self.record = record
        self.faults = Faults()
        self.received: list[Received] = []
        self.num_requests = 0
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._open_transports: set[asyncio.Transport] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def num_requests_in_progress(self) -> int:
        return len(self._open_transports)

    async def start(self, port: int = 0) -> FakeVllm:
        app = web.Application()
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port or self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        """Close the socket and cut every request in progress, as a crashed instance would."""
        for transport in self._open_transports:
            transport.abort()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=self.faults.health_status)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model",
                                                              "owned_by": "vllm", "root": self.model}]})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport  # request.transport is None once the connection is lost
        self._open_transports.add(transport)
        try:
            return await self._answer(request)
        finally:
            self._open_transports.discard(transport)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.num_requests += 1
        body = msgspec.json.decode(await request.read())
        request_id = request.headers.get(REQUEST_ID_HEADER)
        if self.record:
            self.received.append(Received(path=request.path, request_id=request_id, body=body,
                                          authorization=request.headers.get("Authorization")))
        if self.faults.delay_s:
            await asyncio.sleep(self.faults.delay_s)
        if self.faults.fail_count > 0:
            self.faults.fail_count -= 1
            return _error(self.faults.fail_status, f"injected failure on {self.engine_id}")
        problem = self._check(body, request_id)
        if problem:
            return _error(400, f"{self.engine_id}: {problem}")
        chat = request.path.endswith("/chat/completions")
        if self.role == "prefill":
            return web.json_response(self._prefill_answer(body, request_id, chat))
        if body.get("stream"):
            return await self._stream(request, body, chat)
        return web.json_response(_completion(body, chat, self.model, request_id))

    def _check(self, body: dict[str, Any], request_id: str | None) -> str | None:
        params = body.get("kv_transfer_params")
        if self.role == "prefill":
            if body.get("max_tokens") != 1 or body.get("stream") or "stream_options" in body:
                return "prefill needs max_tokens=1, stream=false and no stream_options"
            if not isinstance(params, dict) or params.get("do_remote_decode") is not True:
                return "prefill needs kv_transfer_params.do_remote_decode=true"
            return None
        if params is None:
            return None if self.allow_local_prefill else "decode got no kv_transfer_params"
        if params.get("do_remote_prefill") is not True or params.get("remote_engine_id") not in self.prefill_engine_ids:
            return f"decode got kv_transfer_params not issued by a known prefill engine: {params!r}"
        if params.get("remote_request_id") != request_id:
            return f"kv_transfer_params are for request {params.get('remote_request_id')!r}, not {request_id!r}"
        return None

    def _prefill_answer(self, body: dict[str, Any], request_id: str | None, chat: bool) -> dict[str, Any]:
        answer = _completion(body, chat, self.model, request_id)
        num_tokens = answer["usage"]["prompt_tokens"]
        answer["kv_transfer_params"] = None if self.faults.omit_kv_params else {
            "do_remote_prefill": True, "do_remote_decode": False,
            "remote_block_ids": [list(range((num_tokens + 15) // 16))], "remote_engine_id": self.engine_id,
            "remote_request_id": request_id, "remote_host": "127.0.0.1", "remote_port": self.port,
            "tp_size": 1, "dcp_size": 1, "pp_size": 1, "remote_num_tokens": num_tokens,
            "remote_blocks_expiry_time": None, "transfer_mode": "pull",
        }
        return answer

    async def _stream(self, request: web.Request, body: dict[str, Any], chat: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        events = list(_stream_events(body, chat, self.model, request.headers.get(REQUEST_ID_HEADER)))
        if self.faults.error_event_first:
            message = f"injected in-stream error on {self.engine_id}"
            events = [{"error": {"message": message, "type": "InternalServerError", "code": 500}}]
        try:
            for i, event in enumerate(events):
                if self.faults.break_after_events is not None and i >= self.faults.break_after_events:
                    request.transport.close()  # an instance dying mid-stream
                    return response
                await response.write(b"data: " + msgspec.json.encode(event) + b"\n\n")
                if self.token_interval_s:
                    await asyncio.sleep(self.token_interval_s)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:  # the reader went away (or stop() cut the connection)
            pass
        return response


class FakeCluster:
    """Fake prefill/decode pools behind a real router, all on loopback in this event loop.

    Decode fakes accept only ``kv_transfer_params`` issued by this cluster's prefill fakes, and
    refuse requests without them unless ``allow_local_prefill``. Use as ``async with``.
    """

    def __init__(self, prefill_weights: Sequence[float] = (1.0,), decode_weights: Sequence[float] = (1.0,), *,
                 prefill_policy: Policy = Policy.LEAST_WORK, decode_policy: Policy = Policy.LEAST_WORK,
                 allow_local_prefill: bool = False, token_interval_s: float = 0.0, record: bool = True,
                 **router_options: Any) -> None:
        self.prefill = [FakeVllm("prefill", f"prefill-{i}", record=record) for i in range(len(prefill_weights))]
        engine_ids = frozenset(p.engine_id for p in self.prefill)
        self.decode = [FakeVllm("decode", f"decode-{i}", prefill_engine_ids=engine_ids, record=record,
                                allow_local_prefill=allow_local_prefill, token_interval_s=token_interval_s)
                       for i in range(len(decode_weights))]
        self._weights = (tuple(prefill_weights), tuple(decode_weights))
        self._policies = (prefill_policy, decode_policy)
        self._router_options = {"port": 0, **router_options}
        self.router: RunningRouter | None = None
        self.session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return self.router.url

    async def __aenter__(self) -> FakeCluster:
        for fake in (*self.prefill, *self.decode):
            await fake.start()
        config = RouterConfig(
            prefill=PoolConfig(instances=tuple(InstanceConfig(url=f.url, weight=w)
                                               for f, w in zip(self.prefill, self._weights[0])),
                               policy=self._policies[0]),
            decode=PoolConfig(instances=tuple(InstanceConfig(url=f.url, weight=w)
                                              for f, w in zip(self.decode, self._weights[1])),
                              policy=self._policies[1]),
            **self._router_options,
        )
        self.router = await start_router(config)
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.session.close()
        await self.router.stop()
        for fake in (*self.prefill, *self.decode):
            await fake.stop()


def output_tokens(body: dict[str, Any]) -> list[str]:
    """The deterministic answer of any fake instance to ``body``."""
    prompt = body.get("prompt", body.get("messages"))
    seed = zlib.crc32(msgspec.json.encode(prompt))
    num_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 16
    return [f" w{(seed + i) % 1000}" for i in range(num_tokens)]


def _num_prompt_tokens(body: dict[str, Any]) -> int:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return len(prompt)
    return max(1, len(msgspec.json.encode(prompt if prompt is not None else body.get("messages"))) // 4)


def _completion(body: dict[str, Any], chat: bool, model: str, request_id: str | None) -> dict[str, Any]:
    tokens = output_tokens(body)
    text = "".join(tokens)
    choice: dict[str, Any] = (
        {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": "length"}
        if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": "length", "stop_reason": None}
    )
    num_prompt = _num_prompt_tokens(body)
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()), "model": model, "choices": [choice],
        "usage": {"prompt_tokens": num_prompt, "completion_tokens": len(tokens),
                  "total_tokens": num_prompt + len(tokens)},
    }


def _stream_events(body: dict[str, Any], chat: bool, model: str, request_id: str | None):
    tokens = output_tokens(body)
    base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
            "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model}
    if chat:
        yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    for i, token in enumerate(tokens):
        finish = "length" if i == len(tokens) - 1 else None
        choice = ({"index": 0, "delta": {"content": token}, "logprobs": None, "finish_reason": finish} if chat
                  else {"index": 0, "text": token, "logprobs": None, "finish_reason": finish, "stop_reason": None})
        yield {**base, "choices": [choice]}
    if (body.get("stream_options") or {}).get("include_usage"):
        num_prompt = _num_prompt_tokens(body)
        yield {**base, "choices": [], "usage": {"prompt_tokens": num_prompt, "completion_tokens": len(tokens),
                                                "total_tokens": num_prompt + len(tokens)}}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "BadRequestError" if status < 500
                                         else "InternalServerError", "code": status}}, status=status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a fake vLLM prefill or decode instance on loopback")
    parser.add_argument("--role", choices=["prefill", "decode"], required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--engine-id", default=None, help="this instance's engine id (default: <role>-engine)")
    parser.add_argument("--prefill-engine-ids", default="prefill-engine",
                        help="comma-separated prefill engine ids a decode instance accepts params from")
    parser.add_argument("--token-interval-s", type=float, default=0.0, help="pause between streamed tokens")
    args = parser.parse_args(argv)

    async def serve() -> None:
        fake = FakeVllm(args.role, args.engine_id, prefill_engine_ids=frozenset(args.prefill_engine_ids.split(",")),
                        token_interval_s=args.token_interval_s, record=False)
        await fake.start(args.port)
        print(f"fake {args.role} {fake.engine_id} on {fake.url}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
