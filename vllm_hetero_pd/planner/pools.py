"""Every minimal way to cover a rate with instances of a role's options: the search's raw material.

A pool is up to ``max_entries`` entries (option, count), count <= ``max_count``. It *covers* the
rate when its capacity, minus ``spare`` instances of its largest one (N+k redundancy, counted as
k of the largest), reaches the need. It is *minimal* when no instance can be dropped without
losing coverage. Prices are positive and cost and device use only grow with counts, so some
optimum of any monotone objective over covering pools is made of minimal pools: enumerating
them is exact. Two entries of one option would merge into one, so entries are distinct options.

The enumeration is a depth-first search over options sorted by $/h per req/s, closing each
partial pool with its cheapest last entry (vectorised over candidates). It prunes with a lower
bound: the partial cost plus the uncovered rate at the best remaining $/(req/s), which must
stay below ``limit`` (a known plan's cost or the budget); device use must fit the inventory.
"""

from __future__ import annotations

import math

import msgspec
import numpy as np

TOLERANCE = 1e-9  # relative slack when checking that capacity covers the rate


class Options(msgspec.Struct, frozen=True):
    """One role's options as parallel arrays."""

    rates: np.ndarray  # req/s per instance (0 = cannot serve)
    prices: np.ndarray  # $/h per instance
    type_ids: np.ndarray  # device type of each option
    devices: np.ndarray  # devices per instance


class Limits(msgspec.Struct, frozen=True):
    """Shape and resource limits every pool must respect."""

    max_entries: int
    max_count: int
    spare: int  # instances the pool may lose and still cover the need
    inventory: np.ndarray  # devices per type (inf = unlimited)


class Pools(msgspec.Struct, frozen=True):
    """Minimal pools as arrays, entries padded with option -1 / count 0."""

    opts: np.ndarray  # (P, K)
    counts: np.ndarray  # (P, K)
    cost: np.ndarray  # (P,) $/h of the instances
    usage: np.ndarray  # (P, T) devices per type

    def __len__(self) -> int:
        return len(self.cost)

    def take(self, keep: np.ndarray) -> Pools:
        return Pools(self.opts[keep], self.counts[keep], self.cost[keep], self.usage[keep])


def _covers(capacity, largest, need: float, spare: int):
    return capacity - spare * largest >= need * (1 - TOLERANCE)


class _Search:
    """State of one enumeration (kept in one object so the recursion passes indices only)."""

    def __init__(self, opts: Options, need: float, limits: Limits, limit: float):
        self.o, self.need, self.lim, self.limit = opts, need, limits, limit * (1 + TOLERANCE)
        usable = np.flatnonzero(opts.rates > 0)
        ratio = opts.prices[usable] / opts.rates[usable]
        self.order = usable[np.argsort(ratio, kind="stable")]
        self.best_ratio = np.sort(ratio)  # best $/(req/s) among order[i:] is best_ratio[i]
        self.found: list[tuple[np.ndarray, np.ndarray]] = []

    def run(self) -> None:
        if len(self.order):
            self._extend(0, [], 0.0, 0.0, np.zeros(len(self.lim.inventory)), 0.0)

    def _close(self, pos: int, chosen: list[tuple[int, int]], cap: float, cost: float, usage: np.ndarray,
               largest: float) -> None:
        """Finish ``chosen`` with one more entry from ``order[pos:]`` at its smallest covering count."""
        o, lim, spare = self.o, self.lim, self.lim.spare
        js = self.order[pos:]
        r, p, t, d = o.rates[js], o.prices[js], o.type_ids[js], o.devices[js]
        top = np.maximum(largest, r)
        n = np.maximum(np.ceil((self.need * (1 - TOLERANCE) + spare * top - cap) / r), 1)
        total, total_cap = cost + n * p, cap + n * r
        ok = (n <= lim.max_count) & (total < self.limit) & (usage[t] + n * d <= lim.inventory[t])
        for i, (c, nc) in enumerate(chosen):  # dropping one instance of an earlier entry must uncover
            if nc > 1:
                ok &= ~_covers(total_cap - o.rates[c], top, self.need, spare)
            else:
                rest = max((o.rates[x] for k, (x, _) in enumerate(chosen) if k != i), default=0.0)
                ok &= ~_covers(total_cap - o.rates[c], np.maximum(rest, r), self.need, spare)
        for k in np.flatnonzero(ok):
            self.found.append((np.array([c for c, _ in chosen] + [js[k]]),
                               np.array([nc for _, nc in chosen] + [int(n[k])])))

    def _extend(self, pos: int, chosen: list[tuple[int, int]], cap: float, cost: float, usage: np.ndarray,
                largest: float) -> None:
        self._close(pos, chosen, cap, cost, usage, largest)
        if len(chosen) + 1 >= self.lim.max_entries:
            return
        o, lim = self.o, self.lim
        for idx in range(pos, len(self.order) - 1):  # a later entry must follow
            j = self.order[idx]
            r, p, t, d = o.rates[j], o.prices[j], o.type_ids[j], o.devices[j]
            top = max(largest, r)
            for n in range(1, lim.max_count + 1):
                new_cap, new_cost = cap + n * r, cost + n * p
                if new_cost >= self.limit or usage[t] + n * d > lim.inventory[t]:
                    break
                if _covers(new_cap, top, self.need, lim.spare):
                    break  # covered without a further entry: the closing step already has this pool
                short = self.need + lim.spare * top - new_cap
                if new_cost + short * self.best_ratio[idx + 1] >= self.limit:
                    continue
                grown = usage.copy()
                grown[t] += n * d
                self._extend(idx + 1, chosen + [(j, n)], new_cap, new_cost, grown, top)


def minimal_pools(opts: Options, need: float, limits: Limits, limit: float = math.inf) -> Pools:
    """All minimal pools covering ``need`` within ``limits`` whose cost is below ``limit``, cheapest first."""
    search = _Search(opts, need, limits, limit)
    search.run()
    k, num_types = limits.max_entries, len(limits.inventory)
    if not search.found:
        return Pools(np.zeros((0, k), np.int64), np.zeros((0, k), np.int64), np.zeros(0), np.zeros((0, num_types)))
    opts_arr = np.full((len(search.found), k), -1, np.int64)
    counts = np.zeros((len(search.found), k), np.int64)
    for row, (os_, ns) in enumerate(search.found):
        opts_arr[row, :len(os_)], counts[row, :len(ns)] = os_, ns
    safe = np.maximum(opts_arr, 0)
    cost = (counts * opts.prices[safe]).sum(axis=1)
    usage = np.zeros((len(cost), num_types))
    for col in range(k):
        picked = safe[:, col]
        np.add.at(usage, (np.arange(len(cost)), opts.type_ids[picked]), counts[:, col] * opts.devices[picked])
    order = np.lexsort((usage.sum(axis=1), cost))  # cheapest, then fewest devices
    return Pools(opts_arr[order], counts[order], cost[order], usage[order])
