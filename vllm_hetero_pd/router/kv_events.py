"""Subscribe to one engine's KV cache events (vLLM ``--kv-events-config``, ZMQ publisher) and keep
its ``prefix.PrefixView`` in step.

Wire format (``vllm/distributed/kv_events.py``, 0.32): each message is three frames, ``(topic,
seq, payload)``, with ``seq`` an 8-byte big-endian counter the publisher starts at 0 and
``payload`` a msgpack ``KVEventBatch``: ``[ts, [event, ...], data_parallel_rank]``, each event a
map tagged ``"type": "BlockStored" | "BlockRemoved" | "AllBlocksCleared"``. The structs below
mirror only the fields the router reads and accept new ones, so a newer vLLM that adds fields
still decodes; an event type the router does not know is skipped.

Keeping in step:

* a batch whose ``seq`` is not the next one means batches were lost (ZMQ drops on a slow
  subscriber past its high-water mark). With a replay endpoint (the publisher's
  ``replay_endpoint``, a ROUTER socket) the router asks for the missing range and applies it;
  without one, or when the replay no longer holds it, the index is cleared and rebuilt from the
  events that follow, and ``SentIndex`` answers meanwhile (``PrefixView.lose_sync``);
* a ``seq`` that goes backwards means the publisher restarted (a new engine process): its cache
  is empty, so the whole view is cleared (``PrefixView.reset``); so is ``AllBlocksCleared``;
* a subscriber that joins a running engine has missed what came before: it replays from 0 if it
  can, else starts cleared.

Prefill legs to an instance with events ask for ``kv_cache_report_mode: full`` (``vllm_xargs``),
so the engine re-announces every prefix it reuses with a parent of None: a cleared index
refills from live traffic instead of waiting for blocks to be evicted and stored again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec

from vllm_hetero_pd.router.prefix import PrefixView

logger = logging.getLogger(__name__)

_END_SEQ = -1
_REPLAY_TIMEOUT_S = 2.0
_RECONNECT_S = 1.0

BlockHash = bytes | int


class BlockStored(msgspec.Struct, tag="BlockStored", frozen=True):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


class BlockRemoved(msgspec.Struct, tag="BlockRemoved", frozen=True):
    block_hashes: list[BlockHash]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared", frozen=True):
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared


class EventBatch(msgspec.Struct, array_like=True, frozen=True):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


_BATCH = msgspec.msgpack.Decoder(EventBatch)
_EVENT = msgspec.msgpack.Decoder(Event)


def apply_batch(view: PrefixView, payload: bytes) -> dict[str, int]:
    """Apply one batch to ``view``'s event index; the number of events applied by kind.

    Only events about the main KV cache count: ``group_idx`` 0 (or absent) on the GPU medium (or
    absent). CPU-offload tiers and other KV cache groups are left out. Raises
    ``msgspec.DecodeError`` when the payload is not a batch.
    """
    counts = {"stored": 0, "removed": 0, "cleared": 0, "skipped": 0}
    index = view.events
    for raw in _BATCH.decode(payload).events:
        try:
            event = _EVENT.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            counts["skipped"] += 1
            continue
        if isinstance(event, AllBlocksCleared):
            view.reset("the engine cleared its prefix cache")
            counts["cleared"] += 1
        elif event.group_idx not in (None, 0) or event.medium not in (None, "GPU"):
            counts["skipped"] += 1
        elif isinstance(event, BlockStored):
            index.stored(event.block_hashes, event.parent_block_hash, event.token_ids, event.block_size,
                         event.extra_keys if event.lora_name is None else _lora_keys(event))
            counts["stored"] += 1
        else:
            index.removed(event.block_hashes)
            counts["removed"] += 1
    return counts


def _lora_keys(event: BlockStored) -> list[Any]:
    """A LoRA adapter's blocks: keys no base-model prompt can match."""
    return [("lora", event.lora_name)] * len(event.block_hashes)


