"""``compare_batched``: near ties may flip a greedy id under batching, anything else is a mismatch."""

from __future__ import annotations

from vllm_hetero_pd.testing.compare import Completion, compare_batched


def completion(ids: list[int], tops: list[dict[int, float]]) -> Completion:
    return Completion(ids, [{f"token_id:{t}": lp for t, lp in top.items()} for top in tops])


REF = completion([1, 2, 3], [{1: -0.5, 9: -2.0}, {2: -1.00, 7: -1.05}, {3: -0.1, 8: -3.0}])


def test_equal_answers_and_small_logprob_moves_pass():
    moved = completion([1, 2, 3], [{1: -0.55, 9: -2.0}, {2: -1.02, 7: -1.06}, {3: -0.1, 8: -3.1}])
    assert compare_batched([REF], [moved], 0.25) == ([], [])


def test_a_flip_at_a_near_tie_is_reported_as_such_and_the_rest_is_not_compared():
    flipped = completion([1, 7, 5], [{1: -0.5, 9: -2.0}, {7: -1.00, 2: -1.04}, {5: -0.1, 6: -9.0}])
    assert compare_batched([REF], [flipped], 0.25) == ([], [0])


def test_a_flip_that_is_no_tie_is_a_mismatch():
    far = completion([9, 2, 3], [{9: -0.5, 1: -2.0}, {2: -1.0}, {3: -0.1}])
    mismatches, near = compare_batched([REF], [far], 0.25)
    assert [m.prompt_index for m in mismatches] == [0] and near == []
    assert "not a near tie" in mismatches[0].reason


def test_logprobs_beyond_the_tolerance_before_any_flip_are_a_mismatch():
    off = completion([1, 2, 3], [{1: -0.9, 9: -2.0}, {2: -1.0, 7: -1.05}, {3: -0.1, 8: -3.0}])
    mismatches, _ = compare_batched([REF], [off], 0.25)
    assert "logprobs differ by 0.4" in mismatches[0].reason
