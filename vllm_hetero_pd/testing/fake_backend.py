"""A vLLM-like OpenAI server on a real socket, for router tests, the router benchmark and demos.

It speaks the parts of vLLM's protocol the router depends on, and checks them:

* a ``prefill`` instance insists on ``max_tokens=1``, ``stream=false`` and
  ``kv_transfer_params.do_remote_decode=true`` (HTTP 400 otherwise) and answers with
  ``kv_transfer_params`` shaped like our connector's (``kv_params.TransferParams``): itself as
  ``remote_engine_id``, the ``X-Request-Id`` as ``remote_request_id``, a ``lease_token`` and the
  ``prompt_digest`` of the prompt. Like vLLM, it answers a batch with prompt 0's params only;
* a ``decode`` instance accepts ``kv_transfer_params`` only if they parse as ``TransferParams``,
  name a prefill engine it was told about and the same request id, carry a lease token that
  engine issued, and match the digest of every prompt it got (HTTP 400 otherwise, as our decode
  refuses a prompt with another digest). It refuses params with ``n > 1`` (the children would
  share one lease). So a test sees any params that were forged, altered, stale or mixed up.
  Without params it prefills "locally" if ``allow_local_prefill``;
* answers come as vLLM gives them, also for batches and ``n > 1``: choices prompt-major, child
  ``i`` seeded ``seed + i``, usage counting each prompt once; streams have one SSE event per
  token and choice, an optional usage event (``stream_options.include_usage``), then
  ``data: [DONE]``;
* a client that disconnects cancels its request (``num_cancelled``), as vLLM aborts it;
* a ``both`` instance (``kv_role: kv_both``) answers a request carrying
  ``kv_transfer_params.do_remote_decode=true`` as a prefill and any other as a decode, so one
  instance can prefill for others while it decodes its own requests.

With ``prefix_cache_blocks`` an instance keeps an LRU prefix cache of that many blocks, keyed
by its own hash chain (sha256, unlike the router's), counts hits in ``vllm:prefix_cache_*`` on
``/metrics`` and, with ``kv_events=True``, publishes vLLM's KV events (``BlockStored`` with parent
hash and token ids, ``BlockRemoved``, ``AllBlocksCleared``) on a ZMQ PUB socket, with a replay
ROUTER socket like vLLM's (``kv_events_endpoint``/``kv_replay_endpoint``; ``EventFaults`` drops
batches or restarts the sequence). ``prefill_s_per_token`` makes each uncached prompt token cost
time, so cache hits show in latency. A decode reports ``vllm:kv_cache_usage_perc`` from the KV
its requests in flight hold (prompt + max_tokens), counts a preemption whenever that passes its
capacity, and adds ``transfer_s_per_token`` per loaded token to ``vllm:hetero_pd_transfer_seconds``.

Output is deterministic: token ``i`` of a choice is `` w<(crc32(prompt, seed) + i) % 1000>``, so a
test can compare an answer through the router with a direct call (``choice_tokens``).
``Faults`` injects failures.

``FakeCluster`` starts fake prefill and decode pools plus a router on loopback ports in the
current event loop. Run one instance standalone:
``python -m vllm_hetero_pd.testing.fake_backend --role decode --port 8200``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import secrets
import time
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from vllm_hetero_pd import kv_params
from vllm_hetero_pd.router.app import RunningRouter, start_router
from vllm_hetero_pd.router.config import InstanceConfig, Policy, PoolConfig, RouterConfig

REQUEST_ID_HEADER = "X-Request-Id"


class Faults:
    """Failure knobs, changed by tests while the server runs.

    ``fail_status``: answer the next ``fail_count`` generate requests with this status.
    ``fail_kv_loads``: fail the next this many decode requests that carry ``kv_transfer_params``
    the way vLLM reports a failed KV load: HTTP 500, or under HTTP 200 an error event first when
    streamed (requests without params still succeed, as a local prefill does).
    ``error_event_first``: under HTTP 200, stream an error event first (vLLM reports in-stream errors so).
    ``break_after_events``: drop the connection after this many SSE events.
    ``omit_kv_params``: a prefill instance answers without ``kv_transfer_params`` (misconfigured).
    ``delay_s``: wait this long before answering a generate request.
    ``first_event_delay_s``: after a stream's headers, wait this long before its first event (as vLLM
    does while it loads remote KV and computes the first token).
    ``health_status``: status of ``GET /health``.
    """

    def __init__(self) -> None:
        self.fail_status = 500
        self.fail_count = 0
        self.fail_kv_loads = 0
        self.error_event_first = False
        self.break_after_events: int | None = None
        self.omit_kv_params = False
        self.delay_s = 0.0
        self.first_event_delay_s = 0.0
        self.health_status = 200


class EventFaults:
    """KV event knobs: ``drop_batches`` publishes nothing for the next N batches (their sequence
    numbers are used up, so the subscriber sees a gap); ``replay_enabled`` False makes the replay
    socket answer with nothing but the end marker."""

    def __init__(self) -> None:
        self.drop_batches = 0
        self.replay_enabled = True


class FakePrefixCache:
    """An engine-like LRU cache of full blocks: engine hash -> tokens, chained by sha256."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks: dict[bytes, None] = {}  # insertion order = LRU order
        self.num_queries = 0
        self.num_hits = 0

    def lookup_and_store(self, token_ids: list[int]) -> tuple[int, list[dict[str, Any]]]:
        """Cached tokens of the prompt (as vLLM counts them), and the KV events caching it caused."""
        bs = self.block_size
        parent = b""
        hashes = []
        for start in range(0, len(token_ids) - bs + 1, bs):
            parent = hashlib.sha256(parent + msgspec.msgpack.encode(token_ids[start:start + bs])).digest()
            hashes.append(parent)
        num_hit = 0
        for h in hashes:
            if h not in self.blocks:
                break
            num_hit += 1
        cached = max(0, min(num_hit * bs, len(token_ids) - 1))
        self.num_queries += len(token_ids)
        self.num_hits += cached
        events: list[dict[str, Any]] = []
        for h in hashes[:num_hit]:  # touch
            self.blocks.pop(h)
            self.blocks[h] = None
        new = hashes[num_hit:]
        if new:
            events.append({"type": "BlockStored", "block_hashes": new,
                           "parent_block_hash": hashes[num_hit - 1] if num_hit else None,
                           "token_ids": token_ids[num_hit * bs:len(hashes) * bs], "block_size": bs,
                           "lora_id": None, "medium": "GPU", "lora_name": None})
            for h in new:
                self.blocks[h] = None
        evicted = []
        while len(self.blocks) > self.num_blocks:
            oldest = next(iter(self.blocks))
            if oldest in new:
                break
            del self.blocks[oldest]
            evicted.append(oldest)
        if evicted:
            events.append({"type": "BlockRemoved", "block_hashes": evicted, "medium": "GPU"})
        return cached, events

    def clear(self) -> None:
        self.blocks.clear()


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
                 token_interval_s: float = 0.0, record: bool = True, prefix_cache_blocks: int = 0,
                 block_size: int = 16, kv_events: bool = False, tokenizer: Any = None,
                 prefill_s_per_token: float = 0.0, kv_capacity_tokens: int | None = None,
                 transfer_s_per_token: float = 0.0) -> None:
        if role not in ("prefill", "decode", "both"):
            raise ValueError(f"role must be 'prefill', 'decode' or 'both', got {role!r}")
        self.cache = FakePrefixCache(prefix_cache_blocks, block_size) if prefix_cache_blocks else None
        self.kv_events = kv_events
        self.event_faults = EventFaults()
        self.tokenizer = tokenizer  # a router.tokens.PromptTokenizer, so text prompts hash as the router's do
        self.prefill_s_per_token = prefill_s_per_token
        self.kv_capacity_tokens = kv_capacity_tokens
        self.transfer_s_per_token = transfer_s_per_token
        self.num_active_kv_tokens = 0
        self.num_preemptions = 0
        self.num_transfer_s = 0.0
        self.num_transfers = 0
        self.computed_tokens = 0
        self.start_time = time.time()
        self.kv_events_endpoint = ""
        self.kv_replay_endpoint = ""
        self._seq = 0
        self._published: list[tuple[int, bytes]] = []
        self._zmq: Any = None
        self._replay_task: asyncio.Task | None = None
        self._sub_task: asyncio.Task | None = None
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
        self.num_cancelled = 0
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
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1,
                                     handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port or self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]
        if self.kv_events and self._zmq is None:
            self._start_publisher()
        return self

    def _start_publisher(self) -> None:
        import zmq
        import zmq.asyncio

        context = zmq.asyncio.Context()
        pub = context.socket(zmq.XPUB)  # as vLLM's PUB for subscribers; XPUB also tells who subscribed
        pub.setsockopt(zmq.LINGER, 0)
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        replay = context.socket(zmq.ROUTER)
        replay.setsockopt(zmq.LINGER, 0)
        replay_port = replay.bind_to_random_port("tcp://127.0.0.1")
        self._zmq = (context, pub, replay)
        self.kv_events_endpoint = f"tcp://127.0.0.1:{port}"
        self.kv_replay_endpoint = f"tcp://127.0.0.1:{replay_port}"
        self._replay_task = asyncio.get_running_loop().create_task(self._serve_replay(replay))
        self._subscribed = asyncio.Event()
        self._sub_task = asyncio.get_running_loop().create_task(self._watch_subscriptions(pub))

    async def _watch_subscriptions(self, pub: Any) -> None:
        while True:
            message = await pub.recv()
            if message[:1] == b"\x01":
                self._subscribed.set()

    async def wait_subscribed(self, timeout_s: float = 10.0) -> None:
        """Until a subscriber (the router) has joined the event stream; ZMQ drops what it sends before."""
        await asyncio.wait_for(self._subscribed.wait(), timeout_s)

    async def _serve_replay(self, replay: Any) -> None:
        while True:
            client, _, start = await replay.recv_multipart()
            first = int.from_bytes(start, "big")
            if self.event_faults.replay_enabled:
                for seq, payload in list(self._published):
                    if seq >= first:
                        await replay.send_multipart([client, b"", b"", seq.to_bytes(8, "big"), payload])
            await replay.send_multipart([client, b"", b"", (-1).to_bytes(8, "big", signed=True), b""])

    def publish(self, events: list[dict[str, Any]]) -> None:
        """Publish one batch of KV events (vLLM's frames: topic, 8-byte seq, msgpack batch)."""
        if not self.kv_events or not events:
            return
        seq, self._seq = self._seq, self._seq + 1
        payload = msgspec.msgpack.encode([time.time(), events, None])
        self._published = (self._published + [(seq, payload)])[-1000:]
        if self.event_faults.drop_batches > 0:
            self.event_faults.drop_batches -= 1
            return
        self._zmq[1].send_multipart([b"", seq.to_bytes(8, "big"), payload], copy=True)

    def restart_engine(self) -> None:
        """As a restarted engine: the cache is empty and the event sequence starts again at 0."""
        if self.cache is not None:
            self.cache.clear()
        self._seq = 0
        self._published = []
        self.start_time = time.time() + 1.0

    def clear_prefix_cache(self) -> None:
        """As vLLM's reset_prefix_cache: everything goes, and AllBlocksCleared is published."""
        if self.cache is not None:
            self.cache.clear()
        self.publish([{"type": "AllBlocksCleared"}])

    async def stop(self) -> None:
        """Close the socket and cut every request in progress, as a crashed instance would."""
        for transport in self._open_transports:
            transport.abort()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._replay_task is not None:
            for task in (self._replay_task, self._sub_task):
                task.cancel()
            await asyncio.gather(self._replay_task, self._sub_task, return_exceptions=True)
            self._replay_task = None
        if self._zmq is not None:
            context, pub, replay = self._zmq
            pub.close(linger=0)
            replay.close(linger=0)
            context.term()
            self._zmq = None

    async def _metrics(self, request: web.Request) -> web.Response:
        capacity = self.kv_capacity_tokens
        usage = 0.0 if not capacity else min(1.0, self.num_active_kv_tokens / capacity)
        block_size = self.cache.block_size if self.cache else 16
        num_blocks = (capacity // block_size) if capacity else (self.cache.num_blocks if self.cache else 1000)
        labels = f'engine="0",model_name="{self.model}"'
        lines = [
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{labels}}} {usage}",
            f"vllm:num_requests_running{{{labels}}} {self.num_requests_in_progress}",
            f"vllm:num_requests_waiting{{{labels}}} 0.0",
            f'vllm:cache_config_info{{block_size="{block_size}",enable_prefix_caching="{self.cache is not None}",'
            f'engine="0",num_gpu_blocks="{num_blocks}"}} 1.0',
            f"vllm:prefix_cache_queries_total{{{labels}}} {self.cache.num_queries if self.cache else 0}",
            f"vllm:prefix_cache_hits_total{{{labels}}} {self.cache.num_hits if self.cache else 0}",
            f"vllm:num_preemptions_total{{{labels}}} {self.num_preemptions}",
            f"vllm:hetero_pd_transfer_seconds_sum{{{labels}}} {self.num_transfer_s}",
            f"vllm:hetero_pd_transfer_seconds_count{{{labels}}} {self.num_transfers}",
            f"process_start_time_seconds {self.start_time}",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    def _prompt_ids(self, body: dict[str, Any], chat: bool) -> list[int]:
        if self.tokenizer is not None:
            from vllm_hetero_pd.router.tokens import prompt_of

            prompt = prompt_of(body, chat, self.tokenizer)
            if prompt.exact:
                return list(prompt.units)
        return _token_ids(_prompts(body)[0])

    async def _compute(self, body: dict[str, Any], chat: bool, loads_kv: bool) -> int:
        """The simulated engine work of a prompt: cache lookup, events, time per uncached token;
        returns the prompt's length in tokens."""
        token_ids = self._prompt_ids(body, chat)
        cached = 0
        if self.cache is not None:
            cached, events = self.cache.lookup_and_store(token_ids)
            self.publish(events)
        uncached = len(token_ids) - cached
        if loads_kv:
            self.num_transfer_s += uncached * self.transfer_s_per_token
            self.num_transfers += 1
            return len(token_ids)
        self.computed_tokens += uncached
        if self.prefill_s_per_token:
            await asyncio.sleep(uncached * self.prefill_s_per_token)
        return len(token_ids)

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
        except asyncio.CancelledError:  # the client went away: vLLM aborts the request
            self.num_cancelled += 1
            raise
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
        simulated = (self.cache is not None or self.prefill_s_per_token or self.transfer_s_per_token
                     or self.kv_capacity_tokens is not None)
        if self.is_prefill_leg(body):
            if simulated:
                await self._compute(body, chat, loads_kv=False)
            return web.json_response(self._prefill_answer(body, request_id, chat))
        if not simulated:
            return await self._decode_answer(request, body, chat, request_id)
        num_prompt = await self._compute(body, chat, loads_kv="kv_transfer_params" in body)
        return await self._decode_holding_kv(request, body, chat, request_id, num_prompt)

    async def _decode_holding_kv(self, request: web.Request, body: dict[str, Any], chat: bool,
                                 request_id: str | None, num_prompt_tokens: int) -> web.StreamResponse:
        """A decode request holds its prompt and output KV while it runs; past capacity, vLLM preempts."""
        num_kv = num_prompt_tokens + (body.get("max_tokens") or 16)
        self.num_active_kv_tokens += num_kv
        if self.kv_capacity_tokens is not None and self.num_active_kv_tokens > self.kv_capacity_tokens:
            self.num_preemptions += 1
        try:
            return await self._decode_answer(request, body, chat, request_id)
        finally:
            self.num_active_kv_tokens -= num_kv

    async def _decode_answer(self, request: web.Request, body: dict[str, Any], chat: bool,
                             request_id: str | None) -> web.StreamResponse:
        if self.faults.fail_kv_loads > 0 and "kv_transfer_params" in body:
            self.faults.fail_kv_loads -= 1
            return await self._kv_load_failure(request, body)
        if body.get("stream"):
            return await self._stream(request, body, chat)
        return web.json_response(_completion(body, chat, self.model, request_id))

    def is_prefill_leg(self, body: dict[str, Any]) -> bool:
        """A prefill instance's every request; a ``both`` instance's requests that ask it to prefill."""
        params = body.get("kv_transfer_params")
        return self.role == "prefill" or (self.role == "both" and isinstance(params, dict)
                                          and params.get("do_remote_decode") is True)

    def _check(self, body: dict[str, Any], request_id: str | None) -> str | None:
        params = body.get("kv_transfer_params")
        if self.is_prefill_leg(body):
            if body.get("max_tokens") != 1 or body.get("stream") or "stream_options" in body:
                return "prefill needs max_tokens=1, stream=false and no stream_options"
            if not isinstance(params, dict) or params.get("do_remote_decode") is not True:
                return "prefill needs kv_transfer_params.do_remote_decode=true"
            return None
        if params is None:
            return None if self.allow_local_prefill else "decode got no kv_transfer_params"
        return self._check_transfer_params(params, body, request_id)

    def _check_transfer_params(self, raw: Any, body: dict[str, Any], request_id: str | None) -> str | None:
        """What our decode checks in the params it is handed (see the module docstring)."""
        try:
            params = kv_params.parse_transfer_params(raw)
        except ValueError as exc:
            return str(exc)
        if not params.do_remote_prefill or params.remote_engine_id not in self.prefill_engine_ids:
            return f"decode got kv_transfer_params not issued by a known prefill engine: {raw!r}"
        if params.remote_request_id != (request_id or ""):  # "": a client that sends no X-Request-Id
            return f"kv_transfer_params are for request {params.remote_request_id!r}, not {request_id!r}"
        if not _lease_token_valid(params):
            return f"lease_token {params.lease_token!r} was not issued by {params.remote_engine_id}"
        if (body.get("n") or 1) > 1:
            return "kv_transfer_params with n > 1: the children would share one lease"
        for i, prompt in enumerate(_prompts(body)):
            if kv_params.prompt_digest(_token_ids(prompt)) != params.prompt_digest:
                return f"prompt {i} does not match the prompt_digest of its kv_transfer_params"
        return None

    def _prefill_answer(self, body: dict[str, Any], request_id: str | None, chat: bool) -> dict[str, Any]:
        answer = _completion(body, chat, self.model, request_id)
        first = _prompts(body)[0]  # vLLM returns final_res_batch[0].kv_transfer_params
        num_tokens = _num_prompt_tokens(first)
        nonce, remote_request_id = secrets.token_hex(8), request_id or ""
        answer["kv_transfer_params"] = None if self.faults.omit_kv_params else kv_params.to_dict(
            kv_params.TransferParams(
                do_remote_prefill=True, remote_engine_id=self.engine_id, remote_request_id=remote_request_id,
                remote_host="127.0.0.1", remote_port=self.port, remote_block_ids=list(range((num_tokens + 15) // 16)),
                remote_num_tokens=num_tokens,
                lease_token=f"{nonce}.{_lease_mac(self.engine_id, remote_request_id, nonce)}",
                prompt_digest=kv_params.prompt_digest(_token_ids(first))))
        return answer

    async def _kv_load_failure(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        message = f"injected KV load failure on {self.engine_id}"
        if not body.get("stream"):
            return _error(500, message)
        return await self._send_events(request, [_error_body(500, message)])

    async def _stream(self, request: web.Request, body: dict[str, Any], chat: bool) -> web.StreamResponse:
        events = list(_stream_events(body, chat, self.model, request.headers.get(REQUEST_ID_HEADER)))
        if self.faults.error_event_first:
            events = [_error_body(500, f"injected in-stream error on {self.engine_id}")]
        return await self._send_events(request, events)

    async def _send_events(self, request: web.Request, events: list[dict[str, Any]]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            if self.faults.first_event_delay_s:
                await asyncio.sleep(self.faults.first_event_delay_s)
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
                 prefill_options: Sequence[dict[str, Any]] = (), decode_options: Sequence[dict[str, Any]] = (),
                 num_mixed: int = 0, **router_options: Any) -> None:
        """``prefill_options``/``decode_options``: per instance, extra ``FakeVllm`` arguments, plus
        ``kv_format`` (the router's label for it) and ``kv_replay`` (give the router the replay
        endpoint too); with ``kv_events=True`` the router subscribes to the fake's events.
        ``num_mixed``: ``both`` instances (``mixed-<i>``), given to the router as ``mixed``."""
        options = [[dict(o) for o in prefill_options], [dict(o) for o in decode_options]]
        for role, weights in enumerate((prefill_weights, decode_weights)):
            options[role] += [{} for _ in range(len(weights) - len(options[role]))]
        self._labels = [[(o.pop("kv_format", ""), o.pop("kv_replay", False)) for o in opts] for opts in options]
        self.prefill = [FakeVllm("prefill", f"prefill-{i}", record=record, **options[0][i])
                        for i in range(len(prefill_weights))]
        engine_ids = frozenset([p.engine_id for p in self.prefill] + [f"mixed-{i}" for i in range(num_mixed)])
        self.mixed = [FakeVllm("both", f"mixed-{i}", prefill_engine_ids=engine_ids, record=record,
                               token_interval_s=token_interval_s) for i in range(num_mixed)]
        self.decode = [FakeVllm("decode", f"decode-{i}", prefill_engine_ids=engine_ids, record=record,
                                allow_local_prefill=allow_local_prefill,
                                **{"token_interval_s": token_interval_s, **options[1][i]})
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
        for fake in (*self.prefill, *self.decode, *self.mixed):
            await fake.start()
        config = RouterConfig(
            mixed=tuple(InstanceConfig(url=f.url) for f in self.mixed),
            prefill=PoolConfig(instances=tuple(self._instance(f, w, *labels) for f, w, labels
                                               in zip(self.prefill, self._weights[0], self._labels[0])),
                               policy=self._policies[0]),
            decode=PoolConfig(instances=tuple(self._instance(f, w, *labels) for f, w, labels
                                              in zip(self.decode, self._weights[1], self._labels[1])),
                              policy=self._policies[1]),
            **self._router_options,
        )
        self.router = await start_router(config)
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self

    @staticmethod
    def _instance(fake: FakeVllm, weight: float, kv_format: str, kv_replay: bool) -> InstanceConfig:
        return InstanceConfig(url=fake.url, weight=weight, kv_format=kv_format,
                              kv_events=fake.kv_events_endpoint or None,
                              kv_events_replay=fake.kv_replay_endpoint if kv_replay and fake.kv_events else None)

    async def __aexit__(self, *exc_info: object) -> None:
        await self.session.close()
        await self.router.stop()
        for fake in (*self.prefill, *self.decode, *self.mixed):
            await fake.stop()


def choice_tokens(body: dict[str, Any]) -> list[list[str]]:
    """The tokens of every choice any fake instance answers ``body`` with, in vLLM's choice order:
    prompt-major, and with ``seed`` set child ``i`` of ``n`` seeded ``seed + i``."""
    num_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 16
    return [[f" w{(zlib.crc32(msgspec.json.encode([prompt, seed])) + i) % 1000}" for i in range(num_tokens)]
            for prompt, seed in _choices(body)]


def output_tokens(body: dict[str, Any]) -> list[str]:
    """The tokens of the first (for a one-prompt, ``n=1`` request: the only) choice of ``body``."""
    return choice_tokens(body)[0]


def _choices(body: dict[str, Any]) -> Iterator[tuple[Any, int | None]]:
    seed = body.get("seed")
    n = body.get("n") or 1
    for prompt in _prompts(body):
        for i in range(n):
            yield prompt, None if seed is None else seed + i


def _prompts(body: dict[str, Any]) -> list[Any]:
    """The separate prompts of a request (chat: its messages are one prompt)."""
    prompt = body.get("prompt")
    if prompt is None:
        return [body.get("messages")]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return prompt
    return [prompt]


def _token_ids(prompt: Any) -> list[int]:
    """Token-id prompts as they are; anything else as the bytes of its JSON (the fake has no tokenizer)."""
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return prompt
    return list(msgspec.json.encode(prompt))


def _num_prompt_tokens(prompt: Any) -> int:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return len(prompt)
    return max(1, len(msgspec.json.encode(prompt)) // 4)


def _lease_mac(engine_id: str, request_id: str, nonce: str) -> str:
    """A fake lease token's check value: a decode can verify it knowing only the engine id."""
    return hashlib.blake2b(f"{request_id}/{nonce}".encode(), key=engine_id.encode(), digest_size=8).hexdigest()


def _lease_token_valid(params: kv_params.TransferParams) -> bool:
    nonce, _, mac = params.lease_token.partition(".")
    return mac == _lease_mac(params.remote_engine_id, params.remote_request_id, nonce)


def _usage(body: dict[str, Any], choices: list[list[str]]) -> dict[str, int]:
    """vLLM's usage: each prompt's tokens once (not once per sample), every choice's tokens."""
    num_prompt = sum(_num_prompt_tokens(p) for p in _prompts(body))
    num_completion = sum(len(tokens) for tokens in choices)
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion}


def _completion(body: dict[str, Any], chat: bool, model: str, request_id: str | None) -> dict[str, Any]:
    choices = choice_tokens(body)
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()), "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": "".join(tokens)}, "logprobs": None,
             "finish_reason": "length"} if chat else
            {"index": i, "text": "".join(tokens), "logprobs": None, "finish_reason": "length", "stop_reason": None}
            for i, tokens in enumerate(choices)],
        "usage": _usage(body, choices),
    }


def _stream_events(body: dict[str, Any], chat: bool, model: str, request_id: str | None) -> Iterator[dict[str, Any]]:
    """vLLM's chunks: (chat) a role chunk per choice, then token ``t`` of every choice in turn."""
    choices = choice_tokens(body)
    base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
            "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model}
    if chat:
        for i in range(len(choices)):
            yield {**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]}
    for t in range(len(choices[0])):
        for i, tokens in enumerate(choices):
            finish = "length" if t == len(tokens) - 1 else None
            choice = ({"index": i, "delta": {"content": tokens[t]}, "logprobs": None, "finish_reason": finish} if chat
                      else {"index": i, "text": tokens[t], "logprobs": None, "finish_reason": finish,
                            "stop_reason": None})
            yield {**base, "choices": [choice]}
    if (body.get("stream_options") or {}).get("include_usage"):
        yield {**base, "choices": [], "usage": _usage(body, choices)}


def _error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "BadRequestError" if status < 500 else "InternalServerError",
                      "code": status}}


def _error(status: int, message: str) -> web.Response:
    return web.json_response(_error_body(status, message), status=status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a fake vLLM prefill, decode or kv_both instance on loopback")
    parser.add_argument("--role", choices=["prefill", "decode", "both"], required=True)
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