class Subscriber:
    """Receives one engine's events until cancelled; ``run()`` never raises for lost events.

    ``on_batch(counts)`` and ``on_gap(outcome)`` report to the router's metrics; ``outcome`` is
    ``replayed``, ``rebuilt`` or ``restarted``.
    """

    def __init__(self, url: str, endpoint: str, replay_endpoint: str | None, view: PrefixView,
                 on_batch: Callable[[dict[str, int]], None] = lambda counts: None,
                 on_gap: Callable[[str], None] = lambda outcome: None,
                 clock: Callable[[], float] = time.monotonic, topic: bytes = b"") -> None:
        self.url = url
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.view = view
        self.on_batch = on_batch
        self.on_gap = on_gap
        self.clock = clock
        self.topic = topic
        self.last_seq: int | None = None
        self.num_batches = 0

    async def run(self) -> None:
        import zmq
        import zmq.asyncio

        context = zmq.asyncio.Context()
        socket = context.socket(zmq.SUB)
        socket.setsockopt(zmq.SUBSCRIBE, self.topic)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVHWM, 100_000)
        socket.connect(self.endpoint)
        self.view.lose_sync("subscriber started")
        try:
            while True:
                frames = await socket.recv_multipart()
                if len(frames) != 3:
                    logger.warning("KV events from %s: a message of %d frames, not 3; dropped", self.url, len(frames))
                    continue
                await self.receive(int.from_bytes(frames[1], "big", signed=True), frames[2])
        finally:
            socket.close(linger=0)
            context.term()

    async def receive(self, seq: int, payload: bytes) -> None:
        """Handle one published batch (also the entry point for tests)."""
        last = self.last_seq
        if last is not None and seq <= last:
            logger.warning("KV events from %s: sequence went back from %d to %d: the engine restarted; "
                           "clearing its prefix view", self.url, last, seq)
            self.view.reset("the engine restarted (event sequence went back)")
            self.on_gap("restarted")
            self.last_seq = last = None
        complete = True
        if (last is None and seq > 0) or (last is not None and seq > last + 1):
            complete = await self._recover(0 if last is None else last + 1, seq)
        if self.view.synced_since is None:
            self.view.start_sync(self.clock(), complete)
        self._apply(seq, payload)

    async def _recover(self, first_missing: int, seq: int) -> bool:
        """Fetch batches ``first_missing .. seq-1`` from the replay endpoint (True), else clear the
        index to rebuild it from the events that follow (False)."""
        replayed = await self._replay(first_missing, seq) if self.replay_endpoint else None
        if replayed is not None:
            for missed_seq, missed in replayed:
                self._apply(missed_seq, missed)
            if first_missing > 0:
                self.on_gap("replayed")
            return True
        if self.last_seq is not None or first_missing > 0:
            logger.warning("KV events from %s: batches %d..%d lost%s; rebuilding its prefix view from new events",
                           self.url, first_missing, seq - 1,
                           "" if self.replay_endpoint else " (set kv_events_replay to recover them)")
            self.on_gap("rebuilt")
        self.view.lose_sync(f"events {first_missing}..{seq - 1} lost")
        return False

    async def _replay(self, first: int, until: int) -> list[tuple[int, bytes]] | None:
        """Batches ``first .. until-1`` from the replay socket, or None when it cannot give all of them."""
        import zmq
        import zmq.asyncio

        context = zmq.asyncio.Context()
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self.replay_endpoint)
        got: list[tuple[int, bytes]] = []
        try:
            await socket.send_multipart([b"", first.to_bytes(8, "big")])
            deadline = self.clock() + _REPLAY_TIMEOUT_S
            while True:
                left = deadline - self.clock()
                if left <= 0 or not await socket.poll(left * 1000):
                    logger.warning("KV events from %s: replay endpoint %s did not answer within %.0f s", self.url,
                                   self.replay_endpoint, _REPLAY_TIMEOUT_S)
                    return None
                frames = await socket.recv_multipart()
                if len(frames) != 4:
                    return None
                seq = int.from_bytes(frames[2], "big", signed=True)
                if seq == _END_SEQ:
                    break
                if first <= seq < until:
                    got.append((seq, frames[3]))
        finally:
            socket.close(linger=0)
            context.term()
        if [s for s, _ in got] != list(range(first, until)):
            return None  # the publisher's buffer no longer holds the whole range
        return got

    def _apply(self, seq: int, payload: bytes) -> None:
        self.last_seq = seq
        self.num_batches += 1
        try:
            counts = apply_batch(self.view, payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            logger.warning("KV events from %s: batch %d does not decode (%s); rebuilding its prefix view", self.url,
                           seq, exc)
            self.view.lose_sync(f"batch {seq} did not decode")
            self.view.start_sync(self.clock(), complete=False)
            return
        self.on_batch(counts)


async def run_forever(subscriber: Subscriber) -> None:
    """``subscriber.run()`` again after any error (a bad endpoint, a closed context), until cancelled."""
    while True:
        try:
            await subscriber.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning("KV events from %s (%s): %r; retrying in %.0f s", subscriber.url, subscriber.endpoint, exc,
                           _RECONNECT_S)
            subscriber.view.lose_sync(f"subscriber failed: {exc!r}")
        await asyncio.sleep(_RECONNECT_S)
