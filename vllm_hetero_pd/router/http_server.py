"""The router's HTTP/1.1 server: requests parsed by llhttp (``httptools``) straight from an
``asyncio.Protocol``, answered by the router's handlers.

Why our own: the server was most of the router's CPU per request. In the same run of ``bench
router --relay``, a bare relay of the router's two calls used 357 µs (non-streaming) and 467 µs
(streaming) per request on aiohttp's server, 271 and 324 µs on a protocol like this one
(docs/router.md, Benchmark). It does the part of aiohttp's server that the router used:

* routes by exact path, or by a path prefix whose rest is ``match_info[name]``; an unknown path
  is a 404, a known path with another method a 405 naming the allowed ones, and ``HEAD`` on a
  ``GET`` route answers its head only;
* keep-alive as HTTP/1.1 says (``Connection: close`` and HTTP/1.0 end it); the requests of one
  connection are answered in order, and reading pauses while more than ``_MAX_QUEUED`` wait;
* a request's body is read whole before its handler runs, up to ``max_body_bytes``; beyond that
  it is read and dropped, ``Request.read`` raises ``BodyTooLarge`` (a handler that does not
  answer it gets a 413), and the connection closes after the answer, as the client may not have
  expected to be cut off mid-body; ``Expect: 100-continue`` is answered;
* a malformed request, an upgrade, or a head over ``_MAX_HEAD_BYTES`` gets a 400 (431 for the
  head) and the connection closes;
* a client that disconnects cancels the handler of its request in flight (aiohttp's
  ``handler_cancellation``), so the router closes its upstream calls and vLLM aborts them;
* a connection idle for ``KEEPALIVE_S`` is closed; a write waits while the client reads slower
  than the answer comes (``pause_writing``);
* ``HttpServer.stop`` stops listening, closes idle connections, lets requests in flight finish
  for ``grace_s`` and then cancels them (aiohttp's ``shutdown_timeout``).
"""

from __future__ import annotations

import asyncio
import collections
import http
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

import httptools
import msgspec

logger = logging.getLogger(__name__)

KEEPALIVE_S = 75.0  # aiohttp's keepalive_timeout
_MAX_HEAD_BYTES = 1 << 16
_MAX_QUEUED = 8  # pipelined requests waiting on one connection before reading pauses


class BodyTooLarge(Exception):
    """The request's body is longer than the server's ``max_body_bytes``."""

    def __init__(self, max_body_bytes: int) -> None:
        super().__init__(f"request body exceeds {max_body_bytes} bytes")
        self.max_body_bytes = max_body_bytes


class Headers(dict):
    """A request's headers: names in lower case, looked up in any case; repeated ones joined by ", "."""

    def get(self, name: str, default: Any = None) -> Any:
        return super().get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())


class Request:
    """One parsed request, its body already read (or dropped, when too large)."""

    __slots__ = ("method", "path", "query_string", "headers", "match_info", "keep_alive", "connection", "_body",
                 "_max_body_bytes", "_query")

    def __init__(self, method: str, path: str, query_string: str, headers: Headers, body: bytes | None,
                 max_body_bytes: int, keep_alive: bool, connection: _Connection) -> None:
        self.method = method
        self.path = path
        self.query_string = query_string
        self.headers = headers
        self.match_info: dict[str, str] = {}
        self.keep_alive = keep_alive  # the connection stays open after the answer
        self.connection = connection  # where a StreamResponse writes
        self._body = body  # None: too large
        self._max_body_bytes = max_body_bytes
        self._query: dict[str, str] | None = None

    @property
    def query(self) -> dict[str, str]:
        """The query string's parameters (the last value of a repeated one)."""
        if self._query is None:
            self._query = dict(parse_qsl(self.query_string, keep_blank_values=True))
        return self._query

    async def read(self) -> bytes:
        """The body; raises ``BodyTooLarge``. A coroutine, as aiohttp's, so handlers read it alike."""
        if self._body is None:
            raise BodyTooLarge(self._max_body_bytes)
        return self._body


