"""Prefix views (router/prefix.py), KV event decoding, prompt tokenisation and /metrics parsing."""

import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_hetero_pd.router.kv_events import apply_batch
from vllm_hetero_pd.router.load import TransferRate, parse_metrics
from vllm_hetero_pd.router.prefix import EventIndex, PrefixView, SentIndex, block_keys, cached_tokens
from vllm_hetero_pd.router.tokens import PromptTokenizer, TokenizerError, prompt_of
from vllm_hetero_pd.testing.fake_backend import FakePrefixCache


def test_block_keys_chain_so_equal_keys_mean_equal_prefixes():
    a = block_keys(list(range(40)), 16)
    b = block_keys(list(range(32)) + [99] * 8, 16)
    c = block_keys([7] + list(range(1, 40)), 16)
    assert len(a) == 2 and a == b  # the partial third block has no key
    assert c[0] != a[0] and c[1] != a[1]  # block 1 is equal, but its prefix is not
    assert block_keys(list(range(40)), 16, salt="s")[0] != a[0]


def test_cached_tokens_never_include_the_last_prompt_token():
    assert cached_tokens(2, 16, 32) == 31
    assert cached_tokens(2, 16, 40) == 32
    assert cached_tokens(0, 16, 40) == 0


def payload(events):
    return msgspec.msgpack.encode([0.0, events, None])


def apply(index_view, events):
    return apply_batch(index_view, payload(events))


def view_with_events():
    view = PrefixView(True, 1000, 60.0, 0.0)
    view.start_sync(0.0, complete=True)
    return view


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5), st.integers(1, 90)), min_size=1, max_size=30),
       st.integers(4, 24))
def test_the_event_index_matches_what_the_engine_caches_without_knowing_its_hash(requests, capacity):
    """The fake engine hashes blocks with sha256 chains; the router re-keys them from the token ids
    in the events, so its longest match equals the engine's cache hit for every prompt."""
    engine = FakePrefixCache(capacity, 4)
    view = view_with_events()
    for system, user, length in requests:
        prompt = [1000 + system] * 12 + [user] * 6 + list(range(length))
        keys = block_keys(prompt, 4)
        predicted = cached_tokens(view.events.match(keys), 4, len(prompt))
        hit, events = engine.lookup_and_store(prompt)
        assert predicted == hit
        apply(view, events)
        assert view.events.num_blocks == len(engine.blocks)


def test_removed_and_cleared_events_forget_blocks():
    view = view_with_events()
    engine = FakePrefixCache(100, 4)
    _, events = engine.lookup_and_store(list(range(16)))
    apply(view, events)
    keys = block_keys(list(range(16)), 4)
    assert view.events.match(keys) == 4
    apply(view, [{"type": "BlockRemoved", "block_hashes": [events[0]["block_hashes"][2]], "medium": "GPU"}])
    assert view.events.match(keys) == 2
    counts = apply(view, [{"type": "AllBlocksCleared"}])
    assert counts["cleared"] == 1 and view.events.num_blocks == 0


def test_events_of_other_groups_media_and_unknown_types_are_skipped():
    view = view_with_events()
    stored = {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None, "token_ids": [1, 2, 3, 4],
              "block_size": 4, "lora_id": None, "medium": "CPU", "lora_name": None}
    counts = apply(view, [stored, {**stored, "medium": "GPU", "group_idx": 1}, {"type": "SomethingNew", "x": 1},
                          {**stored, "medium": "GPU", "future_field": [1, 2]}])
    assert counts == {"stored": 1, "removed": 0, "cleared": 0, "skipped": 3}
    assert view.events.match(block_keys([1, 2, 3, 4], 4)) == 1


def test_a_cache_salt_is_part_of_block_zero_and_lora_blocks_match_no_base_prompt():
    view = view_with_events()
    base = {"type": "BlockStored", "parent_block_hash": None, "token_ids": [1, 2, 3, 4], "block_size": 4,
            "lora_id": None, "medium": None, "lora_name": None}
    apply(view, [{**base, "block_hashes": [b"s"], "extra_keys": [["tenant-a"]]},
                 {**base, "block_hashes": [b"l"], "lora_id": 1, "lora_name": "adapter"}])
    assert view.events.match(block_keys([1, 2, 3, 4], 4)) == 0
    assert view.events.match(block_keys([1, 2, 3, 4], 4, salt="tenant-a")) == 1


def test_blocks_whose_parent_the_index_never_saw_are_orphans():
    index = EventIndex()
    index.stored([b"b"], b"unknown-parent", [1, 2, 3, 4], 4)
    assert index.num_blocks == 0 and index.num_orphans == 1


def test_the_sent_index_expires_and_keeps_its_size_bound():
    sent = SentIndex(capacity=3, ttl_s=10.0)
    sent.add([1, 2], now=0.0)
    assert sent.match([1, 2, 3], now=5.0) == 2
    assert sent.match([1, 2], now=11.0) == 0
    sent.add([1, 2, 3, 4], now=20.0)
    assert sent.num_blocks == 3 and sent.match([1, 2, 3, 4], now=21.0) == 0  # 1 was least recently used


