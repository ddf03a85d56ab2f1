"""Client request parsing and the prefill/decode bodies (router/protocol.py), and router config."""

import argparse
from pathlib import Path

import msgspec
import pytest

from vllm_hetero_pd import kv_params
from vllm_hetero_pd.launch import request as launch_request
from vllm_hetero_pd.router import cli, protocol
from vllm_hetero_pd.router.config import ConfigError, Policy, RouterConfig, load_config, parse_instance
from vllm_hetero_pd.router.protocol import (
    BadRequestError,
    Endpoint,
    PrefillError,
    decode_body,
    fan_out,
    merge_answers,
    parse_request,
    prefill_body,
    read_kv_transfer_params,
)


def parse(body, endpoint=Endpoint.COMPLETIONS):
    return parse_request(msgspec.json.encode(body), endpoint)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("a" * 40, 10), ("abc", 1), ([1, 2, 3, 4, 5], 5), ([[1, 2], [3, 4, 5]], 5), (["a" * 8, "b" * 12], 5)],
)
def test_prompt_tokens_are_estimated_without_a_tokenizer(prompt, expected):
    assert parse({"prompt": prompt}).num_prompt_tokens == expected


def test_chat_tokens_count_text_parts_only():
    body = {"messages": [{"role": "system", "content": "x" * 20},
                         {"role": "user", "content": [{"type": "text", "text": "y" * 8},
                                                      {"type": "image_url", "image_url": {"url": "data:..."}}]},
                         {"role": "assistant", "content": None}]}
    assert parse(body, Endpoint.CHAT).num_prompt_tokens == 5 + 2


@pytest.mark.parametrize(
    ("raw", "endpoint", "message"),
    [
        (b"{not json", Endpoint.COMPLETIONS, "not valid JSON"),
        (b"[1, 2]", Endpoint.COMPLETIONS, "must be a JSON object"),
        (b'{"prompt": "x", "stream": "yes"}', Endpoint.COMPLETIONS, "'stream' must be true or false"),
        (b'{"max_tokens": 3}', Endpoint.COMPLETIONS, "'prompt' must be"),
        (b'{"prompt": []}', Endpoint.COMPLETIONS, "'prompt' must be"),
        (b'{"prompt": [1, "a"]}', Endpoint.COMPLETIONS, "'prompt' must be"),
        (b'{"prompt": "hi"}', Endpoint.CHAT, "'messages' must be"),
        (b'{"messages": [{"content": "x"}]}', Endpoint.CHAT, r"messages\[0\] must be an object with a 'role'"),
        (b'{"messages": [{"role": "user", "content": 5}]}', Endpoint.CHAT, r"messages\[0\].content"),
    ],
)
def test_malformed_requests_are_refused_with_the_field_named(raw, endpoint, message):
    with pytest.raises(BadRequestError, match=message):
        parse_request(raw, endpoint)


def test_client_kv_transfer_params_are_stripped_and_everything_else_passes_through():
    body = {"prompt": "hi", "max_tokens": 7, "seed": 3, "stop": ["\n"], "logprobs": 2, "stream": True,
            "stream_options": {"include_usage": True}, "vendor_field": {"a": 1},
            "kv_transfer_params": {"do_remote_prefill": True, "remote_host": "evil", "remote_block_ids": [[1]]}}
    request = parse(body)
    assert request.stripped_kv_transfer_params
    expected = {k: v for k, v in body.items() if k != "kv_transfer_params"}
    assert msgspec.json.decode(decode_body(request, None)) == expected
    assert msgspec.json.decode(decode_body(request, {"do_remote_prefill": True})) == {
        **expected, "kv_transfer_params": {"do_remote_prefill": True}}