class Response:
    """A whole answer: status, headers and body, sent in one write."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, body: bytes = b"", status: int = 200, content_type: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        self.status = status
        self.headers = dict(headers or {})
        if content_type is not None:
            self.headers["Content-Type"] = content_type
        self.body = body


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(data), status, "application/json", headers)


def text_response(status: int, text: str, headers: Mapping[str, str] | None = None) -> Response:
    return Response(text.encode(), status, "text/plain; charset=utf-8", headers)


class StreamResponse:
    """An answer sent in pieces (chunked). Its head leaves with the first piece, in one write.

    ``write`` and ``write_eof`` raise ``ConnectionResetError`` once the client has gone."""

    def __init__(self, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        self.status = status
        self.headers = dict(headers or {})
        self._connection: _Connection | None = None
        self._head = b""
        self.finished = False  # write_eof has sent the last chunk

    async def prepare(self, request: Request) -> None:
        self._connection = request.connection
        self._head = request.connection.head(self.status, self.headers, None, request.keep_alive)
        request.connection.streaming = True

    async def write(self, data: bytes) -> None:
        if data:  # an empty chunk would end the body
            await self._send(b"%x\r\n%b\r\n" % (len(data), data))

    async def write_eof(self, data: bytes = b"") -> None:
        await self._send((b"%x\r\n%b\r\n" % (len(data), data) if data else b"") + b"0\r\n\r\n")
        self.finished = True

    async def _send(self, data: bytes) -> None:
        assert self._connection is not None, "prepare() first"
        head, self._head = self._head, b""
        await self._connection.send(head + data)


Handler = Callable[[Request], Awaitable["Response | StreamResponse"]]


class Routes:
    """What answers each (method, path): exact paths, and prefixes whose rest is one parameter."""

    def __init__(self) -> None:
        self._exact: dict[str, dict[str, Handler]] = {}
        self._prefixes: list[tuple[str, str, dict[str, Handler]]] = []

    def add(self, method: str, path: str, handler: Handler) -> None:
        """``method`` "*" answers any; ``path`` ending in ``{name}`` is a prefix route."""
        if path.endswith("}"):
            prefix, _, name = path[:-1].rpartition("{")
            table = next((t for p, n, t in self._prefixes if p == prefix and n == name), None)
            if table is None:
                table = {}
                self._prefixes.append((prefix, name, table))
        else:
            table = self._exact.setdefault(path, {})
        table[method] = handler

    def resolve(self, request: Request) -> Handler | Response:
        """The handler for ``request`` (its ``match_info`` filled in), or the 404/405 answer."""
        table = self._exact.get(request.path)
        if table is None:
            for prefix, name, candidate in self._prefixes:
                rest = request.path[len(prefix):]
                if request.path.startswith(prefix) and rest and "/" not in rest:
                    request.match_info[name] = rest
                    table = candidate
                    break
        if table is None:
            return text_response(404, "404: Not Found")
        method = "GET" if request.method == "HEAD" and "GET" in table else request.method
        handler = table.get(method) or table.get("*")
        if handler is None:
            allowed = sorted(set(table) | ({"HEAD"} if "GET" in table else set()))
            return text_response(405, "405: Method Not Allowed", {"Allow": ", ".join(allowed)})
        return handler


class HttpServer:
    """Serves ``routes`` on one listening socket."""

    def __init__(self, routes: Routes, max_body_bytes: int) -> None:
        self.routes = routes
        self.max_body_bytes = max_body_bytes
        self.connections: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port); returns the bound port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port, reuse_address=True)
        return self._server.sockets[0].getsockname()[1]

    async def stop(self, grace_s: float = 60.0) -> None:
        """Stop listening; close idle connections now and busy ones once their request is answered,
        cancelling the handlers still running after ``grace_s``."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.shut()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.abort()
        if self._server is not None:
            await self._server.wait_closed()


