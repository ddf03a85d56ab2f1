"""The ``kv_aware`` choice of a prefill->decode pair: pure functions, data in, a decision out.

Costs are in prefill-token equivalents (lower wins), in the spirit of Dynamo's KV router
(``overlap_weight * prefill_blocks + decode_blocks``), extended to pairs:

* prefill ``p``: ``(pending_p + prompt - prefix_weight * cached_p) / weight_p``: the work queued on
  it plus this prompt's part that it has not cached, per unit of capacity. With nothing cached
  this is ``least_work``; ``prefix_weight > 1`` favours cache hits more, 0 ignores them.
* decode ``d``: ``decode_weight * (used_d + needed) / weight_d + waiting_penalty_tokens * waiting_d``,
  with ``used_d`` the KV tokens it holds (from its ``/metrics`` plus what was routed since the last
  scrape, or the router's own count) and ``needed`` this request's prompt plus expected output. A
  decode whose KV would pass ``kv_high_watermark`` of its capacity is *over*: it is chosen only when
  every decode is, and then the one that would be least full, so long requests go where they fit
  before a decode has to preempt. So is a decode for which this one request needs more than
  ``max_request_kv_fraction`` of its whole KV: one such request would leave a small decode no room
  for the next, which then waits in vLLM's queue (measured: vLLM queues rather than preempts).
* pair ``(p, d)``: the seconds to move the part of the prompt ``d`` has not cached (``d``'s
  measured transfer seconds per token, or a ``pairs`` rule's), plus translation seconds when the
  two ``kv_format`` labels differ, times ``prefill_tokens_per_s * pair_weight``. A pair a rule
  marks incompatible is never chosen.

``choose_pair`` minimises ``prefill + pair + decode`` over the compatible pairs. ``min_disagg_tokens``
(llm-d's prefix-based decider) then turns the choice into a local prefill on the chosen decode
when the part of the prompt it has not cached is shorter than that. A mixed instance is a
candidate in both pools; a pair of it with itself moves no KV, and when chosen it prefills
locally (``same_instance``).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from vllm_hetero_pd.router.config import PairRule, ScoringConfig


class PrefillCandidate(msgspec.Struct, frozen=True, kw_only=True):
    url: str
    weight: float
    num_pending_tokens: int
    num_cached_tokens: int = 0
    kv_format: str = ""
    rr_pass: float = 0.0


class DecodeCandidate(msgspec.Struct, frozen=True, kw_only=True):
    """``num_used_tokens``: KV tokens in use now; ``capacity_tokens``: its KV size (None: unknown,
    then no watermark applies); ``transfer_s_per_token``/``translate_s_per_token``: measured (None:
    not yet)."""

    url: str
    weight: float
    num_used_tokens: int
    num_cached_tokens: int = 0
    num_waiting: int = 0
    capacity_tokens: int | None = None
    transfer_s_per_token: float | None = None
    translate_s_per_token: float | None = None
    kv_format: str = ""
    rr_pass: float = 0.0


class DecodeScore(msgspec.Struct, frozen=True, kw_only=True):
    cost: float
    over_watermark: bool
    projected_usage: float | None  # fraction of capacity after this request, None if capacity unknown


class PairScore(msgspec.Struct, frozen=True, kw_only=True):
    prefill: int
    decode: int
    prefill_cost: float
    pair_cost: float
    decode_cost: float
    transfer_s: float

    @property
    def total(self) -> float:
        return self.prefill_cost + self.pair_cost + self.decode_cost


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """The chosen pair (``prefill`` None: the decode prefills locally) and what it was chosen from."""

    decode: int
    prefill: int | None
    local_reason: str | None
    num_prompt_tokens: int
    decode_scores: tuple[DecodeScore, ...]
    pairs: tuple[PairScore, ...]


def prefill_cost(candidate: PrefillCandidate, num_prompt_tokens: int, weights: ScoringConfig) -> float:
    uncached = num_prompt_tokens - weights.prefix_weight * candidate.num_cached_tokens
    return (candidate.num_pending_tokens + uncached) / candidate.weight


def decode_score(candidate: DecodeCandidate, num_needed_tokens: int, weights: ScoringConfig) -> DecodeScore:
    cost = (weights.decode_weight * (candidate.num_used_tokens + num_needed_tokens) / candidate.weight
            + weights.waiting_penalty_tokens * candidate.num_waiting)
    if not candidate.capacity_tokens:
        return DecodeScore(cost=cost, over_watermark=False, projected_usage=None)
    projected = (candidate.num_used_tokens + num_needed_tokens) / candidate.capacity_tokens
    too_big = num_needed_tokens > weights.max_request_kv_fraction * candidate.capacity_tokens
    return DecodeScore(cost=cost, over_watermark=projected > weights.kv_high_watermark or too_big,
                       projected_usage=projected)


def pair_rule(rules: Sequence[PairRule], prefill: PrefillCandidate, decode: DecodeCandidate) -> PairRule | None:
    """The first rule matching the pair, None if none does."""
    return next((r for r in rules if r.matches(prefill.url, prefill.kv_format, decode.url, decode.kv_format)), None)


def compatible(rules: Sequence[PairRule], prefill: PrefillCandidate, decode: DecodeCandidate) -> bool:
    rule = pair_rule(rules, prefill, decode)
    return rule is None or rule.compatible


def transfer_seconds(prefill: PrefillCandidate, decode: DecodeCandidate, num_prompt_tokens: int,
                     rules: Sequence[PairRule]) -> float:
    """Expected seconds to move (and translate) the part of the prompt the decode lacks."""
    if prefill.url == decode.url:
        return 0.0
    num_moved = max(0, num_prompt_tokens - decode.num_cached_tokens)
    rule = pair_rule(rules, prefill, decode)
    if rule is not None and rule.transfer_ms_per_1k_tokens is not None:
        seconds = num_moved * rule.transfer_ms_per_1k_tokens / 1e6
    else:
        seconds = num_moved * (decode.transfer_s_per_token or 0.0)
    if prefill.kv_format != decode.kv_format:
        seconds += num_moved * (decode.translate_s_per_token or 0.0)
    return seconds


def choose_pair(prefills: Sequence[PrefillCandidate], decodes: Sequence[DecodeCandidate], num_prompt_tokens: int,
                num_output_tokens: int, weights: ScoringConfig, rules: Sequence[PairRule] = (),
                min_disagg_tokens: int = 0) -> Decision | None:
    """The cheapest compatible pair, or a local prefill on the best decode; None without any decode.

    Ties go to the lower round-robin pass (prefill first, then decode), so equal instances
    alternate. With no prefill candidate or no compatible one, the best decode prefills locally
    (``local_reason`` says why); the caller decides whether that is allowed.
    """
    if not decodes:
        return None
    needed = num_prompt_tokens + num_output_tokens
    scores = tuple(decode_score(d, needed, weights) for d in decodes)
    pairs: list[PairScore] = []
    for j, decode in enumerate(decodes):
        decode_cost = scores[j].cost
        for i, prefill in enumerate(prefills):
            if not compatible(rules, prefill, decode):
                continue
            seconds = transfer_seconds(prefill, decode, num_prompt_tokens, rules)
            pairs.append(PairScore(prefill=i, decode=j, prefill_cost=prefill_cost(prefill, num_prompt_tokens, weights),
                                   pair_cost=seconds * weights.prefill_tokens_per_s * weights.pair_weight,
                                   decode_cost=decode_cost, transfer_s=seconds))
    if pairs:
        best = min(pairs, key=lambda s: (scores[s.decode].over_watermark, s.total, prefills[s.prefill].rr_pass,
                                         decodes[s.decode].rr_pass))
        decode_index: int = best.decode
        prefill_index: int | None = best.prefill
        reason = None
    else:
        decode_index = min(range(len(decodes)),
                           key=lambda j: (scores[j].over_watermark, scores[j].cost, decodes[j].rr_pass))
        prefill_index = None
        reason = "no_prefill_instance" if not prefills else "no_compatible_prefill"
    uncached_on_decode = num_prompt_tokens - decodes[decode_index].num_cached_tokens
    if prefill_index is not None and uncached_on_decode < min_disagg_tokens:
        prefill_index, reason = None, "short_prompt"
    elif prefill_index is not None and prefills[prefill_index].url == decodes[decode_index].url:
        prefill_index, reason = None, "same_instance"
    return Decision(decode=decode_index, prefill=prefill_index, local_reason=reason,
                    num_prompt_tokens=num_prompt_tokens, decode_scores=scores, pairs=tuple(pairs))


def best_prefill_for(decode: DecodeCandidate, prefills: Sequence[PrefillCandidate], num_prompt_tokens: int,
                     weights: ScoringConfig, rules: Sequence[PairRule] = ()) -> int | None:
    """The cheapest prefill to pair with a decode already chosen (retries); None if none is compatible."""
    costs = [(prefill_cost(p, num_prompt_tokens, weights)
              + transfer_seconds(p, decode, num_prompt_tokens, rules) * weights.prefill_tokens_per_s
              * weights.pair_weight, p.rr_pass, i)
             for i, p in enumerate(prefills) if compatible(rules, p, decode)]
    return min(costs)[2] if costs else None
