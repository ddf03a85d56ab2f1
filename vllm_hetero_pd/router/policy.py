"""Pure instance selection: data in, an index out. No clock, no sockets, no globals.

Two policies, both honouring capacity weights (an instance with weight 2 is meant to take twice
the work of one with weight 1, e.g. a B200 prefill instance next to an H100 one):

* ``round_robin`` is stride scheduling: every instance has a ``rr_pass`` that grows by
  ``1/weight`` each time it is picked, and the smallest pass wins. Over any window, picks are
  proportional to weights and spread evenly (no bursts), unlike repeating each instance W times.
* ``least_work`` is join-the-shortest-queue as in Splitwise: prefill instances are compared by
  pending prompt tokens (the work they still have to do), decode instances by active requests
  (decode cost grows with the batch), each divided by the weight. Ties fall back to the
  round-robin pass so equal instances still alternate.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from vllm_hetero_pd.router.config import Policy, Role


class Candidate(msgspec.Struct, frozen=True, kw_only=True):
    """What a policy may know about one eligible instance at the moment of choice."""

    weight: float
    num_pending_tokens: int
    num_active_requests: int
    rr_pass: float


def choose(policy: Policy, role: Role, candidates: Sequence[Candidate], num_prompt_tokens: int) -> int:
    """Return the index in ``candidates`` of the instance that should take the request."""
    assert candidates, "choose() needs at least one candidate"
    if policy is Policy.ROUND_ROBIN:
        return min(range(len(candidates)), key=lambda i: candidates[i].rr_pass)
    if role is Role.PREFILL:
        return min(
            range(len(candidates)),
            key=lambda i: (
                (candidates[i].num_pending_tokens + num_prompt_tokens) / candidates[i].weight,
                candidates[i].rr_pass,
            ),
        )
    return min(
        range(len(candidates)),
        key=lambda i: ((candidates[i].num_active_requests + 1) / candidates[i].weight, candidates[i].rr_pass),
    )