class _Connection(asyncio.Protocol):
    """One client connection: its parser, the requests waiting, and the task answering them."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport
        self.parser = httptools.HttpRequestParser(self)
        self.queue: collections.deque[Request] = collections.deque()
        self.task: asyncio.Task[None] | None = None
        self.streaming = False  # the answer in progress is a StreamResponse
        self.closed = False
        self._shutting = False
        self._write_ready: asyncio.Future[None] | None = None  # set while the transport is paused
        self._idle_timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self._in_message = False  # between a request's first byte and its end
        self._begin_message()

    def _begin_message(self) -> None:
        self._url = b""
        self._headers = Headers()
        self._body: list[bytes] | None = []
        self._num_body_bytes = 0
        self._num_head_bytes = 0  # of the URL and headers parsed
        self._num_received_head_bytes = 0
        self._head_done = False

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "400: connection upgrades are not supported")
            return
        except httptools.HttpParserError as exc:
            if self._num_head_bytes > _MAX_HEAD_BYTES:
                self._refuse(431, f"431: request head longer than {_MAX_HEAD_BYTES} bytes")
            else:
                self._refuse(400, f"400: malformed HTTP request ({exc})")
            return
        if not self._head_done:  # a head still arriving: counted as bytes, before the parser holds it all
            self._num_received_head_bytes += len(data)
            if self._num_received_head_bytes > _MAX_HEAD_BYTES:
                self._refuse(431, f"431: request head longer than {_MAX_HEAD_BYTES} bytes")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self._cancel_idle_timer()
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the client left: stop its request's work (handler_cancellation)
        self.resume_writing()  # a writer waiting for the socket wakes up to find it closed

    def pause_writing(self) -> None:
        if self._write_ready is None or self._write_ready.done():
            self._write_ready = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_result(None)

    # ------------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        self._cancel_idle_timer()
        self._in_message = True
        self._begin_message()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers = self._headers
        dict.__setitem__(headers, key, f"{dict.__getitem__(headers, key)}, {text}" if dict.__contains__(headers, key)
                         else text)

    def _count_head(self, num_bytes: int) -> None:
        """Stop parsing a head over the limit, even one that arrived whole in one read."""
        self._num_head_bytes += num_bytes
        if self._num_head_bytes > _MAX_HEAD_BYTES:
            raise ValueError("request head too long")  # feed_data raises it as an HttpParserError

    def on_headers_complete(self) -> None:
        self._head_done = True
        if self.parser.should_upgrade():  # never queued: feed_data raises HttpParserUpgrade next
            return
        if self._headers.get("expect", "").lower() == "100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._num_body_bytes += len(body)
        if self._body is not None:
            if self._num_body_bytes > self.server.max_body_bytes:
                self._body = None  # dropped from here on; the handler hears of it from read()
            else:
                self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        if self.parser.should_upgrade():
            return
        parsed = httptools.parse_url(self._url)
        request = Request(self.parser.get_method().decode("ascii"), parsed.path.decode("utf-8", "surrogateescape"),
                          (parsed.query or b"").decode("utf-8", "surrogateescape"), self._headers,
                          None if self._body is None else b"".join(self._body), self.server.max_body_bytes,
                          self.parser.should_keep_alive() and self._body is not None and not self._shutting, self)
        self.queue.append(request)
        if len(self.queue) > _MAX_QUEUED and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        if self.task is None:
            self.task = asyncio.ensure_future(self._serve())

    # ------------------------------------------------------------------ answering

    async def _serve(self) -> None:
        """Answer the queued requests in order; then wait for the next (idle timer) or close."""
        try:
            while self.queue and not self.closed:
                request = self.queue.popleft()
                if self._reading_paused and len(self.queue) <= _MAX_QUEUED:
                    self._reading_paused = False
                    self.transport.resume_reading()
                if not await self._answer(request) or not request.keep_alive or self._shutting:
                    self.transport.close()
                    return
        finally:
            self.task = None
        if not self.closed and not self._in_message:
            self._arm_idle_timer()

    async def _answer(self, request: Request) -> bool:
        """Answer one request; False when the connection cannot carry another answer."""
        self.streaming = False
        response = await self._handle(request)
        if isinstance(response, StreamResponse):
            return response.finished  # else it broke off (client gone) or never ended its body
        if self.streaming:  # a handler that streamed and then answered whole: nothing more can be sent
            return False
        if not self.writable:  # the client left while the handler finished
            return False
        self._write_whole(response, request.keep_alive, with_body=request.method != "HEAD")
        return True

    def _write_whole(self, response: Response, keep_alive: bool, with_body: bool = True) -> None:
        """A whole answer in one write; a HEAD's keeps its Content-Length but not its body."""
        head = self.head(response.status, response.headers, len(response.body), keep_alive)
        self.transport.write(head + response.body if with_body else head)

    async def _handle(self, request: Request) -> Response | StreamResponse:
        resolved = self.server.routes.resolve(request)
        if isinstance(resolved, Response):
            return resolved
        try:
            return await resolved(request)
        except BodyTooLarge as exc:
            return text_response(413, f"413: {exc}")
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("unhandled error answering %s %s", request.method, request.path)
            return text_response(500, "500: Internal Server Error")

    def head(self, status: int, headers: Mapping[str, str], content_length: int | None, keep_alive: bool) -> bytes:
        """Status line and headers; ``content_length`` None: a chunked body."""
        lines = [f"HTTP/1.1 {status} {_reason(status)}"]
        lines.extend(f"{name}: {value}" for name, value in headers.items())
        lines.append("Transfer-Encoding: chunked" if content_length is None else f"Content-Length: {content_length}")
        if not keep_alive:
            lines.append("Connection: close")
        lines.append("\r\n")
        return "\r\n".join(lines).encode("latin-1")

    async def send(self, data: bytes) -> None:
        """Write a piece of a streamed answer, waiting while the client reads slowly."""
        self._check_writable()
        self.transport.write(data)
        if self._write_ready is not None and not self._write_ready.done():
            await self._write_ready
            self._check_writable()

    @property
    def writable(self) -> bool:
        return not self.closed and not self.transport.is_closing()

    def _check_writable(self) -> None:
        if not self.writable:
            raise ConnectionResetError("the client closed the connection")

    # ------------------------------------------------------------------ ending

    def _refuse(self, status: int, text: str) -> None:
        """Answer a request that cannot be parsed, and close (the stream of bytes is lost)."""
        if self.task is None:
            self._write_whole(text_response(status, text), keep_alive=False)
        self.closed = True
        self.transport.close()

    def shut(self) -> None:
        """Close now if idle; otherwise once the request in flight is answered."""
        self._shutting = True
        if self.task is None:
            self.transport.close()

    def abort(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.transport.close()

    def _arm_idle_timer(self) -> None:
        self._cancel_idle_timer()
        self._idle_timer = asyncio.get_running_loop().call_later(KEEPALIVE_S, self.transport.close)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"
