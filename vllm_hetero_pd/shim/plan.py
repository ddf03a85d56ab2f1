"""Pure planning: which strided copies turn blocks of one format into blocks of another.

``plan(src_formats, dst)`` is computed once per peer (after the handshake) and reused for
every request. ``TranslationPlan.copies(...)`` then turns a request's block ids and token
range into a short list of ``Copy`` records, each one rectangular strided region per side
at every place a request has one of that shape, so that ``shim.translate`` moves every byte
with one vectorised pass per record. No torch here: the plan is plain integers and can be
built, inspected and tested anywhere.

Positions: ``src_block_ids[i]`` holds sequence positions ``[i*bs, (i+1)*bs)`` of the request
(and likewise on the destination); the plan copies positions ``[start, stop)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from vllm_hetero_pd.formats.format import Factors, KVFormat, LayoutError, can_translate

Side = Literal["k", "v"]
Conversion = Literal["copy", "fn_to_fnuz", "fnuz_to_fn", "convert"]


@dataclass(frozen=True, slots=True)
class AxisMap:
    """Where one K or V element lives: ``offset + block*block + f(token) + head*head + dim``.

    ``token`` and ``dim`` are mixed-radix factors; ``f`` applies the token factors.
    """

    offset: int
    layer: int
    block: int
    token: Factors
    head: int
    dim: Factors  # refined to the factors shared with the other side

    def token_offset(self, t: int) -> int:
        offset = 0
        for size, stride in reversed(self.token):
            offset += (t % size) * stride
            t //= size
        return offset


@dataclass(frozen=True, slots=True)
class HeadRun:
    """Destination heads ``[dst_head, dst_head+count)`` come from source rank ``src`` at ``src_head``."""

    src: int
    src_head: int  # local index on the source rank
    dst_head: int  # local index on the destination rank
    count: int


@dataclass(frozen=True, slots=True)
class Extent:
    """Elements one K or V part addresses from its buffer's start (for bounds checks), and its
    layer stride: computed once per plan, since parsing a format's axes per request costs more
    than moving a small request's bytes."""

    whole_cache: int
    per_layer: int
    layer_stride: int


def extent(fmt: KVFormat, side: Side) -> Extent:
    """``fmt``'s extent for K or V (an empty part addresses nothing)."""
    factors = fmt.factors(side)
    if not factors:
        return Extent(0, 0, 0)
    inner = sum((n - 1) * s for axis, fs in factors.items() if axis != "L" for n, s in fs)
    inner -= fmt.num_pad_blocks * factors["B"][0][1]  # pad blocks are never addressed
    base = 1 + (fmt.v_offset() if side == "v" else 0)
    layer_n, layer_stride = factors["L"][0]
    return Extent(inner + (layer_n - 1) * layer_stride + base, inner + base, layer_stride)


@dataclass(frozen=True, slots=True)
class Copy:
    """One rectangular strided copy within one layer, made at each pair of offsets (in elements).

    A request's pieces of one shape (a whole block, say) differ only in where they start, so
    they are one record. With ``plan.kv_fused`` the first dim (size 2) steps from K to V in the
    same buffer.
    """

    src: int  # source rank index
    side: Side
    sizes: tuple[int, ...]
    src_offsets: tuple[int, ...]
    src_strides: tuple[int, ...]
    dst_offsets: tuple[int, ...]
    dst_strides: tuple[int, ...]


