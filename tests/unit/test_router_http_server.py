"""The router's HTTP/1.1 server on real sockets: raw bytes in, raw bytes out, and aiohttp's client
(what vLLM's `vllm bench serve` and most Python clients use) against it."""

import asyncio
import contextlib

import aiohttp
import pytest
from test_router_http import run_async

from vllm_hetero_pd.router import http_server
from vllm_hetero_pd.router.http_server import HttpServer, Request, Response, Routes, StreamResponse, json_response


async def echo(request: Request) -> Response:
    body = await request.read()
    return json_response({"method": request.method, "path": request.path, "query": request.query,
                          "match": request.match_info, "body": body.decode(), "id": request.headers.get("x-ID")})


async def slow(request: Request) -> Response:
    await asyncio.sleep(float(request.query["s"]))
    return Response(request.query["s"].encode())


async def broken(request: Request) -> Response:
    raise RuntimeError("a bug")


def make_routes(**extra) -> Routes:
    routes = Routes()
    routes.add("POST", "/echo", echo)
    routes.add("GET", "/echo", echo)
    routes.add("GET", "/slow", slow)
    routes.add("GET", "/broken", broken)
    routes.add("*", "/admin/{action}", echo)
    for path, handler in extra.items():
        routes.add("GET", "/" + path, handler)
    return routes


@contextlib.asynccontextmanager
async def serving(routes: Routes | None = None, max_body_bytes: int = 1024):
    server = HttpServer(routes or make_routes(), max_body_bytes)
    port = await server.start("127.0.0.1", 0)
    try:
        yield server, port
    finally:
        await server.stop(grace_s=1.0)


