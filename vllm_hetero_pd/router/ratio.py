"""The ratio controller's decision: pure functions, data in, a decision out. No clock, no I/O.

``roles.py`` calls ``decide`` every ``ratio.interval_s`` with the observed workload (arrival rate
and mean ISL/OSL over a window, ``window.py``), every instance's capacity in each role at that
workload under the SLO (requests/s, from the planner's performance model, ``capacity.py``), and
each mixed instance's current role, and applies the flip it returns.

**The split.** With ``rate`` the arrival rate and ``C_P``, ``C_D`` the summed capacities of the
instances serving each role, a split's *load* is ``max(rate / C_P, rate / C_D)``: the utilisation
of its busier role. Its instances are paid for whatever their role, so the split that meets the
SLO at least cost is the one with the lowest load: it meets the SLO whenever any split does
(load <= 1), and then leaves the most headroom. The candidates are threshold splits of the mixed
instances sorted by comparative advantage ``c_P / c_D`` (the first ``k`` prefill, the rest decode),
each role keeping at least one instance; for identical instances that is every split there is.

**Hysteresis.** A flip happens only when the window holds ``min_requests`` requests, the best
split's load is at least ``min_gain`` (relative) lower than the current one's, the same direction
has been proposed for ``hold_s``, ``cooldown_s`` has passed since the last flip, and no mixed
instance is draining: a flip in progress finishes before the next one starts. One instance flips
per decision, the one the move towards the best split starts with (a swap of two unlike
instances takes two), never one whose move would leave a role empty; load is quasi-convex in
``k``, so that step never raises it for identical instances.

**Desired replicas** per pool: ``ceil(rate x (1 + headroom) / c)`` within ``[min_replicas,
max_replicas]``, ``c`` the per-instance capacity of the pool's reference shape.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence

import msgspec

from vllm_hetero_pd.router.config import RatioConfig, Role


class RoleCapacity(msgspec.Struct, frozen=True, kw_only=True):
    """Requests/s one instance (or a sum of instances) sustains within the SLO in each role."""

    prefill: float
    decode: float

    def of(self, role: Role) -> float:
        return self.prefill if role is Role.PREFILL else self.decode

    @property
    def advantage(self) -> float:
        """How much better it prefills than it decodes (``c_P / c_D``): who goes to prefill first."""
        return self.prefill / self.decode if self.decode > 0 else math.inf


class Observation(msgspec.Struct, frozen=True, kw_only=True):
    """The workload of the last window: arrivals per second and mean prompt/output tokens."""

    rate: float
    isl: float
    osl: float
    num_requests: int


class Pinned(msgspec.Struct, frozen=True, kw_only=True):
    """The instances pinned to a role: how many, and their summed capacity."""

    num_prefill: int
    num_decode: int
    capacity: RoleCapacity


class Mixed(msgspec.Struct, frozen=True, kw_only=True):
    """A mixed-pool instance: its capacity, the role it serves (or is flipping to), whether it drains."""

    url: str
    capacity: RoleCapacity
    role: Role
    draining: bool = False


class Action(str, enum.Enum):
    """What a decision did (the ``action`` label of ``ratio_decisions_total``)."""

    NO_DATA = "no_data"  # fewer than min_requests in the window
    INFEASIBLE = "infeasible"  # no split has capacity in both roles under the SLO
    BALANCED = "balanced"  # the current split is already the best
    NO_GAIN = "no_gain"  # a better split exists, but by less than min_gain
    DRAINING = "draining"  # a flip is still draining
    COOLDOWN = "cooldown"  # the last flip was less than cooldown_s ago
    CONFIRMING = "confirming"  # the proposal has held less than hold_s
    BLOCKED = "blocked"  # every step towards the best split would leave a role empty
    FLIP = "flip"


class Flip(msgspec.Struct, frozen=True, kw_only=True):
    url: str
    to_role: Role


class State(msgspec.Struct, frozen=True, kw_only=True):
    """What hysteresis remembers between decisions."""

    last_flip_s: float | None = None
    proposed: Role | None = None  # the role a mixed instance would move to
    proposed_since_s: float = 0.0


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """One evaluation: the action, the flip (if any), the loads it compared and why."""

    action: Action
    reason: str
    flip: Flip | None = None
    load: float | None = None  # the current split's
    best_load: float | None = None
    best_num_prefill: int | None = None  # mixed instances in prefill in the best split


def split_load(rate: float, prefill_capacity: float, decode_capacity: float) -> float:
    """Utilisation of the busier role (inf when a role has no capacity)."""
    return max(_utilisation(rate, prefill_capacity), _utilisation(rate, decode_capacity))


def _utilisation(rate: float, capacity: float) -> float:
    return rate / capacity if capacity > 0 else math.inf


def by_advantage(mixed: Sequence[Mixed]) -> list[Mixed]:
    """Mixed instances best prefillers first (ties by URL, so the order is stable)."""
    return sorted(mixed, key=lambda m: (-m.capacity.advantage, m.url))


def threshold_loads(rate: float, pinned: Pinned, ordered: Sequence[Mixed]) -> dict[int, float]:
    """Load of each allowed threshold split: ``k`` -> load with ``ordered[:k]`` prefilling."""
    low = 0 if pinned.num_prefill else 1
    high = len(ordered) - (0 if pinned.num_decode else 1)
    loads = {}
    for k in range(low, high + 1):
        prefill = pinned.capacity.prefill + sum(m.capacity.prefill for m in ordered[:k])
        decode = pinned.capacity.decode + sum(m.capacity.decode for m in ordered[k:])
        loads[k] = split_load(rate, prefill, decode)
    return loads


def current_load(rate: float, pinned: Pinned, mixed: Sequence[Mixed]) -> float:
    prefill = pinned.capacity.prefill + sum(m.capacity.prefill for m in mixed if m.role is Role.PREFILL)
    decode = pinned.capacity.decode + sum(m.capacity.decode for m in mixed if m.role is Role.DECODE)
    return split_load(rate, prefill, decode)


def decide(now_s: float, observed: Observation, pinned: Pinned, mixed: Sequence[Mixed], state: State,
           config: RatioConfig) -> tuple[State, Decision]:
    """The next state and what to do now (see the module docstring for the rules)."""
    if observed.num_requests < config.min_requests:
        return _reset(state), Decision(action=Action.NO_DATA, reason=f"{observed.num_requests} requests in the "
                                       f"window, fewer than min_requests {config.min_requests}")
    ordered = by_advantage(mixed)
    loads = threshold_loads(observed.rate, pinned, ordered)
    if not loads:
        return _reset(state), Decision(action=Action.BALANCED, reason="no mixed instance can change role "
                                       "without leaving a role empty")
    num_prefill = sum(m.role is Role.PREFILL for m in mixed)
    best = min(loads, key=lambda k: (loads[k], abs(k - num_prefill), k))
    load = current_load(observed.rate, pinned, mixed)
    known = {"load": load, "best_load": loads[best], "best_num_prefill": best}
    if math.isinf(loads[best]):
        return _reset(state), Decision(action=Action.INFEASIBLE, reason="no split has capacity in both roles "
                                       "under the SLO at this workload", **known)
    if loads[best] >= load:
        return _reset(state), Decision(action=Action.BALANCED, reason="the current split is the best", **known)
    if loads[best] > load * (1 - config.min_gain):
        return _reset(state), Decision(action=Action.NO_GAIN, reason=f"the best split lowers the load by less "
                                       f"than min_gain {config.min_gain:g}", **known)
    mover = _first_step(pinned, mixed, ordered, best)
    if mover is None:
        return _reset(state), Decision(action=Action.BLOCKED, reason="every flip towards the best split would leave "
                                       "a role without instances", **known)
    to_role = _other(mover.role)
    if state.proposed is not to_role:
        state = State(last_flip_s=state.last_flip_s, proposed=to_role, proposed_since_s=now_s)
    if any(m.draining for m in mixed):
        return state, Decision(action=Action.DRAINING, reason="an instance is still draining its old role", **known)
    if state.last_flip_s is not None and now_s - state.last_flip_s < config.cooldown_s:
        return state, Decision(action=Action.COOLDOWN, reason=f"last flip {now_s - state.last_flip_s:.1f} s ago, "
                               f"cooldown_s {config.cooldown_s:g}", **known)
    if now_s - state.proposed_since_s < config.hold_s:
        return state, Decision(action=Action.CONFIRMING, reason=f"proposed {now_s - state.proposed_since_s:.1f} s "
                               f"ago, hold_s {config.hold_s:g}", **known)
    return State(last_flip_s=now_s), Decision(action=Action.FLIP, flip=Flip(url=mover.url, to_role=to_role),
                                              reason=f"load {load:.2f} -> best {loads[best]:.2f} with {best} "
                                              "mixed instances prefilling", **known)


def _first_step(pinned: Pinned, mixed: Sequence[Mixed], ordered: Sequence[Mixed], best: int) -> Mixed | None:
    """The instance to flip first towards the best split (its first ``best`` of ``ordered`` prefilling):
    the strongest misplaced prefiller when prefill is short, the weakest misplaced one when decode
    is, either when a swap is needed; never one whose move empties the role it leaves."""
    target = {m.url for m in ordered[:best]}
    to_prefill = [m for m in ordered if m.url in target and m.role is Role.DECODE]
    to_decode = [m for m in reversed(ordered) if m.url not in target and m.role is Role.PREFILL]
    num_prefill = sum(m.role is Role.PREFILL for m in mixed)
    movers = to_prefill if best > num_prefill else to_decode if best < num_prefill else to_decode + to_prefill
    left = {Role.PREFILL: pinned.num_prefill + num_prefill,
            Role.DECODE: pinned.num_decode + len(mixed) - num_prefill}
    return next((m for m in movers if left[m.role] > 1), None)


def _other(role: Role) -> Role:
    return Role.DECODE if role is Role.PREFILL else Role.PREFILL


def _reset(state: State) -> State:
    """Forget a proposal the workload no longer supports (the hold starts over next time)."""
    return State(last_flip_s=state.last_flip_s)


def desired_replicas(rate: float, capacity_per_instance: float, config: RatioConfig) -> int:
    """Instances of one shape a pool needs for ``rate`` with ``headroom`` to spare (the HPA target)."""
    if capacity_per_instance <= 0:
        return config.max_replicas
    needed = math.ceil(rate * (1 + config.headroom) / capacity_per_instance - 1e-9)
    return min(config.max_replicas, max(config.min_replicas, needed))