@dataclass(frozen=True)
class TranslationPlan:
    """A compiled ``src_formats -> dst`` translation, reusable for every request."""

    src_formats: tuple[KVFormat, ...]
    dst: KVFormat
    heads: tuple[HeadRun, ...]
    sides: tuple[Side, ...]
    src_maps: dict[tuple[int, Side], AxisMap]
    dst_maps: dict[tuple[int, Side], AxisMap]  # keyed by source index too: dim refinement is per pair
    conversion: dict[Side, Conversion]
    token_cuts: tuple[int, ...]  # token counts where some side changes stride; see _token_cuts
    src_extents: dict[tuple[int, Side], Extent]
    dst_extents: dict[Side, Extent]
    kv_fused: bool  # K and V move as one copy per rectangle; see _kv_fusable

    @property
    def is_identity(self) -> bool:
        """True when every destination block is a byte copy of the same source block.

        The connector may then transfer blocks straight into its KV cache and skip the shim.
        """
        if len(self.src_formats) != 1:
            return False
        src, dst = self.src_formats[0], self.dst
        same = ("storage", "outer", "k_inner", "v_inner", "block_size", "head_start", "num_heads", "head_size",
                "head_size_v")
        return (all(getattr(src, f) == getattr(dst, f) for f in same)
                and all(c == "copy" for c in self.conversion.values()))

    def copies(self, src_block_ids: Sequence[int], dst_block_ids: Sequence[int], start: int, stop: int) -> list[Copy]:
        """The copies that move positions ``[start, stop)``, for one layer (see ``translate``)."""
        src_bs = self.src_formats[0].block_size
        dst_bs = self.dst.block_size
        _check_ids("src", src_block_ids, src_bs, start, stop, self.src_formats[0])
        _check_ids("dst", dst_block_ids, dst_bs, start, stop, self.dst)
        cuts = self.token_cuts
        sides: tuple[Side, ...] = ("k",) if self.kv_fused else self.sides
        shapes: dict[tuple[int, int], list[int]] = {}  # (level, count) -> first positions of its pieces
        for a, b in _runs(start, stop, src_block_ids, src_bs, dst_block_ids, dst_bs):
            for p, level, count in _pieces(a, b, cuts):
                shapes.setdefault((level, count), []).append(p)
        out: list[Copy] = []
        for (level, count), starts in shapes.items():
            grid = (count, *(hi // lo for lo, hi in reversed(list(zip(cuts, cuts[1 : level + 1])))))
            for run in self.heads:
                for side in sides:
                    sm, dm = self.src_maps[run.src, side], self.dst_maps[run.src, side]
                    kv_size, s_kv, d_kv = self._kv_dim(run.src)
                    out.append(
                        Copy(
                            src=run.src,
                            side=side,
                            sizes=(*kv_size, *grid, run.count, *(n for n, _ in sm.dim)),
                            src_offsets=_offsets(sm, starts, src_block_ids, src_bs, run.src_head),
                            src_strides=(*s_kv, *_grid_strides(sm, level, cuts, src_bs), sm.head,
                                         *(st for _, st in sm.dim)),
                            dst_offsets=_offsets(dm, starts, dst_block_ids, dst_bs, run.dst_head),
                            dst_strides=(*d_kv, *_grid_strides(dm, level, cuts, dst_bs), dm.head,
                                         *(st for _, st in dm.dim)),
                        )
                    )
        return out

    def _kv_dim(self, src: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Size and strides of the leading K -> V dim of fused copies (empty when not fused)."""
        if not self.kv_fused:
            return (), (), ()
        return (2,), (self.src_maps[src, "v"].offset,), (self.dst_maps[src, "v"].offset,)


def plan(src_formats: Sequence[KVFormat], dst: KVFormat) -> TranslationPlan:
    """Compile a translation from the listed source ranks into one destination rank.

    Heads are taken from the first source rank that holds them, so with GQA replication any
    one replica suffices. Raises ``LayoutError`` naming the field when no translation exists.
    """
    src_formats = tuple(src_formats)
    if not src_formats:
        raise LayoutError("plan needs at least one source format")
    for i, src in enumerate(src_formats):
        if problem := can_translate(src, dst):
            raise LayoutError(f"source rank {i}: {problem}")
        if src.block_size != src_formats[0].block_size:
            raise LayoutError(f"source ranks disagree on block_size: {src.block_size} vs {src_formats[0].block_size}")
    heads = _head_runs(src_formats, dst)
    sides: tuple[Side, ...] = ("k", "v") if dst.head_size_v else ("k",)
    src_maps: dict[tuple[int, Side], AxisMap] = {}
    dst_maps: dict[tuple[int, Side], AxisMap] = {}
    for i, src in enumerate(src_formats):
        for side in sides:
            sf, df = src.factors(side), dst.factors(side)
            dims = _common_refinement(sf["D"], df["D"], src.extent("D", side))
            src_maps[i, side] = _axis_map(src, side, sf, dims)
            dst_maps[i, side] = _axis_map(dst, side, df, dims)
    conversion = {side: _conversion(src_formats, dst, side) for side in sides}
    cuts = _token_cuts((*src_formats, dst), sides)
    src_extents = {(i, side): extent(src, side) for i, src in enumerate(src_formats) for side in sides}
    dst_extents = {side: extent(dst, side) for side in sides}
    fused = _kv_fusable(src_formats, dst, src_maps, dst_maps, conversion)
    return TranslationPlan(src_formats, dst, heads, sides, src_maps, dst_maps, conversion, cuts, src_extents,
                           dst_extents, fused)


# ---------------------------------------------------------------------------- helpers
def _head_runs(src_formats: tuple[KVFormat, ...], dst: KVFormat) -> tuple[HeadRun, ...]:
    runs: list[HeadRun] = []
    for h in range(dst.head_start, dst.head_start + dst.num_heads):
        owner = next((i for i, s in enumerate(src_formats) if s.head_start <= h < s.head_start + s.num_heads), None)
        if owner is None:
            held = ", ".join(f"[{s.head_start}, {s.head_start + s.num_heads})" for s in src_formats)
            raise LayoutError(f"KV head {h} needed by the destination is on none of the source ranks "
                              f"(they hold {held})")
        src_local, dst_local = h - src_formats[owner].head_start, h - dst.head_start
        last = runs[-1] if runs else None
        extends_last = (last and last.src == owner and last.src_head + last.count == src_local
                        and last.dst_head + last.count == dst_local)
        if extends_last:
            runs[-1] = HeadRun(owner, last.src_head, last.dst_head, last.count + 1)
        else:
            runs.append(HeadRun(owner, src_local, dst_local, 1))
    return tuple(runs)


def _token_cuts(formats: tuple[KVFormat, ...], sides: tuple[Side, ...]) -> tuple[int, ...]:
    """Token counts at which some side changes stride (1, token tiles, block sizes), ascending.

    Every copy is a grid over these levels, so each of its dims has one stride on both sides.
    """
    cuts = {1, *(f.block_size for f in formats)}
    for fmt in formats:
        for side in sides:
            cuts |= _breaks(fmt.factors(side)["N"])
    ordered = sorted(cuts)
    if any(hi % lo for lo, hi in zip(ordered, ordered[1:])):
        raise LayoutError(f"block sizes and token tiles {ordered} do not nest; no common grid")
    return tuple(ordered)


def _single(fmt: KVFormat, side: Side, factors: dict[str, Factors], axis: str) -> int:
    if len(factors[axis]) != 1:
        raise LayoutError(f"{fmt.name or 'format'}: axis {axis} of {side.upper()} is split; only N and D may be split")
    return factors[axis][0][1]


def _axis_map(fmt: KVFormat, side: Side, factors: dict[str, Factors], dims: tuple[int, ...]) -> AxisMap:
    return AxisMap(
        offset=fmt.v_offset() if side == "v" else 0,
        layer=_single(fmt, side, factors, "L"),
        block=_single(fmt, side, factors, "B"),
        token=factors["N"],
        head=_single(fmt, side, factors, "H"),
        dim=_refine(factors["D"], dims),
    )


def _breaks(factors: Factors) -> set[int]:
    """Place values (products of the inner factors) at which this factorisation cuts D."""
    cuts, value = set(), 1
    for size, _ in reversed(factors[1:]):
        value *= size
        cuts.add(value)
    return cuts


def _common_refinement(a: Factors, b: Factors, extent: int) -> tuple[int, ...]:
    """Factor sizes of D (outermost first) that both factorisations can be viewed in."""
    cuts = sorted(_breaks(a) | _breaks(b))
    for lo, hi in zip([1, *cuts], [*cuts, extent]):
        if hi % lo:
            raise LayoutError(f"head dim packings {a} and {b} do not nest")
    return tuple(hi // lo for lo, hi in reversed(list(zip([1, *cuts], [*cuts, extent]))))


def _refine(factors: Factors, dims: tuple[int, ...]) -> Factors:
    """Split each ``(size, stride)`` factor into the finer ``dims`` (which nest inside it)."""
    out: list[tuple[int, int]] = []
    queue = list(dims)
    for size, stride in reversed(factors):  # innermost first
        covered = 1
        while covered < size:
            n = queue.pop()
            out.insert(0, (n, stride * covered))
            covered *= n
    return tuple(out)


def _kv_fusable(src_formats: tuple[KVFormat, ...], dst: KVFormat, src_maps: dict[tuple[int, Side], AxisMap],
                dst_maps: dict[tuple[int, Side], AxisMap], conversion: dict[Side, Conversion]) -> bool:
    """Whether K and V move as one copy: on every side V directly follows K's head dim in the
    same buffer (K||V cells) and is laid out and converted alike. Each copy's contiguous rows
    then double (or span whole blocks) and the copies halve. V elsewhere in the block (era A2)
    is left apart: a size-2 K/V dim that merges with nothing makes torch's copy loops slower."""
    if len(conversion) != 2 or conversion["k"] != conversion["v"]:
        return False
    fmts = (*src_formats, dst)
    if any(f.storage != "joint" for f in fmts):
        return False
    if conversion["k"] == "convert" and any(f.k_scales != f.v_scales for f in fmts):
        return False
    pairs = [(m[i, "k"], m[i, "v"]) for i in range(len(src_formats)) for m in (src_maps, dst_maps)]
    return all(replace(k, offset=0) == replace(v, offset=0) and v.offset == k.offset + k.dim[0][0] * k.dim[0][1]
               for k, v in pairs)


def _conversion(src_formats: tuple[KVFormat, ...], dst: KVFormat, side: Side) -> Conversion:
    scale = "k_scale" if side == "k" else "v_scale"
    kinds = set()
    for src in src_formats:
        ratios = {getattr(dst, scale)(l) / getattr(src, scale)(l) for l in range(dst.num_layers)}
        if src.dtype == dst.dtype and (not dst.is_fp8 or ratios == {1.0}):
            kinds.add("copy")
        elif (src.dtype, dst.dtype, ratios) == ("float8_e4m3fn", "float8_e4m3fnuz", {2.0}):
            kinds.add("fn_to_fnuz")  # lossless: value_fn(b) == 2 * value_fnuz(b)
        elif (src.dtype, dst.dtype, ratios) == ("float8_e4m3fnuz", "float8_e4m3fn", {0.5}):
            kinds.add("fnuz_to_fn")  # exact except fnuz +-240 codes, which saturate
        else:
            kinds.add("convert")
    return kinds.pop() if len(kinds) == 1 else "convert"


def _check_ids(which: str, ids: Sequence[int], bs: int, start: int, stop: int, fmt: KVFormat) -> None:
    if not 0 <= start <= stop:
        raise LayoutError(f"bad token range [{start}, {stop})")
    needed = math.ceil(stop / bs)
    if len(ids) < needed:
        raise LayoutError(f"{which}_block_ids has {len(ids)} blocks; positions up to {stop} need {needed} of size {bs}")
    bad = [b for b in ids[start // bs : needed] if not 0 <= b < fmt.num_blocks]
    if bad:
        raise LayoutError(f"{which}_block_ids {bad[:4]} outside [0, {fmt.num_blocks}) of {fmt.name or 'format'}")


def _runs(start: int, stop: int, src_ids: Sequence[int], src_bs: int, dst_ids: Sequence[int], dst_bs: int):
    """Split ``[start, stop)`` where either side's next block is not the previous id + 1."""
    cuts = {start, stop}
    for ids, bs in ((src_ids, src_bs), (dst_ids, dst_bs)):
        for i in range(start // bs + 1, math.ceil(stop / bs)):
            if ids[i] != ids[i - 1] + 1:
                cuts.add(i * bs)
    edges = sorted(cuts)
    return [(a, b) for a, b in zip(edges, edges[1:]) if a < b]


def _pieces(a: int, b: int, cuts: tuple[int, ...]):
    """Cut ``[a, b)`` into aligned chunks ``(first position, level, count)``.

    A piece holds ``count`` consecutive chunks of ``cuts[level]`` tokens, all inside one chunk of
    the next level (or anywhere for the top level): first climbing from ``a`` to the alignment of
    each coarser level, then descending to ``b``.
    """
    p = a
    for level in range(len(cuts) - 1):  # climb: finish the partial chunk of each coarser level
        end = min(b // cuts[level] * cuts[level], -(-p // cuts[level + 1]) * cuts[level + 1])
        if end > p:
            yield p, level, (end - p) // cuts[level]
            p = end
    for level in reversed(range(len(cuts))):  # descend: whole chunks, coarse to fine
        end = b // cuts[level] * cuts[level]
        if end > p:
            yield p, level, (end - p) // cuts[level]
            p = end


def _offsets(m: AxisMap, starts: list[int], ids: Sequence[int], bs: int, head: int) -> tuple[int, ...]:
    """Where each piece starting at a position of ``starts`` begins, from ``head`` on."""
    base = m.offset + head * m.head
    within = {r: base + m.token_offset(r) for r in {p % bs for p in starts}}  # mostly one: block starts
    return tuple(within[p % bs] + ids[p // bs] * m.block for p in starts)


def _grid_strides(m: AxisMap, level: int, cuts: tuple[int, ...], bs: int) -> tuple[int, ...]:
    """The stride of each grid dim of a piece (levels ``level`` down to 0)."""
    return tuple((cuts[l] // bs) * m.block if cuts[l] >= bs else m.token_offset(cuts[l]) for l in range(level, -1, -1))
