"""The router's two upstream calls and nothing else: the floor that a P/D relay in Python pays.

``bench router --relay bare-aiohttp`` or ``--relay bare-httptools`` runs one of these in place of
``vllm-hetero-pd proxy``, so that the same run prices the HTTP server separately from the router's
own work (pools, policies, metrics, checks, recovery). Both relays make the router's calls with
its own client (``router.upstream``): prefill with ``max_tokens=1``, then decode with prefill's
``kv_transfer_params``, the answer relayed as it comes (a stream chunk by chunk). They check
nothing and recover from nothing: they are a measuring stick, never a server to deploy.

* ``aiohttp``: aiohttp's web server, as the router uses it;
* ``httptools``: an ``asyncio.Protocol`` parsing requests with llhttp (uvicorn's parser), one
  request per connection at a time, streams sent chunked.

Run: ``python -m vllm_hetero_pd.testing.bare_relay --server httptools --port 8000 --prefill URL --decode URL``.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import httptools
import msgspec
from aiohttp import web

from vllm_hetero_pd.router.protocol import prefill_body
from vllm_hetero_pd.router.upstream import Timeouts, UpstreamClient

SERVERS = ("aiohttp", "httptools")
_TIMEOUTS = Timeouts(total_s=60.0, connect_s=5.0)
_JSON = {"Content-Type": "application/json"}


class BareRelay:
    """Prefill then decode for one request body; the decode's answer piece by piece."""

    def __init__(self, prefill_url: str, decode_url: str) -> None:
        self.prefill_url, self.decode_url = prefill_url, decode_url
        self.client = UpstreamClient()

    async def open(self, path: str, raw: bytes) -> tuple[bool, AsyncIterator[bytes]]:
        """Make both calls up to the decode's answer head: whether it streams, and its body."""
        body = msgspec.json.decode(raw)
        prefill = await self.client.request("POST", self.prefill_url, path, _TIMEOUTS, _JSON,
                                            msgspec.json.encode(prefill_body(body)))
        body["kv_transfer_params"] = msgspec.json.decode(await prefill.read())["kv_transfer_params"]
        decode = await self.client.request("POST", self.decode_url, path, _TIMEOUTS, _JSON, msgspec.json.encode(body))

        async def pieces() -> AsyncIterator[bytes]:
            while chunk := await decode.read_chunk():
                yield chunk

        return bool(body.get("stream")), pieces()


def aiohttp_app(relay: BareRelay) -> web.Application:
    async def generate(request: web.Request) -> web.StreamResponse:
        stream, pieces = await relay.open(request.path, await request.read())
        if not stream:
            return web.Response(body=b"".join([p async for p in pieces]), content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        async for piece in pieces:
            await response.write(piece)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", generate)
    app.router.add_post("/v1/chat/completions", generate)
    app.router.add_get("/health", lambda _: web.Response(text="ok"))
    return app


class HttptoolsRelay(asyncio.Protocol):
    """One client connection: requests parsed by llhttp, answered by ``BareRelay`` one at a time."""

    def __init__(self, relay: BareRelay) -> None:
        self.relay = relay
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        raw, self.body = b"".join(self.body), []
        asyncio.ensure_future(self._answer(self.url.decode(), self.parser.get_method(), raw))

    async def _answer(self, path: str, method: bytes, raw: bytes) -> None:
        if method == b"GET":
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            return
        stream, pieces = await self.relay.open(path, raw)
        if not stream:
            body = b"".join([p async for p in pieces])
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                                 % (len(body), body))
            return
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        async for piece in pieces:
            self.transport.write(head + b"%x\r\n%b\r\n" % (len(piece), piece))
            head = b""
        self.transport.write(head + b"0\r\n\r\n")


async def serve(server: str, port: int, prefill_url: str, decode_url: str) -> None:
    """Serve on 127.0.0.1:``port`` until cancelled."""
    relay = BareRelay(prefill_url, decode_url)
    if server == "aiohttp":
        runner = web.AppRunner(aiohttp_app(relay), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
    else:
        await asyncio.get_running_loop().create_server(lambda: HttptoolsRelay(relay), "127.0.0.1", port)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", choices=SERVERS, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prefill", required=True, help="prefill base URL")
    parser.add_argument("--decode", required=True, help="decode base URL")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        uvloop = None
    run = uvloop.run if uvloop is not None else asyncio.run
    run(serve(args.server, args.port, args.prefill, args.decode))


if __name__ == "__main__":
    main()
