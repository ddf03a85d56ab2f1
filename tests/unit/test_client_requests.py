"""The answer comparator the end-to-end tests and ``bench soak`` rely on: it must see real differences."""

from vllm_hetero_pd.testing.client_requests import differences, fold_stream


def test_equal_answers_have_no_differences():
    answer = {"id": "a", "choices": [{"text": "hi", "logprobs": {"top_logprobs": [{" x": -1.0, " y": -2.5}]}}]}
    assert differences(answer, {**answer, "id": "b", "created": 5}) == []


def test_text_token_and_length_differences_are_found():
    assert differences({"text": "abc"}, {"text": "abd"}) == [".text: 'abc' vs 'abd'"]
    assert differences({"ids": [1, 2]}, {"ids": [1, 2, 3]}) == [".ids: 2 items vs 3"]


def test_logprobs_beyond_the_tolerance_differ():
    assert differences({"lp": -1.0}, {"lp": -1.0005}) == []
    assert differences({"lp": -1.0}, {"lp": -1.1}) == [".lp: -1.0 vs -1.1"]


def test_top_k_may_swap_its_last_entry_but_not_its_first():
    assert differences({" x": -1.0, " y": -2.0}, {" x": -1.0, " z": -2.0}) == []
    assert differences({" x": -1.0, " y": -2.0}, {" z": -0.5, " x": -1.0}) == [": top-1 ' x' vs ' z'"]
    assert differences({" x": -1.0, " y": -2.0}, {" x": -1.2, " z": -2.0}) == [". x: -1.0 vs -1.2"]


def test_a_stream_is_folded_per_choice_and_must_end_with_done():
    raw = ('data: {"choices": [{"index": 1, "text": "b"}]}\n\ndata: {"choices": [{"index": 0, "text": "a",'
           ' "finish_reason": "length"}]}\n\ndata: [DONE]\n\n')
    folded = fold_stream(raw)
    assert folded["text"] == {1: "b", 0: "a"} and folded["finish"] == {0: "length"} and folded["done"]
    assert not fold_stream(raw.replace("data: [DONE]", ""))["done"]


def test_an_error_event_in_a_stream_is_kept_and_differs_from_a_clean_stream():
    clean = 'data: {"choices": [{"index": 0, "text": "a"}]}\n\ndata: [DONE]\n\n'
    broken = 'data: {"choices": [{"index": 0, "text": "a"}]}\n\ndata: {"error": {"message": "boom"}}\n\n'
    assert fold_stream(broken)["errors"] == [{"message": "boom"}]
    assert differences(fold_stream(clean), fold_stream(broken)) != []