def test_prefill_body_asks_for_one_token_and_remote_decode():
    request = parse({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 50, "min_tokens": 4,
                     "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.5}, Endpoint.CHAT)
    body = prefill_body(request.body)
    assert body["max_tokens"] == 1 and body["max_completion_tokens"] == 1 and body["stream"] is False
    assert "stream_options" not in body and "min_tokens" not in body and body["temperature"] == 0.5
    assert body["kv_transfer_params"] == kv_params.prefill_request_params()
    assert body["kv_transfer_params"]["do_remote_decode"] is True


def test_the_launcher_and_the_router_share_one_prefill_body_and_one_params_protocol():
    assert launch_request.prefill_body is prefill_body
    for module in (launch_request, protocol):
        assert not [name for name in vars(module) if name.endswith("_PARAMS")], module.__name__


def test_prefill_params_are_forwarded_verbatim_whether_ours_or_upstream_nixl():
    ours = kv_params.to_dict(kv_params.TransferParams(
        do_remote_prefill=True, remote_engine_id="e", remote_request_id="r", remote_host="h", remote_port=5600,
        remote_block_ids=[0, 1], remote_num_tokens=20, lease_token="t", prompt_digest="d"))
    upstream = {"do_remote_prefill": True, "remote_engine_id": "e", "remote_block_ids": [[0, 1]], "tp_size": 1}
    for params in (ours, upstream):
        raw = msgspec.json.encode({"choices": [], "kv_transfer_params": params})
        assert read_kv_transfer_params(raw, "http://p:1") == params
        request = parse({"prompt": "hi"})
        assert msgspec.json.decode(decode_body(request, params))["kv_transfer_params"] == params


@pytest.mark.parametrize("prompt", ["one prompt", [1, 2, 3], ["one prompt in a list"], [[1, 2, 3]]])
def test_a_single_prompt_with_n_1_is_not_fanned_out(prompt):
    request = parse({"prompt": prompt, "n": 1, "seed": 3})
    assert fan_out(request, 64) == [request]


def test_a_batch_with_n_fans_out_prompt_major_with_vllms_child_seeds():
    request = parse({"prompt": ["a" * 40, "b" * 8], "n": 2, "seed": 5, "best_of": 2, "max_tokens": 3})
    parts = fan_out(request, 64)
    assert [(p.body["prompt"], p.body["seed"], p.body["n"]) for p in parts] == [
        ("a" * 40, 5, 1), ("a" * 40, 6, 1), ("b" * 8, 5, 1), ("b" * 8, 6, 1)]
    assert [p.num_prompt_tokens for p in parts] == [10, 10, 2, 2]
    assert [p.sample_index for p in parts] == [0, 1, 0, 1]
    assert parts[3].part_label == "prompt 1 of 2, sample 1 of n=2"
    assert all(p.body["max_tokens"] == 3 and "best_of" not in p.body for p in parts)
    token_lists = fan_out(parse({"prompt": [[1, 2], [3]]}), 64)
    assert [(p.body["prompt"], p.num_prompt_tokens, p.part_label) for p in token_lists] == [
        ([1, 2], 2, "prompt 0 of 2"), ([3], 1, "prompt 1 of 2")]
    chat = fan_out(parse({"messages": [{"role": "user", "content": "hi"}], "n": 3}, Endpoint.CHAT), 64)
    assert [p.body["n"] for p in chat] == [1, 1, 1] and all("seed" not in p.body for p in chat)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": "x", "n": 0}, "'n' must be a positive integer, got 0"),
        ({"prompt": "x", "n": "2"}, "'n' must be a positive integer"),
        ({"prompt": "x", "n": True}, "'n' must be a positive integer"),
        ({"prompt": "x", "best_of": 3}, r"'best_of' 3 is not supported unless it equals n \(1\)"),
        ({"prompt": "x", "n": 2, "use_beam_search": True}, "'use_beam_search' with n=2 is not supported"),
        ({"prompt": "x", "n": 2, "seed": "7"}, "'seed' must be an integer"),
        ({"prompt": "x", "n": 2, "temperature": 0}, r"n must be 1 when using greedy sampling, got 2\."),
        ({"prompt": ["a", [1]]}, "'prompt' must be"),
        ({"prompt": [[1], []]}, "'prompt' must be"),
    ],
)
def test_fan_out_fields_that_cannot_be_honoured_are_refused(body, message):
    with pytest.raises(BadRequestError, match=message):
        parse(body)


def test_fan_out_above_max_fan_out_is_refused():
    request = parse({"prompt": ["a", "b", "c"], "n": 2})
    assert len(fan_out(request, 6)) == 6
    with pytest.raises(BadRequestError, match=r"asks for 6 choices \(3 prompts x n=2\).*max_fan_out \(5\)"):
        fan_out(request, 5)