async def exchange(port: int, raw: bytes, timeout_s: float = 5.0) -> bytes:
    """Send ``raw`` and read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    try:
        return await asyncio.wait_for(reader.read(-1), timeout_s)
    finally:
        writer.close()


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


@run_async
async def test_routes_exact_and_prefix_paths_and_answers_404_405_and_head():
    async with serving() as (_, port), aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{port}"
        async with session.post(base + "/echo?a=1&b=two", data=b"hello", headers={"X-Id": "r1"}) as response:
            assert response.status == 200 and response.content_type == "application/json"
            assert await response.json() == {"method": "POST", "path": "/echo", "query": {"a": "1", "b": "two"},
                                             "match": {}, "body": "hello", "id": "r1"}
        async with session.put(base + "/admin/drain", data=b"x") as response:
            assert (await response.json())["match"] == {"action": "drain"}
        for path in ("/nope", "/admin/", "/admin/a/b"):
            async with session.get(base + path) as response:
                assert response.status == 404, path
        async with session.delete(base + "/echo") as response:
            assert response.status == 405 and response.headers["Allow"] == "GET, HEAD, POST"
        async with session.head(base + "/echo") as response:
            assert response.status == 200 and int(response.headers["Content-Length"]) > 0
            assert await response.read() == b""


@run_async
async def test_keep_alive_answers_pipelined_requests_in_order_and_close_ends_the_connection():
    async with serving() as (_, port):
        raw = await exchange(port, get("/slow?s=0.2") + get("/slow?s=0.01") + get("/slow?s=0", "Connection: close\r\n"))
        answers = raw.split(b"HTTP/1.1 200 OK")[1:]
        assert [a.rpartition(b"\r\n\r\n")[2] for a in answers] == [b"0.2", b"0.01", b"0"]  # in order, not by speed
        assert b"Connection: close" in answers[2]
        raw = await exchange(port, b"GET /slow?s=0 HTTP/1.0\r\n\r\n")  # HTTP/1.0: no keep-alive unless asked
        assert raw.startswith(b"HTTP/1.1 200 OK") and raw.endswith(b"\r\n\r\n0")


@pytest.mark.parametrize("raw,status", [
    (b"NOT HTTP AT ALL\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", b"431"),
    (b"POST /echo HTTP/1.1\r\nContent-Length: nope\r\n\r\n", b"400"),
])
@run_async
async def test_a_malformed_request_gets_a_4xx_and_the_connection_closes(raw, status):
    async with serving() as (_, port):
        answer = await exchange(port, raw)
        assert answer.startswith(b"HTTP/1.1 " + status) and b"Connection: close" in answer, answer[:200]


@run_async
async def test_a_body_over_the_limit_is_dropped_the_handler_told_and_the_connection_closed():
    async with serving(max_body_bytes=16) as (_, port):
        answer = await exchange(port, b"POST /echo HTTP/1.1\r\nContent-Length: 40\r\n\r\n" + b"x" * 40)
        assert answer.startswith(b"HTTP/1.1 413") and b"request body exceeds 16 bytes" in answer
        chunked = b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" \
                  b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        assert b'"body":"hello world"' in await exchange(port, chunked)


@run_async
async def test_expect_100_continue_is_answered_before_the_body_is_sent():
    async with serving() as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /echo HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"ok")
        assert b'"body":"ok"' in await asyncio.wait_for(reader.read(-1), 5)
        writer.close()


@run_async
async def test_a_handler_error_is_a_500_and_the_connection_stays_usable():
    async with serving() as (_, port):
        raw = await exchange(port, get("/broken") + get("/slow?s=0", "Connection: close\r\n"))
        assert raw.startswith(b"HTTP/1.1 500") and raw.endswith(b"\r\n\r\n0")


@run_async
async def test_a_client_that_disconnects_cancels_its_handler():
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def forever(request: Request) -> Response:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Response(b"never")

    async with serving(make_routes(forever=forever)) as (server, port):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(get("/forever"))
        await asyncio.wait_for(started.wait(), 5)
        writer.close()
        await asyncio.wait_for(cancelled.wait(), 5)
        await asyncio.sleep(0.05)
        assert not server.connections


@run_async
async def test_a_handler_that_ignores_its_cancellation_writes_nothing_to_a_gone_client():
    finished = asyncio.Event()

    async def stubborn(request: Request) -> Response:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass  # a handler may swallow it and still answer
        finished.set()
        return Response(b"late")

    async with serving(make_routes(stubborn=stubborn)) as (server, port):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(get("/stubborn"))
        await asyncio.sleep(0.1)
        writer.close()
        await asyncio.wait_for(finished.wait(), 5)
        await asyncio.sleep(0.05)
        assert not server.connections
        assert (await exchange(port, get("/slow?s=0", "Connection: close\r\n"))).endswith(b"\r\n\r\n0")


@run_async
async def test_repeated_headers_are_joined_and_found_in_any_case():
    async with serving() as (_, port):
        raw = await exchange(port, b"GET /echo HTTP/1.1\r\nX-Id: a\r\nx-id: b\r\nConnection: close\r\n\r\n")
        assert b'"id":"a, b"' in raw


@run_async
async def test_a_streamed_answer_is_chunked_and_a_write_after_the_client_left_raises():
    gone = asyncio.Event()
    outcome: list[str] = []

    async def stream(request: Request) -> StreamResponse:
        response = StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        count = int(request.query.get("n", "3"))
        for i in range(count):
            await response.write(f"data: {i}\n\n".encode())
            await response.write(b"")  # nothing: must not end the body
            if i == 0 and count > 3:
                await gone.wait()
        try:
            await response.write_eof(b"data: [DONE]\n\n")
            outcome.append("finished")
        except ConnectionResetError:
            outcome.append("reset")
        return response

    async with serving(make_routes(stream=stream)) as (_, port), aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/stream") as response:
            assert response.headers["Transfer-Encoding"] == "chunked"
            assert await response.read() == b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(get("/stream?n=5"))
        await reader.readuntil(b"data: 0\n\n")
        writer.close()
        await asyncio.sleep(0.1)
        gone.set()
        await asyncio.sleep(0.1)
    assert outcome[0] == "finished" and outcome[1:] in ([], ["reset"])  # the handler may also just be cancelled


@run_async
async def test_a_slow_reader_holds_back_the_writer_instead_of_buffering_everything():
    progress: list[int] = []

    async def big(request: Request) -> StreamResponse:
        response = StreamResponse()
        await response.prepare(request)
        for i in range(64):
            await response.write(b"x" * (1 << 20))
            progress.append(i)
        await response.write_eof()
        return response

    async with serving(make_routes(big=big)) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 16)
        writer.write(get("/big", "Connection: close\r\n"))
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.5)  # not reading: the socket buffers fill and the writer must wait
        assert len(progress) < 32
        total = 0
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 10):
            total += len(chunk)
        assert len(progress) == 64 and total > 64 << 20
        writer.close()


@run_async
async def test_a_writer_held_back_by_a_slow_reader_ends_when_the_client_leaves():
    ended = asyncio.Event()

    async def big(request: Request) -> StreamResponse:
        response = StreamResponse()
        await response.prepare(request)
        try:
            while True:
                await response.write(b"x" * (1 << 20))
        finally:
            ended.set()  # cancelled with its request, or told by ConnectionResetError

    async with serving(make_routes(big=big)) as (server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 16)
        writer.write(get("/big"))
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.3)  # the writer now waits for the socket
        assert not ended.is_set()
        writer.transport.abort()
        await asyncio.wait_for(ended.wait(), 5)
        await asyncio.sleep(0.05)
        assert not server.connections


@run_async
async def test_an_idle_connection_is_closed_after_the_keepalive_timeout(monkeypatch):
    monkeypatch.setattr(http_server, "KEEPALIVE_S", 0.1)
    async with serving() as (server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(get("/slow?s=0"))
        await reader.readuntil(b"\r\n\r\n0")
        assert await asyncio.wait_for(reader.read(-1), 5) == b""  # closed by the server
        writer.close()
        assert not server.connections


@run_async
async def test_stop_lets_a_request_in_flight_finish_within_the_grace_and_cancels_one_beyond_it():
    server = HttpServer(make_routes(), 1024)
    port = await server.start("127.0.0.1", 0)
    quick = asyncio.ensure_future(exchange(port, get("/slow?s=0.2")))
    late = asyncio.ensure_future(exchange(port, get("/slow?s=30")))
    await asyncio.sleep(0.1)
    await server.stop(grace_s=1.0)
    assert (await quick).startswith(b"HTTP/1.1 200") and (await quick).endswith(b"\r\n\r\n0.2")
    assert await late == b""  # cancelled at the end of the grace: closed without an answer
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
