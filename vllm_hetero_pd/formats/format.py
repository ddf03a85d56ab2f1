"""``KVFormat``: one engine rank's KV cache described as data.

A leaf module (msgspec and the standard library only) so the router, the planner and the
connector's handshake can describe and compare formats without importing torch or vLLM.

The physical layout is written with axis letters, in the spirit of vLLM's ``KVCacheLayout``
(``vllm/v1/kv_cache_layout.py``, 0.32.0), but extended so that every era and vendor fits:

* ``L`` layer, ``B`` block, ``H`` KV head (of this rank), ``N`` token within a block,
  ``D`` element within a head vector.
* A letter followed by digits is an *inner factor* of that axis with a fixed extent; the bare
  letter is the remaining outer factor. ROCM_ATTN's x-packed key ``[B, H, D/8, N, 8]`` is
  ``"BHDND8"``.
* ``outer`` lists the axes outside the per-cell content, outermost first. With ``joint``
  storage each outer cell holds the key content (``k_inner``) followed by the value content
  (``v_inner``): vLLM 0.29+ FLASH_ATTN LBNHC is ``outer="LBNH", k_inner="D", v_inner="D"``
  (per token and head, K then V); era-A2 ``(NB, 2, BS, H, D)`` is ``outer="LB",
  k_inner="NHD", v_inner="NHD"`` (a K plane, then a V plane).
* With ``split`` storage K and V live in two separate buffers, each laid out as
  ``outer + k_inner`` / ``outer + v_inner`` (vllm-gaudi's separate key and value caches).

The byte-moving code lives in ``vllm_hetero_pd.shim``; this module only states facts and the
arithmetic that follows from them (sizes, strides, TP shards, compatibility).
"""

from __future__ import annotations

import math
import re
from typing import Literal

import msgspec

