"""What the router's ratio controller did over a run: roles and desired replicas over time, and flips.

``poll`` reads the router's ``/metrics`` once a second while a run lasts; each page becomes a
``RoleSample``: every mixed instance's role (``hetero_pd_router_instance_role``: ``prefill`` or
``decode`` while it takes that role's new requests, ``draining`` while it takes neither),
``desired_replicas{pool}``, the observed ``window{stat}`` and ``role_flips_total``. A drain can be
shorter than the poll period, so the flips themselves come from the router's log, whose lines
``roles.py`` writes when a flip starts and when the new role opens; ``flips`` turns them into
intervals, and a request that was in flight during one of them is one the flip could have hurt.
"""

from __future__ import annotations

import asyncio
import datetime
import re
import time
from collections.abc import Sequence

import aiohttp
import msgspec

from vllm_hetero_pd.testing.metrics import metric_sum, parse_samples

_ROLE = "hetero_pd_router_instance_role"
_DESIRED = "hetero_pd_router_desired_replicas"
_WINDOW = "hetero_pd_router_window"
_FLIPS = "hetero_pd_router_role_flips_total"
# asctime as ``vllm-hetero-pd proxy`` logs it (router/cli.py), then roles.py's two flip messages
_LOG_TIME = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*?"
_FLIP_START = re.compile(_LOG_TIME + r"role flip: (\S+) (\w+) -> (\w+); draining", re.M)
_FLIP_END = re.compile(_LOG_TIME + r"role flip: (\S+) now serves (\w+)", re.M)


class RoleSample(msgspec.Struct, frozen=True, kw_only=True):
    """One ``/metrics`` page of the router, at wall-clock time ``at_s``."""

    at_s: float
    roles: dict[str, str]  # instance URL -> prefill, decode, draining (both: no ratio controller)
    desired_replicas: dict[str, float]  # pool -> instances it needs
    window: dict[str, float]  # requests_per_s, isl_tokens, osl_tokens, requests
    role_flips: float


class FlipInterval(msgspec.Struct, frozen=True, kw_only=True):
    """One flip, from closing the old role to opening the new one (wall-clock seconds)."""

    instance: str
    from_role: str
    to_role: str
    start_s: float
    end_s: float | None  # None: still draining when the log ended


def role_sample(at_s: float, text: str) -> RoleSample:
    """The controller's state in one page of Prometheus text; pure."""
    samples = parse_samples(text)
    open_roles: dict[str, set[str]] = {}
    desired, window = {}, {}
    for (name, labels), value in samples.items():
        tags = dict(labels)
        if name == _ROLE:
            roles = open_roles.setdefault(tags["instance"], set())
            if value == 1:
                roles.add(tags["role"])
        elif name == _DESIRED:
            desired[tags["pool"]] = value
        elif name == _WINDOW:
            window[tags["stat"]] = value
    return RoleSample(at_s=at_s, roles={url: _role_name(roles) for url, roles in sorted(open_roles.items())},
                      desired_replicas=desired, window=window, role_flips=metric_sum(samples, _FLIPS))


def _role_name(open_roles: set[str]) -> str:
    if len(open_roles) == 1:
        return next(iter(open_roles))
    return "both" if open_roles else "draining"


async def poll(url: str, stop: asyncio.Event, interval_s: float = 1.0) -> list[RoleSample]:
    """Sample ``url``/metrics every ``interval_s`` until ``stop`` is set (a failed page is skipped)."""
    out: list[RoleSample] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while not stop.is_set():
            try:
                async with session.get(url + "/metrics") as resp:
                    out.append(role_sample(time.time(), await resp.text()))
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            try:
                await asyncio.wait_for(stop.wait(), interval_s)
            except asyncio.TimeoutError:
                pass
    return out


def flips(log_text: str) -> list[FlipInterval]:
    """Every flip in a router log, in order, each closed by the first "now serves" line of its instance."""
    ends = [(_log_time(m[1]), m[2], m[3]) for m in _FLIP_END.finditer(log_text)]
    out = []
    for m in _FLIP_START.finditer(log_text):
        start_s, instance, to_role = _log_time(m[1]), m[2], m[4]
        end = next((e for e in ends if e[1] == instance and e[2] == to_role and e[0] >= start_s), None)
        if end is not None:
            ends.remove(end)
        out.append(FlipInterval(instance=instance, from_role=m[3], to_role=to_role, start_s=start_s,
                                end_s=None if end is None else end[0]))
    return out


def _log_time(text: str) -> float:
    """A ``logging`` asctime (local time, milliseconds) as epoch seconds, like ``time.time()``."""
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def in_flight_during(start_s: float, end_s: float, intervals: Sequence[FlipInterval], run_end_s: float) -> bool:
    """Whether a request that ran from ``start_s`` to ``end_s`` overlapped any flip's drain."""
    return any(start_s < (f.end_s if f.end_s is not None else run_end_s) and end_s > f.start_s for f in intervals)