def test_merged_answer_reindexes_choices_and_counts_each_prompt_once():
    parts = fan_out(parse({"prompt": ["a", "b"], "n": 2, "seed": 1}), 64)
    answers = [{"id": f"cmpl-{i}", "created": i, "model": "m", "metrics": {"t": 1},
                "choices": [{"index": 0, "text": f"t{i}"}],
                "usage": {"prompt_tokens": 3 + i // 2, "completion_tokens": 2, "total_tokens": 5 + i // 2}}
               for i in range(4)]
    merged = merge_answers(parts, answers)
    assert merged["id"] == "cmpl-0" and merged["created"] == 0 and "metrics" not in merged
    assert merged["choices"] == [{"index": i, "text": f"t{i}"} for i in range(4)]
    assert merged["usage"] == {"prompt_tokens": 3 + 4, "completion_tokens": 8, "total_tokens": 15}


def test_deeply_nested_json_is_a_bad_request_not_a_crash():
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(BadRequestError, match="nests JSON too deeply"):
        parse_request(deep, Endpoint.COMPLETIONS)
    with pytest.raises(BadRequestError, match="nests JSON too deeply"):
        parse_request(b'{"prompt": "x", "stop": ' + deep + b"}", Endpoint.COMPLETIONS)
    with pytest.raises(PrefillError, match="not a JSON object"):
        read_kv_transfer_params(b'{"kv_transfer_params": ' + deep + b"}", "http://p:1")
    nested: list = []
    for _ in range(100_000):  # decodable from a shallow stack, yet too deep to encode: also a 400
        nested = [nested]
    with pytest.raises(BadRequestError, match="nests JSON too deeply"):
        protocol.encode_body({"prompt": "x", "stop": nested})


@pytest.mark.parametrize("raw", [b"[]", b"{}", b'{"kv_transfer_params": {"do_remote_prefill": false}}', b"oops"])
def test_prefill_answer_without_usable_params_is_a_prefill_error(raw):
    with pytest.raises(PrefillError, match="prefill http://p:1"):
        read_kv_transfer_params(raw, "http://p:1")


def test_instance_specs_parse_with_weights_and_refuse_unknown_options():
    assert parse_instance("http://a:1,weight=2.5").weight == 2.5
    assert parse_instance("http://a:1/").url == "http://a:1"
    with pytest.raises(ConfigError, match="unknown option 'w=2'"):
        parse_instance("http://a:1,w=2")
    with pytest.raises(ConfigError, match="weight must be > 0"):
        parse_instance("http://a:1,weight=0")
    with pytest.raises(ConfigError, match="must look like http://host:port"):
        parse_instance("a:1")


def test_yaml_config_is_validated_with_the_key_named(tmp_path):
    good = tmp_path / "router.yaml"
    good.write_text("prefill:\n  policy: round_robin\n  instances:\n    - {url: 'http://p:1', weight: 2}\n"
                    "decode:\n  instances:\n    - {url: 'http://d:1'}\nhealth: {max_failures: 5}\n")
    config = load_config(good)
    assert config.prefill.policy is Policy.ROUND_ROBIN and config.prefill.instances[0].weight == 2
    assert config.health.max_failures == 5 and config.decode.policy is Policy.LEAST_WORK
    typo = tmp_path / "typo.yaml"
    typo.write_text("decode:\n  instances: [{url: 'http://d:1'}]\nhealth: {max_failure: 5}\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: Object contains unknown field `max_failure` - at `\$.health`"):
        load_config(typo)
    bad_policy = tmp_path / "policy.yaml"
    bad_policy.write_text("decode:\n  policy: fastest\n  instances: [{url: 'http://d:1'}]\n")
    with pytest.raises(ConfigError, match=r"\$.decode.policy"):
        load_config(bad_policy)
    with pytest.raises(ConfigError, match="cannot read router config"):
        load_config(tmp_path / "missing.yaml")


def test_config_checks_cross_field_rules():
    with pytest.raises(ConfigError, match="no decode instance"):
        RouterConfig()
    with pytest.raises(msgspec.ValidationError, match="listed twice"):
        msgspec.convert({"prefill": {"instances": [{"url": "http://a:1"}]},
                         "decode": {"instances": [{"url": "http://a:1"}]}}, RouterConfig)
    with pytest.raises(msgspec.ValidationError, match="api_key and admin_token must differ"):
        msgspec.convert({"decode": {"instances": [{"url": "http://a:1"}]}, "api_key": "k", "admin_token": "k"},
                        RouterConfig)


def test_cli_flags_build_the_config_and_secrets_come_from_the_environment(monkeypatch):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    monkeypatch.setenv("ROUTER_KEY", "sekret")
    args = parser.parse_args(["--prefill", "http://p:1,weight=2", "--prefill", "http://p:2", "--decode", "http://d:1",
                              "--decode-policy", "round_robin", "--api-key-env", "ROUTER_KEY", "--port", "0"])
    config = cli.config_from_args(args)
    assert [i.weight for i in config.prefill.instances] == [2.0, 1.0]
    assert config.decode.policy is Policy.ROUND_ROBIN and config.api_key == "sekret" and config.port == 0
    args = parser.parse_args(["--decode", "http://d:1", "--admin-token-env", "UNSET_VARIABLE_FOR_TEST"])
    with pytest.raises(ConfigError, match="UNSET_VARIABLE_FOR_TEST is empty or unset"):
        cli.config_from_args(args)


def test_cli_refuses_flags_next_to_a_config_file_and_keeps_config_defaults(tmp_path):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    path = tmp_path / "router.yaml"
    path.write_text("decode:\n  instances: [{url: 'http://d:1'}]\nmax_attempts: 5\n")
    config = cli.config_from_args(parser.parse_args(["--config", str(path), "--port", "9000"]))
    assert config.max_attempts == 5 and config.port == 9000
    with pytest.raises(ConfigError, match="drop --max-attempts, --decode-policy"):
        cli.config_from_args(parser.parse_args(["--config", str(path), "--max-attempts", "2",
                                                "--decode-policy", "round_robin"]))
    config = cli.config_from_args(parser.parse_args(["--decode", "http://d:1"]))
    assert config == RouterConfig(decode=config.decode) and config.decode.policy is Policy.LEAST_WORK
    config = cli.config_from_args(parser.parse_args(["--decode", "http://d:1", "--no-local-prefill-fallback",
                                                     "--prefill", "http://p:1", "--health-interval-s", "0.5"]))
    assert config.local_prefill_fallback is False and config.health.interval_s == 0.5


def test_the_yaml_example_in_the_docs_is_a_valid_config(tmp_path):
    docs = (Path(__file__).parents[2] / "docs" / "router.md").read_text()
    example = docs.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "router.yaml").write_text(example)
    config = load_config(tmp_path / "router.yaml")
    assert config.prefill.instances[0].weight == 2.0 and config.admin_token == "admin-secret"
