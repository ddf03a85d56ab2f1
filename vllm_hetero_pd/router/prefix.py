"""Which prompt prefixes each instance holds, at block granularity. Data structures only: no
sockets, no clock (callers pass ``now``).

A prompt is cut into full blocks of ``block_size`` tokens, and block ``i`` gets the key
``hash((key of block i-1, tokens of block i[, extra keys]))``: a chain, so equal keys mean equal
prefixes, and a set of keys is a radix tree at block granularity (the longest cached prefix is
the run of leading keys found). The keys are the router's own: they are never compared with the
engine's block hashes.

Two views per instance:

* ``EventIndex``, fed by the engine's KV cache events (``BlockStored``/``BlockRemoved``/
  ``AllBlocksCleared``). Each ``BlockStored`` carries the token ids of its blocks, its block size
  and the engine hash of its parent block, so the router re-keys the blocks with its own chain
  and keeps a map from engine hash to key, to apply ``BlockRemoved`` and to chain the next event.
  This is how it stays in step with the engine without computing the engine's hash: vLLM's
  ``--prefix-caching-hash-algo`` (sha256, sha256_cbor, xxhash ...) and its ``NONE_HASH`` seed
  (random per process for the non-cryptographic ones unless ``PYTHONHASHSEED`` is set) do not
  matter here. What must match is the tokenisation (``tokens.py``) and the extra keys: the
  cache salt, published as block 0's extra key, is part of the key; blocks with any other extra
  key (LoRA names, multimodal features) get keys no prompt the router tokenises can reach.
* ``SentIndex``, what the router itself sent the instance (for engines that publish nothing,
  and while an event stream is being rebuilt): keys with an expiry and a bounded LRU size, an
  approximation of what the engine still caches, as SGLang's ``cache_aware`` tree and Dynamo's
  ``--no-kv-events`` tracker are.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

_ROOT = hash("hetero-pd-prefix-root")


def block_keys(units: Sequence[int], block_size: int, salt: Hashable = None) -> list[int]:
    """The chained key of every full block of ``units`` (token ids, or characters when there is
    no tokenizer); ``salt`` is block 0's extra key (vLLM's ``cache_salt``), None for none."""
    keys = []
    parent = _ROOT
    extra = None if salt is None else (salt,)
    for start in range(0, len(units) - block_size + 1, block_size):
        block = tuple(units[start:start + block_size])
        parent = hash((parent, block) if extra is None else (parent, block, extra))
        extra = None
        keys.append(parent)
    return keys


def cached_tokens(num_matched_blocks: int, block_size: int, num_prompt_tokens: int) -> int:
    """Tokens an engine can reuse: whole matched blocks, but never the last prompt token (vLLM
    always computes at least one token: ``max_cache_hit_length = num_tokens - 1``)."""
    return max(0, min(num_matched_blocks * block_size, num_prompt_tokens - 1))


class EventIndex:
    """One engine's cached blocks as its KV events describe them."""

    __slots__ = ("block_size", "_engine_to_key", "_key_counts", "num_orphans")

    def __init__(self) -> None:
        self.block_size: int | None = None  # learned from the first BlockStored
        self._engine_to_key: dict[Any, int | None] = {}
        self._key_counts: dict[int, int] = {}
        self.num_orphans = 0  # blocks whose parent the index never saw (events missed before it started)

    @property
    def num_blocks(self) -> int:
        return len(self._key_counts)

    def stored(self, block_hashes: Sequence[Any], parent_block_hash: Any, token_ids: Sequence[int], block_size: int,
               extra_keys: Sequence[Any] | None = None) -> None:
        """Apply one ``BlockStored``. Partial blocks (fewer tokens than ``block_size``) are mapped to
        no key, so a later ``BlockRemoved`` of them is a no-op."""
        if parent_block_hash is None:
            parent: int | None = _ROOT
        else:
            parent = self._engine_to_key.get(parent_block_hash)
        if block_size > 0 and self.block_size is None:
            self.block_size = block_size
        for i, engine_hash in enumerate(block_hashes):
            block = tuple(token_ids[i * block_size:(i + 1) * block_size])
            extra = extra_keys[i] if extra_keys and i < len(extra_keys) else None
            if parent is None or len(block) < block_size or block_size != self.block_size:
                if parent is None:
                    self.num_orphans += 1
                self._engine_to_key.setdefault(engine_hash, None)
                parent = None
                continue
            key = _key(parent, block, extra)
            old = self._engine_to_key.get(engine_hash)
            if old != key:
                if old is not None:
                    self._drop(old)
                self._engine_to_key[engine_hash] = key
                self._key_counts[key] = self._key_counts.get(key, 0) + 1
            parent = key

    def removed(self, block_hashes: Sequence[Any]) -> None:
        for engine_hash in block_hashes:
            key = self._engine_to_key.pop(engine_hash, None)
            if key is not None:
                self._drop(key)

    def cleared(self) -> None:
        self._engine_to_key.clear()
        self._key_counts.clear()
        self.num_orphans = 0

    def match(self, keys: Sequence[int]) -> int:
        """Leading blocks of ``keys`` the engine holds."""
        counts = self._key_counts
        for i, key in enumerate(keys):
            if key not in counts:
                return i
        return len(keys)

    def _drop(self, key: int) -> None:
        left = self._key_counts.get(key, 0) - 1
        if left > 0:
            self._key_counts[key] = left
        else:
            self._key_counts.pop(key, None)