Storage = Literal["joint", "split"]
DType = Literal["bfloat16", "float16", "float32", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2"]

AXES = "LBHND"
ELEMENT_BYTES: dict[str, int] = {
    "bfloat16": 2,
    "float16": 2,
    "float32": 4,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
}
FP8_DTYPES = frozenset(d for d, n in ELEMENT_BYTES.items() if n == 1)
_TOKEN = re.compile(r"([LBHND])(\d*)")

# (size, stride) factors of one axis, outermost first; strides in elements.
Factors = tuple[tuple[int, int], ...]


class LayoutError(ValueError):
    """A KVFormat whose fields contradict each other; the message names the field."""


class KVFormat(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything needed to interpret the bytes of one rank's KV cache.

    Travels in the connector handshake (``msgspec.msgpack``); two formats compare equal
    exactly when every field does. ``name`` is informational (a preset name or "detected").
    """

    name: str = ""
    storage: Storage
    outer: str
    k_inner: str
    v_inner: str
    num_layers: int
    num_blocks: int
    num_pad_blocks: int = 0  # allocated but never addressed, after the last real block
    block_size: int
    num_kv_heads: int  # model total
    head_start: int = 0  # first KV head held by this rank
    num_heads: int  # KV heads held by this rank
    head_size: int
    head_size_v: int
    dtype: DType
    k_scales: tuple[float, ...] = ()  # per layer; () means 1.0 everywhere
    v_scales: tuple[float, ...] = ()
    layer_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "num_heads", "head_size"):
            if getattr(self, field) < 1:
                raise LayoutError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.head_size_v < 0 or self.num_pad_blocks < 0 or self.head_start < 0:
            raise LayoutError("head_size_v, num_pad_blocks and head_start must be >= 0")
        if self.head_start + self.num_heads > self.num_kv_heads:
            raise LayoutError(
                f"heads [{self.head_start}, {self.head_start + self.num_heads}) exceed num_kv_heads={self.num_kv_heads}"
            )
        for field in ("k_scales", "v_scales"):
            scales = getattr(self, field)
            if scales and len(scales) != self.num_layers:
                raise LayoutError(f"{field} has {len(scales)} entries for {self.num_layers} layers")
            if any(not s > 0 for s in scales):
                raise LayoutError(f"{field} must be positive, got {scales}")
        if self.layer_names and len(self.layer_names) != self.num_layers:
            raise LayoutError(f"layer_names has {len(self.layer_names)} names for {self.num_layers} layers")
        for side in ("k", "v"):
            self.factors(side)  # validates the axis strings

    # ------------------------------------------------------------------ sizes
    @property
    def element_bytes(self) -> int:
        return ELEMENT_BYTES[self.dtype]

    @property
    def is_fp8(self) -> bool:
        return self.dtype in FP8_DTYPES

    def extent(self, axis: str, side: str = "k") -> int:
        """Full extent of one axis: ``D`` depends on the side (K or V head size)."""
        return {
            "L": self.num_layers,
            "B": self.num_blocks + self.num_pad_blocks,
            "H": self.num_heads,
            "N": self.block_size,
            "D": self.head_size if side == "k" else self.head_size_v,
        }[axis]

    def inner_elements(self, side: str) -> int:
        inner = self.k_inner if side == "k" else self.v_inner
        return math.prod(self._axis_sizes(inner, side, complete=False).values()) if inner else 0

    @property
    def nbytes_per_block(self) -> int:
        """Bytes one block of one layer occupies (K and V together), as NIXL moves it."""
        per_token_head = self.head_size + self.head_size_v
        return self.block_size * self.num_heads * per_token_head * self.element_bytes

    def nbytes(self) -> int:
        """Bytes of the whole cache of this rank (all layers, pad blocks included)."""
        return (self.num_blocks + self.num_pad_blocks) * self.num_layers * self.nbytes_per_block

    def k_scale(self, layer: int) -> float:
        return self.k_scales[layer] if self.k_scales else 1.0

    def v_scale(self, layer: int) -> float:
        return self.v_scales[layer] if self.v_scales else 1.0

    # ------------------------------------------------------------------ strides
    def _axis_sizes(self, axes: str, side: str, complete: bool) -> dict[int, int]:
        """Size of each token of ``axes`` (keyed by its position), checking every extent."""
        tokens = _parse(axes)
        sizes: dict[int, int] = {}
        for axis in {a for a, _ in tokens}:
            positions = [i for i, (a, _) in enumerate(tokens) if a == axis]
            fixed = math.prod(n for a, n in tokens if a == axis and n)
            bare = [i for i in positions if not tokens[i][1]]
            full = self.extent(axis, side)
            if len(bare) > 1 or full % fixed:
                raise LayoutError(f"axis {axis} in {axes!r} does not factor extent {full}")
            for i in positions:
                sizes[i] = tokens[i][1] or full // fixed
            if not bare and fixed != full:
                raise LayoutError(f"axis {axis} in {axes!r} covers {fixed} of {full}")
        if complete:
            missing = [a for a in AXES if a not in {a for a, _ in tokens} and self.extent(a, side) != 1]
            if missing:
                raise LayoutError(f"layout {axes!r} lacks axes {missing} ({self.name or 'format'})")
        return sizes

    def factors(self, side: str) -> dict[str, Factors]:
        """Per axis, its ``(size, stride)`` factors (outermost first) for the K or V part.

        Strides are in elements from the start of the K (``side="k"``) or V buffer: with joint
        storage both parts share one buffer and V starts after K inside every outer cell.
        """
        inner = self.k_inner if side == "k" else self.v_inner
        if side == "v" and self.head_size_v == 0:
            return {}
        tokens = _parse(self.outer) + _parse(inner)
        sizes = self._axis_sizes(self.outer + inner, side, complete=True)
        cell = self.inner_elements("k") + self.inner_elements("v") if self.storage == "joint" else None
        result: dict[str, list[tuple[int, int]]] = {a: [] for a in AXES}
        stride = 1
        for i in reversed(range(len(tokens))):
            if i == len(tokens) - len(_parse(inner)) - 1 and cell is not None:
                stride = cell  # first outer axis (from the inside): skip the whole K+V cell
            result[tokens[i][0]].insert(0, (sizes[i], stride))
            stride *= sizes[i]
        return {a: tuple(f) if f else ((1, 0),) for a, f in result.items()}

    def v_offset(self) -> int:
        """Element offset of V within a joint outer cell (0 for split storage)."""
        return self.inner_elements("k") if self.storage == "joint" else 0

    # ------------------------------------------------------------------ tensor parallel
    def shard(self, tp_rank: int, tp_size: int) -> KVFormat:
        """The format rank ``tp_rank`` of ``tp_size`` holds, from a whole-model format.

        Heads split evenly; when ``tp_size`` exceeds the KV head count each head is
        replicated on ``tp_size // num_kv_heads`` consecutive ranks (vLLM's GQA rule).
        """
        start, count = head_range(self.num_kv_heads, tp_rank, tp_size)
        return msgspec.structs.replace(self, head_start=start, num_heads=count)


def head_range(num_kv_heads: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """``(first head, head count)`` held by ``tp_rank`` under vLLM's TP rule."""
    if not 0 <= tp_rank < tp_size:
        raise LayoutError(f"tp_rank {tp_rank} outside tp_size {tp_size}")
    if tp_size <= num_kv_heads:
        if num_kv_heads % tp_size:
            raise LayoutError(f"num_kv_heads {num_kv_heads} is not divisible by tp_size {tp_size}")
        per_rank = num_kv_heads // tp_size
        return tp_rank * per_rank, per_rank
    if tp_size % num_kv_heads:
        raise LayoutError(f"tp_size {tp_size} is not a multiple of num_kv_heads {num_kv_heads}")
    return tp_rank // (tp_size // num_kv_heads), 1


def _parse(axes: str) -> list[tuple[str, int]]:
    tokens = [(m.group(1), int(m.group(2) or 0)) for m in _TOKEN.finditer(axes)]
    if "".join(a + (str(n) if n else "") for a, n in tokens) != axes:
        raise LayoutError(f"bad axis string {axes!r}: use letters {AXES} with optional sizes, e.g. 'BHDND8'")
    return tokens


def can_translate(src: KVFormat, dst: KVFormat) -> str | None:
    """``None`` if blocks in ``src`` can be translated into ``dst``; else why not.

    Cheap and pure, for the handshake. Checks one source rank against one destination rank
    for everything except head coverage (several source ranks may together cover ``dst``).
    """
    for field in ("num_layers", "num_kv_heads", "head_size", "head_size_v"):
        a, b = getattr(src, field), getattr(dst, field)
        if a != b:
            return f"{field} differs: source {a} vs destination {b}"
    if src.layer_names and dst.layer_names and src.layer_names != dst.layer_names:
        diff = next(i for i, (a, b) in enumerate(zip(src.layer_names, dst.layer_names)) if a != b)
        return (f"layer_names differ at {diff}: source {src.layer_names[diff]!r} vs destination "
                f"{dst.layer_names[diff]!r}")
    small, large = sorted((src.block_size, dst.block_size))
    if large % small:
        return f"block_size: source {src.block_size} and destination {dst.block_size} are not multiples of each other"
    return None
