"""The router's upstream HTTP client against real local servers: aiohttp's, and raw asyncio servers
that answer with scripted bytes (a cut body, a malformed answer, a server that never accepts)."""

import asyncio
import contextlib
import socket
import time

import pytest
from aiohttp import web
from test_router_http import run_async

from vllm_hetero_pd.router import upstream
from vllm_hetero_pd.router.upstream import Timeouts, UpstreamClient, UpstreamError, UpstreamTimeout, UpstreamUnreachable

TIMEOUTS = Timeouts(total_s=5.0, connect_s=2.0)  # bounds below are loose: the suite runs on loaded hosts


@contextlib.asynccontextmanager
async def aiohttp_server(peers: list[int]):
    """An aiohttp server on a free port; ``peers`` gets the client port of every request, and -1 for
    every streamed answer cut by the client."""

    async def body(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername")[1])
        return web.Response(body=b"x" * int(request.query.get("n", "5")) + await request.read())

    async def chunked(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername")[1])
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for i in range(int(request.query.get("n", "3"))):
                await response.write(f"chunk {i};".encode())
                await asyncio.sleep(float(request.query.get("gap_s", "0.01")))
        except asyncio.CancelledError:  # the client closed the connection (handler_cancellation)
            peers.append(-1)
            raise
        await response.write_eof()
        return response

    async def slow(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername")[1])
        await asyncio.sleep(float(request.query["s"]))
        return web.Response(text="late")

    app = web.Application()
    app.router.add_route("*", "/body", body)
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def served():
    """``aiohttp_server`` and a client for it: yields (url, client, peers)."""
    peers: list[int] = []
    client = UpstreamClient()
    async with aiohttp_server(peers) as url:
        yield url, client, peers
    client.close()


@contextlib.asynccontextmanager
async def raw_server(answer: bytes, close: bool = True):
    """A server that reads one request head and writes ``answer`` verbatim, then closes (or not)."""
    writers = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        if close:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        for writer in writers:
            writer.close()
        server.close()


async def get(client: UpstreamClient, url: str, path: str, timeouts: Timeouts = TIMEOUTS) -> tuple[int, bytes]:
    response = await client.request("GET", url, path, timeouts)
    return response.status, await response.read()


@run_async
async def test_a_connection_is_reused_after_a_fully_read_answer_and_a_body_is_sent():
    async with served() as (url, client, peers):
        assert await get(client, url, "/body?n=3") == (200, b"xxx")
        response = await client.request("POST", url, "/body?n=0", TIMEOUTS, {"X-Request-Id": "r-1"}, b"payload")
        assert (response.status, await response.read()) == (200, b"payload")
        assert response.content_type == "application/octet-stream"
        assert [s for s, _ in [await get(client, url, "/chunked") for _ in range(3)]] == [200] * 3
        assert len(peers) == 5 and len(set(peers)) == 1


@run_async
async def test_a_chunked_body_is_read_whole_or_chunk_by_chunk_as_it_arrives():
    async with served() as (url, client, peers):
        assert await get(client, url, "/chunked?n=4") == (200, b"chunk 0;chunk 1;chunk 2;chunk 3;")
        response = await client.request("GET", url, "/chunked?n=3&gap_s=0.05", TIMEOUTS)
        assert response.headers["transfer-encoding"].lower() == "chunked"
        pieces = []
        while piece := await response.read_chunk():
            pieces.append(piece)
        assert pieces == [b"chunk 0;", b"chunk 1;", b"chunk 2;"]  # each arrived on its own, 50 ms apart
        assert await response.read_chunk() == b""
        assert await get(client, url, "/body") == (200, b"xxxxx")
        assert len(set(peers)) == 1  # the streamed answer was read to the end: its connection was reused


@run_async
async def test_an_abandoned_or_cancelled_read_closes_the_connection_instead_of_pooling_it():
    async with served() as (url, client, peers):
        response = await client.request("GET", url, "/chunked?n=50&gap_s=0.02", TIMEOUTS)
        assert await response.read_chunk() == b"chunk 0;"
        response.release()  # half read: closed, not pooled
        reader = asyncio.create_task(get(client, url, "/chunked?n=50&gap_s=0.02"))
        await asyncio.sleep(0.1)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        assert await get(client, url, "/body") == (200, b"xxxxx")
        assert len(set(peers) - {-1}) == 3 and peers.count(-1) == 2  # the server saw both cuts


@run_async
async def test_a_large_body_is_read_whole_and_chunk_by_chunk_by_a_slow_reader():
    async with served() as (url, client, peers):
        assert await get(client, url, "/body?n=3000000") == (200, b"x" * 3_000_000)
        response = await client.request("GET", url, "/body?n=3000000", TIMEOUTS)
        num_bytes = 0
        while piece := await response.read_chunk():
            num_bytes += len(piece)
            await asyncio.sleep(0.001)  # reading pauses while the buffer is full, and resumes
        assert num_bytes == 3_000_000 and len(set(peers)) == 1


@run_async
async def test_a_refused_connection_is_unreachable():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(UpstreamUnreachable) as caught:
            await get(UpstreamClient(), f"http://127.0.0.1:{port}", "/health")
    assert isinstance(caught.value.os_error, ConnectionRefusedError)


@run_async
async def test_a_server_that_accepts_no_connection_times_out_after_connect_s():
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # accepts nothing: the first connection fills its queue, later SYNs are dropped
        filler.connect(listener.getsockname())
        start = time.perf_counter()
        with pytest.raises(UpstreamTimeout):
            await get(UpstreamClient(), f"http://127.0.0.1:{listener.getsockname()[1]}", "/health",
                      Timeouts(total_s=5.0, connect_s=0.2))
        assert time.perf_counter() - start < 1.5  # connect_s, not total_s


@run_async
async def test_total_and_idle_timeouts_bound_the_head_and_each_body_read():
    async with served() as (url, client, peers):
        start = time.perf_counter()
        with pytest.raises(UpstreamTimeout):
            await get(client, url, "/slow?s=2", Timeouts(total_s=0.2, connect_s=1.0))
        assert time.perf_counter() - start < 1.5
        response = await client.request("GET", url, "/chunked?n=3&gap_s=1", Timeouts(total_s=5, connect_s=1,
                                                                                    idle_s=0.2))
        assert await response.read_chunk() == b"chunk 0;"
        with pytest.raises(UpstreamTimeout):  # silent for longer than idle_s
            await response.read_chunk()
        response.release()
        response = await client.request("GET", url, "/chunked?n=100&gap_s=0.05", Timeouts(total_s=0.3, connect_s=1,
                                                                                          idle_s=0.2))
        start = time.perf_counter()
        with pytest.raises(UpstreamTimeout):  # never idle, but past total_s
            while await response.read_chunk():
                pass
        assert time.perf_counter() - start < 1.5
        response.release()
        assert await get(client, url, "/body") == (200, b"xxxxx")
        assert len(set(peers) - {-1}) == 4  # no timed-out connection was reused


@pytest.mark.parametrize("answer, message", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b", "closed the connection in the middle of the body"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", "in the middle of the body"),
    (b"HTTP/1.1 200 OK\r\nContent-Le", "closed the connection before answering"),
    (b"", "closed the connection before answering"),
])
@run_async
async def test_a_server_closing_mid_answer_is_a_clear_error(answer, message):
    async with raw_server(answer) as url:
        with pytest.raises(UpstreamError, match=message) as caught:
            await get(UpstreamClient(), url, "/")
    assert not isinstance(caught.value, UpstreamTimeout)


@pytest.mark.parametrize("answer", [
    b"hello there\r\n\r\n",
    b"HTTP/1.1 2x0 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n",
    b"HTTP/1.1 200 OK\r\nX-Endless: " + b"a" * 200_000,  # a head that never ends
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n",  # a second answer to one request
])
@run_async
async def test_a_malformed_answer_is_a_clear_error_without_waiting_for_a_timeout(answer):
    async with raw_server(answer, close=False) as url:  # the connection stays open: only parsing can end it
        start = time.perf_counter()
        with pytest.raises(UpstreamError, match="malformed|longer than") as caught:
            await get(UpstreamClient(), url, "/", Timeouts(total_s=5.0, connect_s=1.0))
        assert time.perf_counter() - start < 2.5 and not isinstance(caught.value, UpstreamTimeout)


@run_async
async def test_a_body_without_length_ends_with_the_connection_and_is_not_pooled():
    async with raw_server(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nto the end") as url:
        client = UpstreamClient()
        response = await client.request("GET", url, "/", TIMEOUTS)
        assert await response.read() == b"to the end" and response.content_type == "text/plain"
        assert await get(client, url, "/") == (200, b"to the end")  # a second connection, the first one is gone


@run_async
async def test_a_connection_the_server_closed_while_idle_or_idle_too_long_is_not_reused(monkeypatch):
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with raw_server(answer) as url:  # keep-alive allowed, but the server closes right after answering
        client = UpstreamClient()
        for _ in range(3):
            assert await get(client, url, "/") == (200, b"ok")
            await asyncio.sleep(0.05)
    peers: list[int] = []
    monkeypatch.setattr(upstream, "IDLE_KEEPALIVE_S", 0.05)
    async with aiohttp_server(peers) as url:
        for _ in range(2):
            assert await get(client, url, "/body") == (200, b"xxxxx")
            await asyncio.sleep(0.1)
        assert len(set(peers)) == 2
    client.close()


@run_async
async def test_a_connection_closed_before_the_request_is_sent_is_a_clear_error():
    """The race CI once hit: the instance died between connect and send; uvloop's write on a closed
    transport raised RuntimeError, which the router answered as its own internal error (500)."""
    async with served() as (url, client, peers):
        connection = await upstream._Pool(url).connect(asyncio.get_running_loop().time() + 2.0)
        connection.close()
        with pytest.raises(UpstreamError, match="closed the connection before the request was sent"):
            connection.send(b"GET /body HTTP/1.1\r\nHost: x\r\n\r\n")
    assert peers == []


@run_async
async def test_a_header_value_with_a_line_break_is_refused():
    peers: list[int] = []
    async with aiohttp_server(peers) as url:
        with pytest.raises(ValueError, match="X-Request-Id"):
            await UpstreamClient().request("GET", url, "/body", TIMEOUTS, {"X-Request-Id": "a\r\nX-Evil: 1"})
    assert peers == []

