"""The router's HTTP/1.1 client to its instances: keep-alive connections, parsed with httptools.

Why our own: aiohttp's client was about half of the router's CPU per request (docs/router.md,
Benchmark). This one does only what the router needs, on llhttp (``httptools``, uvicorn's parser):

* one pool of connections per instance base URL; an idle connection is reused most recently used
  first, and only after its answer was read to the end and the server allowed keep-alive; one idle
  longer than ``IDLE_KEEPALIVE_S`` is closed instead, before the server closes it under us;
* ``UpstreamClient.request`` sends the head and body in one write and returns a ``Response`` once
  the status and headers have arrived; the body (Content-Length, chunked, or up to the end of the
  connection) is read whole with ``Response.read`` or piece by piece with ``Response.read_chunk``;
* ``Timeouts`` works like aiohttp's ``ClientTimeout(total, connect, sock_read)``: ``total_s`` from
  the start of the request to the end of its body, ``connect_s`` to open a connection, ``idle_s``
  for each body read;
* errors: ``UpstreamUnreachable`` (no connection: the instance never saw the request),
  ``UpstreamTimeout``, and ``UpstreamError`` for the rest (closed mid-answer, malformed answer).
  A connection whose answer failed, timed out or was abandoned is closed, never pooled, so the
  instance sees the cut (vLLM aborts the request) and no later request reads a stale answer.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from urllib.parse import urlsplit

import httptools
import msgspec

IDLE_KEEPALIVE_S = 4.0  # below uvicorn's (vLLM's) 5 s keep-alive, so a reused connection is still open there
_MAX_HEAD_BYTES = 1 << 16  # status line and headers of an answer
_PAUSE_BYTES = 1 << 17  # unread body buffered before the socket is no longer read (a slow client)


class UpstreamError(Exception):
    """A call to an instance failed in transport: closed connection, malformed answer, timeout."""


class UpstreamUnreachable(UpstreamError):
    """No connection could be opened (refused, no route, TLS): the instance never saw the request."""

    def __init__(self, url: str, os_error: OSError) -> None:
        super().__init__(f"cannot connect to {url}: {os_error!r}")
        self.os_error = os_error


class UpstreamTimeout(UpstreamError):
    """A deadline of ``Timeouts`` passed."""


class Timeouts(msgspec.Struct, frozen=True, kw_only=True):
    """Deadlines of one call, in seconds (``idle_s`` None: only ``total_s`` bounds body reads)."""

    total_s: float
    connect_s: float
    idle_s: float | None = None


class Response:
    """An answer whose status and headers have arrived; its body is still on the connection.

    Its owner reads the body to the end (``read``, or ``read_chunk`` until it returns b"") or
    calls ``release``/``close``; only a fully read answer gives its connection back to the pool. A
    read that fails or is cancelled closes the connection itself."""

    __slots__ = ("status", "headers", "_connection", "_deadline", "_idle_s")

    def __init__(self, connection: _Connection, deadline: float, idle_s: float | None) -> None:
        self.status = connection.status
        self.headers = connection.headers  # names in lower case
        self._connection: _Connection | None = connection
        self._deadline = deadline
        self._idle_s = idle_s

    @property
    def content_type(self) -> str:
        """The media type without parameters, as aiohttp's ``content_type`` gives it."""
        value = self.headers.get("content-type", "").partition(";")[0].strip().lower()
        return value or "application/octet-stream"

    async def read(self) -> bytes:
        """The rest of the body, whole; the connection then goes back to the pool."""
        connection = self._connection
        if connection is None:
            return b""
        pieces = []
        try:
            while not connection.complete:
                pieces.append(connection.take())  # resumes a paused socket: a body larger than the buffer
                await connection.wait(self._read_deadline())
        except BaseException:
            self.close()
            raise
        pieces.append(connection.take())
        self.release()
        return b"".join(pieces)

    async def read_chunk(self, *, idle_bound: bool = True) -> bytes:
        """The body that arrived since the last call (waiting for some), or b"" once it has ended.

        ``idle_bound=False`` waits up to the call's whole deadline instead of ``idle_s``: the caller
        bounds that wait itself (a stream's first event may take as long as a prefill's KV load)."""
        connection = self._connection
        if connection is None:
            return b""
        try:
            while not connection.num_buffered_bytes and not connection.complete:
                await connection.wait(self._read_deadline() if idle_bound else self._deadline)
        except BaseException:
            self.close()
            raise
        body = connection.take()
        if not body:
            self.release()
        return body

    def release(self) -> None:
        """Give the connection back if the answer was read to the end, else close it. Idempotent."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.pool.put(connection)

    def close(self) -> None:
        """Close the connection whatever was read (the instance sees the cut). Idempotent."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def _read_deadline(self) -> float:
        if self._idle_s is None:
            return self._deadline
        return min(self._deadline, asyncio.get_running_loop().time() + self._idle_s)