class SentIndex:
    """Keys of prompts sent to one instance, each kept ``ttl_s`` after its last use and at most
    ``capacity`` of them (least recently used dropped first)."""

    __slots__ = ("capacity", "ttl_s", "_expiry")

    def __init__(self, capacity: int, ttl_s: float) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._expiry: OrderedDict[int, float] = OrderedDict()

    @property
    def num_blocks(self) -> int:
        return len(self._expiry)

    def add(self, keys: Sequence[int], now: float) -> None:
        expiry = self._expiry
        until = now + self.ttl_s
        for key in keys:
            expiry[key] = until
            expiry.move_to_end(key)
        while len(expiry) > self.capacity:
            expiry.popitem(last=False)

    def match(self, keys: Sequence[int], now: float) -> int:
        expiry = self._expiry
        for i, key in enumerate(keys):
            until = expiry.get(key)
            if until is None or until < now:
                return i
        return len(keys)

    def clear(self) -> None:
        self._expiry.clear()


def _key(parent: int, block: tuple[int, ...], extra: Any) -> int:
    if extra is None:
        return hash((parent, block))
    try:
        return hash((parent, block, _frozen(extra)))
    except TypeError:  # an extra key we cannot hash: a key no tokenised prompt reaches
        return hash((parent, block, "unhashable", id(extra)))


def _frozen(value: Any) -> Any:
    """msgpack gives lists where vLLM had tuples; hashing needs tuples all the way down."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


class PrefixView:
    """What the router knows about one instance's cache: its event index while that is in step
    with the engine, else what the router sent it.

    The event index is trusted (``synced``) once the subscriber has seen an unbroken run of
    batches for ``resync_s`` since it started or last lost events; until then, and for instances
    without events, ``SentIndex`` answers. Both are cleared when the engine restarts.
    """

    __slots__ = ("events", "sent", "synced_since", "resync_s", "last_reset_reason")

    def __init__(self, has_events: bool, capacity: int, ttl_s: float, resync_s: float) -> None:
        self.events = EventIndex() if has_events else None
        self.sent = SentIndex(capacity, ttl_s)
        self.synced_since: float | None = None
        self.resync_s = resync_s
        self.last_reset_reason = ""

    def synced(self, now: float) -> bool:
        return (self.events is not None and self.synced_since is not None
                and now - self.synced_since >= self.resync_s)

    def start_sync(self, now: float, complete: bool) -> None:
        """The subscriber has a contiguous stream from now on. ``complete``: it holds every batch
        since the engine started (trusted at once); else the index was cleared and is rebuilding."""
        self.synced_since = now - self.resync_s if complete else now

    def lose_sync(self, reason: str) -> None:
        """Events were lost: the index is cleared and rebuilt from the events that follow."""
        if self.events is not None:
            self.events.cleared()
        self.synced_since = None
        self.last_reset_reason = reason

    def reset(self, reason: str) -> None:
        """The engine restarted or cleared its cache: nothing it held is there any more."""
        if self.events is not None:
            self.events.cleared()
        self.sent.clear()
        self.last_reset_reason = reason

    def match(self, keys_for, num_prompt_tokens: int, exact: bool, sent_block_size: int,
              now: float) -> tuple[int, str]:
        """``(cached tokens, source)`` for a prompt; ``keys_for(block_size)`` gives its block keys.
        ``source`` is ``events``, ``sent`` or ``none``."""
        if exact and self.events is not None and self.events.block_size and self.synced(now):
            size = self.events.block_size
            return cached_tokens(self.events.match(keys_for(size)), size, num_prompt_tokens), "events"
        matched = self.sent.match(keys_for(sent_block_size), now)
        if not matched:
            return 0, "none"
        if not exact:  # character blocks: scale to tokens
            return min(num_prompt_tokens - 1, matched * sent_block_size // _CHARS_PER_TOKEN), "sent"
        return cached_tokens(matched, sent_block_size, num_prompt_tokens), "sent"


_CHARS_PER_TOKEN = 4  # tokens.CHARS_PER_TOKEN; characters per block when the router has no tokenizer
