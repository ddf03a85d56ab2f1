"""Compare greedy completions of two deployments: token ids exactly, top-k logprobs within a tolerance.

A disaggregated run is correct when it produces what a monolithic engine on the same model
produces. Token ids must match exactly, and top-k logprobs within ``LOGPROB_TOLERANCE``.
This module only parses and compares; ``launch.greedy`` runs the requests against live instances.
"""

from __future__ import annotations

from typing import Any

import msgspec

LOGPROB_TOLERANCE = 1e-3
"""Largest |Δ logprob| accepted between a disaggregated and a monolithic run.

vLLM's CPU backend runs these checkpoints in bfloat16 (it downcasts float32 ones). With the right
KV bytes the decode engine repeats the monolithic engine's arithmetic, so outputs come out
bit-identical (Δ = 0.0 measured with one OpenMP thread per engine); the margin only admits
reduction-order noise. Wrong KV moves logprobs by 1e-1 or more and usually changes the ids."""


class Completion(msgspec.Struct, frozen=True):
    """What one greedy request produced: sampled ids and, per position, the top-k {token: logprob}."""

    token_ids: list[int]
    top_logprobs: list[dict[str, float]]


class Mismatch(msgspec.Struct, frozen=True):
    """One prompt whose candidate output differs from the reference, and how."""

    prompt_index: int
    reason: str


def greedy_body(prompt: list[int], max_tokens: int = 32, logprobs: int = 5) -> dict[str, Any]:
    """A deterministic request: greedy, fixed length (``ignore_eos``), ids and top-k logprobs returned."""
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "logprobs": logprobs,
            "ignore_eos": True, "return_token_ids": True, "return_tokens_as_token_ids": True}


def parse_completion(answer: dict[str, Any]) -> Completion:
    """The ids and top-k logprobs of an OpenAI completions answer to ``greedy_body``."""
    choice = answer["choices"][0]
    top = choice["logprobs"]["top_logprobs"]
    return Completion(token_ids=list(choice["token_ids"]), top_logprobs=[dict(t) for t in top])


def compare(reference: list[Completion], candidate: list[Completion], tolerance: float) -> list[Mismatch]:
    """Every difference that matters: ids, top-k token sets, and logprob deltas above ``tolerance``."""
    out = []
    for i, (ref, got) in enumerate(zip(reference, candidate, strict=True)):
        if ref.token_ids != got.token_ids:
            first = next(j for j, (a, b) in enumerate(zip(ref.token_ids, got.token_ids)) if a != b)
            out.append(Mismatch(i, f"token ids differ from position {first}: {ref.token_ids[first]} vs "
                                   f"{got.token_ids[first]}"))
            continue
        delta = max_logprob_delta(ref, got)
        if delta > tolerance:
            out.append(Mismatch(i, f"top logprobs differ by {delta:.3g} > tolerance {tolerance:g}"))
    return out


def compare_batched(reference: list[Completion], candidate: list[Completion], tolerance: float
                    ) -> tuple[list[Mismatch], list[int]]:
    """``compare`` for answers computed in different batches (vLLM's ``check_logprobs_close`` rule).

    Batched with other requests, the same model's logprobs move within ``tolerance`` and a near tie
    can flip the greedy id. Up to the first differing id the top logprobs must agree within
    ``tolerance``; at that id each side's token must be in the other's top-k, within ``tolerance`` of
    that side's top logprob, and the rest is not compared (the two go on from different text).
    Returns the mismatches and the indices of the answers that diverged at such a near tie."""
    out, near_ties = [], []
    for i, (ref, got) in enumerate(zip(reference, candidate, strict=True)):
        first = next((j for j, (a, b) in enumerate(zip(ref.token_ids, got.token_ids)) if a != b), None)
        agreed = first if first is not None else len(ref.token_ids)
        delta = max_logprob_delta(Completion(ref.token_ids[:agreed], ref.top_logprobs[:agreed]),
                                  Completion(got.token_ids[:agreed], got.top_logprobs[:agreed]))
        if delta > tolerance:
            out.append(Mismatch(i, f"top logprobs differ by {delta:.3g} > tolerance {tolerance:g}"))
        elif first is not None:
            if _near_tie(ref, got, first, tolerance) and _near_tie(got, ref, first, tolerance):
                near_ties.append(i)
            else:
                out.append(Mismatch(i, f"token ids differ from position {first}: {ref.token_ids[first]} vs "
                                       f"{got.token_ids[first]}, not a near tie within {tolerance:g}"))
    return out, near_ties


def _near_tie(a: Completion, b: Completion, position: int, tolerance: float) -> bool:
    """``b``'s token at ``position`` is in ``a``'s top-k there, within ``tolerance`` of ``a``'s top logprob."""
    top = a.top_logprobs[position]
    other = top.get(f"token_id:{b.token_ids[position]}")
    return other is not None and max(top.values()) - other <= tolerance


def max_logprob_delta(ref: Completion, got: Completion) -> float:
    """Largest |Δ logprob| over tokens present in both top-k sets; inf if a top-k set changed."""
    worst = 0.0
    for a, b in zip(ref.top_logprobs, got.top_logprobs):
        if set(a) != set(b):
            # near-ties may swap the k-th entry; compare the shared tokens, but the top-1 must agree
            if max(a, key=a.get) != max(b, key=b.get):
                return float("inf")
        for tok in set(a) & set(b):
            worst = max(worst, abs(a[tok] - b[tok]))
    return worst