class UpstreamClient:
    """Connection pools to every instance the router calls; ``close()`` when the router stops."""

    def __init__(self) -> None:
        self._pools: dict[str, _Pool] = {}

    async def request(self, method: str, base_url: str, path: str, timeouts: Timeouts,
                      headers: Mapping[str, str] | None = None, body: bytes = b"") -> Response:
        """Send one request to ``base_url`` (``http[s]://host:port``) and wait for the answer's head.

        Raises ``UpstreamUnreachable``, ``UpstreamTimeout`` or ``UpstreamError``; on any of them,
        or when the caller is cancelled, the connection is closed."""
        pool = self._pools.get(base_url)
        if pool is None:
            pool = self._pools[base_url] = _Pool(base_url)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeouts.total_s
        connection = pool.take_idle(loop.time())
        if connection is None:
            connection = await pool.connect(min(deadline, loop.time() + timeouts.connect_s))
        try:
            connection.send(_request_head(method, path, pool.host_header, headers, len(body)) + body)
            while not connection.headers_complete:
                await connection.wait(deadline)
        except BaseException:
            connection.close()
            raise
        return Response(connection, deadline, timeouts.idle_s)

    def close(self) -> None:
        """Close every connection, idle or in use."""
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


def _request_head(method: str, path: str, host: str, headers: Mapping[str, str] | None, num_body_bytes: int) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    for name, value in (headers or {}).items():
        if "\r" in value or "\n" in value:  # would let a value inject headers or a second request
            raise ValueError(f"header {name} contains a line break")
        lines.append(f"{name}: {value}")
    lines.append(f"Content-Length: {num_body_bytes}\r\n\r\n")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape")


