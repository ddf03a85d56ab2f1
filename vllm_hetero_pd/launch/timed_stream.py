"""Greedy completions streamed open-loop on a schedule, timed on the client and kept for comparison.

Every request is ``testing.compare.greedy_body`` (greedy, ``ignore_eos``, token ids and top-5
logprobs) with ``stream: true``, so one answer gives both the latencies a client sees and the
ids and logprobs a monolithic engine's answer is compared with. Requests are sent at their
scheduled offsets whatever earlier ones are doing (an open loop: a slow deployment builds a
queue as it would in production), with no client-side limit on open connections.

TTFT is the time to the first chunk that carries tokens; TPOT is the time from that chunk to the
last one over the tokens that came after the first chunk, counted in tokens rather than chunks:
an overloaded server coalesces tokens into fewer chunks, and chunk gaps would then understate it.
A request is *lost* when it answers anything but 200, carries an error event, ends without
``[DONE]`` or returns fewer tokens (or logprobs) than ``max_tokens``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import aiohttp
import msgspec

from vllm_hetero_pd.launch.phased_workload import ScheduledRequest
from vllm_hetero_pd.testing.compare import Completion, greedy_body

TIMEOUT = aiohttp.ClientTimeout(total=900)


class StreamResult(msgspec.Struct, frozen=True, kw_only=True):
    """What one streamed request did: wall-clock start and end, latencies, and its answer (None if lost)."""

    index: int
    start_s: float  # time.time() when it was sent: comparable with the router's log timestamps
    end_s: float
    status: int  # HTTP status, 0 when no answer came
    ttft_s: float | None = None
    tpot_s: float | None = None  # None when every token came in the first chunk
    completion: Completion | None = None
    error: str = ""

    @property
    def lost(self) -> bool:
        return self.completion is None


def fold(index: int, max_tokens: int, status: int, start_s: float, lines: Sequence[tuple[float, bytes]]
         ) -> StreamResult:
    """One result from the ``(seconds after start, line)`` pairs a stream delivered; pure."""
    end_s = start_s + (lines[-1][0] if lines else 0.0)
    if status != 200:
        body = b"".join(line for _, line in lines)[:300]
        return StreamResult(index=index, start_s=start_s, end_s=end_s, status=status, error=f"HTTP {status}: {body!r}")
    ids: list[int] = []
    top: list[dict[str, float]] = []
    token_times: list[tuple[float, int]] = []  # (arrival, tokens in the chunk)
    done = False
    for at, line in lines:
        line = line.strip()
        if line == b"data: [DONE]":
            done = True
        elif line.startswith(b"data: "):
            chunk = msgspec.json.decode(line[6:])
            if "error" in chunk:
                return StreamResult(index=index, start_s=start_s, end_s=end_s, status=status,
                                    error=f"error event: {chunk['error']}")
            for choice in chunk.get("choices") or ():
                new = choice.get("token_ids") or []
                ids += new
                top += [dict(t) for t in (choice.get("logprobs") or {}).get("top_logprobs") or ()]
                if new:
                    token_times.append((at, len(new)))
    if not done or len(ids) != max_tokens or len(top) != len(ids):
        return StreamResult(index=index, start_s=start_s, end_s=end_s, status=status,
                            error=f"truncated: {len(ids)} of {max_tokens} tokens, {len(top)} logprobs, "
                                  f"[DONE] {'seen' if done else 'missing'}")
    (first_s, first_n), last_s = token_times[0], token_times[-1][0]
    tpot = (last_s - first_s) / (len(ids) - first_n) if len(ids) > first_n else None
    return StreamResult(index=index, start_s=start_s, end_s=end_s, status=status, ttft_s=first_s, tpot_s=tpot,
                        completion=Completion(token_ids=ids, top_logprobs=top))


async def stream_one(session: aiohttp.ClientSession, url: str, request: ScheduledRequest, request_id: str
                     ) -> StreamResult:
    """Send one request now and time every line of its stream; a failed connection is a lost request."""
    body = {**greedy_body(request.prompt, request.max_tokens), "stream": True}
    start_wall, start = time.time(), time.perf_counter()
    lines: list[tuple[float, bytes]] = []
    status = 0
    try:
        async with session.post(url + "/v1/completions", json=body, headers={"X-Request-Id": request_id}) as resp:
            status = resp.status
            async for line in resp.content:
                lines.append((time.perf_counter() - start, line))
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return StreamResult(index=request.index, start_s=start_wall, end_s=time.time(), status=status,
                            error=f"connection: {exc!r}")
    return fold(request.index, request.max_tokens, status, start_wall, lines)


async def run_schedule(url: str, requests: Sequence[ScheduledRequest], tag: str) -> list[StreamResult]:
    """Send every request at its ``at_s`` from now (request ids ``<tag>-<index>``); results in schedule order."""
    connector = aiohttp.TCPConnector(limit=0)  # an open loop: no request may wait for a free connection
    async with aiohttp.ClientSession(timeout=TIMEOUT, connector=connector) as session:
        start = time.perf_counter()

        async def one(request: ScheduledRequest) -> StreamResult:
            await asyncio.sleep(max(0.0, request.at_s - (time.perf_counter() - start)))
            return await stream_one(session, url, request, f"{tag}-{request.index}")

        return list(await asyncio.gather(*(one(r) for r in requests)))