def test_the_view_uses_events_only_while_in_step_and_falls_back_to_what_was_sent():
    view = PrefixView(True, 100, 60.0, resync_s=5.0)
    prompt = list(range(32))
    keys = {16: block_keys(prompt, 16)}
    view.sent.add(keys[16], now=0.0)
    assert view.match(keys.get, 32, True, 16, now=1.0) == (31, "sent")  # no events yet
    view.start_sync(now=1.0, complete=False)  # rebuilding: not trusted for resync_s
    assert view.match(keys.get, 32, True, 16, now=2.0)[1] == "sent"
    view.events.stored([b"a", b"b"], None, prompt, 16)
    assert view.match(keys.get, 32, True, 16, now=7.0) == (31, "events")
    view.lose_sync("gap")
    assert view.events.num_blocks == 0 and view.match(keys.get, 32, True, 16, now=8.0)[1] == "sent"
    view.reset("restart")
    assert view.match(keys.get, 32, True, 16, now=8.0) == (0, "none")


def test_character_blocks_count_as_tokens_when_there_is_no_tokenizer():
    view = PrefixView(False, 100, 60.0, 0.0)
    text = tuple(map(ord, "x" * 200))
    keys = {64: block_keys(text, 64)}
    view.sent.add(keys[64], now=0.0)
    assert view.match(keys.get, 50, False, 64, now=1.0) == (48, "sent")  # 3 blocks of 64 chars = 48 tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small WordLevel tokenizer with a BOS post-processor and a chat template, like a model dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<bos>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>", "hello", "world", "the", "cat", "sat"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    path = tmp_path_factory.mktemp("model")
    tok.save(str(path / "tokenizer.json"))
    template = ("{{ bos_token }} {% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<bos>"}))
    return path


def test_completion_text_gets_special_tokens_and_token_ids_pass_through(model_dir):
    tokenizer = PromptTokenizer(model_dir)
    prompt = prompt_of({"prompt": "the cat sat"}, False, tokenizer)
    assert prompt.exact and prompt.units == (0, 7, 8, 9) and prompt.num_tokens == 4
    assert prompt_of({"prompt": [5, 6]}, False, tokenizer).units == (5, 6)
    assert prompt_of({"prompt": [5, 6], "cache_salt": "t"}, False, None).salt == "t"


def test_chat_renders_the_template_without_adding_special_tokens_twice(model_dir):
    tokenizer = PromptTokenizer(model_dir)
    body = {"messages": [{"role": "user", "content": "hello world"}]}
    prompt = prompt_of(body, True, tokenizer)
    assert prompt.units == (0, 2, 5, 6, 4, 3)
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hello"},
                                                       {"type": "text", "text": "world"}]}]}
    assert prompt_of(parts, True, tokenizer).units == prompt.units  # text parts joined with a newline
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert not prompt_of(image, True, tokenizer).exact


def test_without_a_tokenizer_text_is_estimated_from_characters():
    prompt = prompt_of({"prompt": "x" * 41}, False, None)
    assert not prompt.exact and prompt.num_tokens == 11 and len(prompt.units) == 41


def test_a_missing_tokenizer_names_the_fix(tmp_path):
    with pytest.raises(TokenizerError, match="holding tokenizer.json"):
        PromptTokenizer(tmp_path)


METRICS = """# HELP vllm:kv_cache_usage_perc KV-cache usage.
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
vllm:num_requests_waiting{engine="1",model_name="m"} 1.0
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="100"} 1.0
vllm:hetero_pd_transfer_seconds_sum{engine="0",model_name="m"} 1.5
vllm:hetero_pd_transfer_seconds_bucket{engine="0",le="0.1",model_name="m"} 3.0
process_start_time_seconds 1.7e9
"""


def test_metrics_parsing_reads_only_what_routing_needs():
    sample = parse_metrics(METRICS)
    assert sample.kv_usage == 0.5 and sample.num_waiting == 3 and sample.num_running == 3
    assert sample.capacity_tokens == 1600 and sample.block_size == 16
    assert sample.transfer_s_total == 1.5 and sample.translate_s_total is None and sample.start_time == 1.7e9
    assert parse_metrics("garbage\nnot metrics {").kv_usage is None


def test_transfer_rate_is_seconds_per_token_handed_over_between_scrapes():
    rate = TransferRate()
    rate.update(1.0)
    rate.add_tokens(1000)
    rate.update(1.5)
    assert rate.seconds_per_token == pytest.approx(0.0005)
    rate.update(0.1)  # the decode restarted: its sum went back
    rate.add_tokens(100)
    rate.update(0.2)
    assert rate.seconds_per_token == pytest.approx(0.0005 + 0.3 * (0.001 - 0.0005))