class _Pool:
    """The connections to one instance: the idle ones (most recent last) and all open ones."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.url = base_url
        self.host = parts.hostname or ""
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.port = parts.port or (443 if self.ssl else 80)
        self.host_header = parts.netloc
        self.idle: list[tuple[_Connection, float]] = []
        self.open: set[_Connection] = set()

    def take_idle(self, now: float) -> _Connection | None:
        """The most recently used idle connection still open; expired ones (all older) are closed."""
        while self.idle:
            connection, since = self.idle.pop()
            if now - since > IDLE_KEEPALIVE_S:
                for older, _ in self.idle:
                    older.close()
                self.idle.clear()
                connection.close()
                return None
            if connection.reusable:
                return connection
        return None

    async def connect(self, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self), self.host, self.port, ssl=self.ssl),
                max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:  # before OSError: on Python >= 3.11 it is one
            raise UpstreamTimeout(f"{self.url} accepted no connection in time") from None
        except OSError as exc:
            raise UpstreamUnreachable(self.url, exc) from None
        return connection

    def put(self, connection: _Connection) -> None:
        """Pool a connection whose answer was read to the end; close any other."""
        if connection.keep_alive and connection.reusable:
            connection.reset()
            self.idle.append((connection, asyncio.get_running_loop().time()))
        else:
            connection.close()

    def close(self) -> None:
        for connection in list(self.open):
            connection.close()
        self.idle.clear()


class _Connection(asyncio.Protocol):
    """One socket and its response parser; it carries one exchange at a time.

    The parser's callbacks fill in the answer and wake the one task waiting in ``wait``."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport  # set by connection_made, before create_connection returns
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._error: UpstreamError | None = None
        self._closed = False
        self._paused = False
        self.reset()

    def reset(self) -> None:
        """Forget the last answer (before the next request)."""
        self._expecting = False
        self._num_head_bytes = 0
        self._until_eof = False
        self.keep_alive = False  # the answer has ended and the server keeps the connection open
        self._chunks: list[bytes] = []
        self.num_buffered_bytes = 0
        self.status = 0
        self.headers: dict[str, str] = {}
        self.headers_complete = False
        self.complete = False

    @property
    def reusable(self) -> bool:
        """Open and unbroken; whether the last answer allows keep-alive is ``keep_alive``."""
        return not self._closed and self._error is None and not self.transport.is_closing()

    def send(self, data: bytes) -> None:
        """Write a request; a connection already closed (the instance went away between connect or
        pooling and now) is an ``UpstreamError``, so the caller treats it as a failed instance."""
        if self._error is not None:
            raise self._error
        if self._closed or self.transport.is_closing():
            raise UpstreamError(f"{self.pool.url} closed the connection before the request was sent")
        self._expecting = True
        self.transport.write(data)

    async def wait(self, deadline: float) -> None:
        """Until the answer moves on (head, body, end) or fails; ``UpstreamTimeout`` at ``deadline``.

        One waiter at a time: the task that owns the exchange."""
        if self._error is not None:
            raise self._error
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_at(deadline, _time_out, waiter, self.pool.url)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        if self._error is not None:
            raise self._error

    def take(self) -> bytes:
        """The buffered body, emptied; reading resumes if it was paused for it."""
        body = b"".join(self._chunks)
        self._chunks.clear()
        self.num_buffered_bytes = 0
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        return body

    def close(self) -> None:
        self.transport.close()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, message: str) -> None:
        """End the exchange with an error and close the connection."""
        if self._error is None:
            self._error = UpstreamError(f"{self.pool.url} {message}")
        self.close()
        self._wake()

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.pool.open.add(self)

    def data_received(self, data: bytes) -> None:
        if not self._expecting:
            self._fail(f"sent {len(data)} bytes nobody asked for: {data[:100]!r}")
            return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            cause = exc.__context__ or exc  # a callback's own error, or llhttp's
            self._fail(f"sent a malformed answer ({cause!r}): {data[:100]!r}")
            return
        if not self.headers_complete:  # counted after parsing: the bytes that complete a head may carry body too
            self._num_head_bytes += len(data)
            if self._num_head_bytes > _MAX_HEAD_BYTES:
                self._fail(f"sent an answer head longer than {_MAX_HEAD_BYTES} bytes")

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.pool.open.discard(self)
        if not self._expecting or self.complete:
            return
        if self.headers_complete and self._until_eof and exc is None:
            self.complete = True  # a body without length or chunks ends with the connection
            self._wake()
            return
        where = "in the middle of the body" if self.headers_complete else "before answering"
        self._fail(f"closed the connection {where}" + (f" ({exc!r})" if exc else ""))

    # ------------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        if not self._expecting:  # a second answer in the same bytes as the first: feed_data fails
            raise UpstreamError("a second answer to one request")

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self._until_eof = ("content-length" not in self.headers
                           and "chunked" not in self.headers.get("transfer-encoding", "").lower())
        self.headers_complete = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self.num_buffered_bytes += len(body)
        if self.num_buffered_bytes > _PAUSE_BYTES and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.keep_alive = self._parser.should_keep_alive()
        self._expecting = False
        self.complete = True
        self._wake()


def _time_out(waiter: asyncio.Future[None], url: str) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout(f"{url} did not answer in time"))
