"""Side-channel messages and kv_transfer_params: round trips, bounds, and fuzzed input yields only typed errors."""

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_hetero_pd import kv_params
from vllm_hetero_pd.formats.presets import preset
from vllm_hetero_pd.transport import wire

FMT = preset("cpu/cpu_attn/vec").build(num_layers=4, num_blocks=64, num_kv_heads=4, head_size=32, dtype="float32")
RANK = wire.RankInfo(tp_rank=0, agent_name="a", agent_metadata=b"\x00\x01", format=FMT, layer_addrs=[[1, 2, 3, 4]],
                     mem_type="DRAM")
PIN = wire.PinRequest(request_id="r", lease_token="t", reader="decode-tp0/00", block_ids=[1])
RELEASE = wire.ReleaseRequest(request_id="y", lease_token="t", reader="decode-tp0/00", num_readers=2)


def test_round_trips():
    reply = wire.HandshakeReply(version=wire.WIRE_VERSION, engine_id="e", ranks=[RANK], mac=b"m" * 32)
    assert wire.decode_reply(wire.encode(reply)) == reply
    assert wire.decode_rank_info(wire.encode(RANK)) == RANK
    request = wire.HandshakeRequest(nonce=b"n" * 16, target="127.0.0.1:5600", mac=b"m" * 32)
    assert wire.decode_request(wire.encode(request)) == request
    assert wire.decode_request(wire.encode(PIN)) == PIN
    assert wire.decode_request(wire.encode(RELEASE)) == RELEASE
    assert wire.decode_reply(wire.encode(wire.PinReply(remaining_s=3.5))).remaining_s == 3.5


def _builtins(message) -> dict:
    return msgspec.to_builtins(message, builtin_types=(bytes,))


@pytest.mark.parametrize("message, field, value", [
    (wire.HandshakeReply(version=2, engine_id="e", ranks=[RANK]), "ranks", []),
    (wire.HandshakeReply(version=2, engine_id="e", ranks=[RANK]), "engine_id", ""),
    (wire.HandshakeReply(version=2, engine_id="e", ranks=[RANK]), "mac", b"m" * 65),
    (RELEASE, "num_readers", 0),
    (RELEASE, "num_readers", 5000),
    (RELEASE, "lease_token", "t" * 129),
    (PIN, "reader", ""),
    (PIN, "block_ids", [-1]),
    (PIN, "block_ids", [2**63]),
])
def test_out_of_bounds_fields_are_refused_at_decode(message, field, value):
    raw = {**_builtins(message), field: value}
    decode = wire.decode_reply if isinstance(message, wire.HandshakeReply) else wire.decode_request
    with pytest.raises(msgspec.ValidationError, match=field):
        decode(msgspec.msgpack.encode(raw))


def test_rank_addresses_beyond_user_space_are_refused():
    raw = _builtins(wire.HandshakeReply(version=2, engine_id="e", ranks=[RANK]))
    raw["ranks"][0]["layer_addrs"][0][0] = 2**64 - 1
    with pytest.raises(msgspec.ValidationError, match="layer_addrs"):
        wire.decode_reply(msgspec.msgpack.encode(raw))


def test_deep_nesting_and_bad_utf8_are_decode_errors():
    with pytest.raises(msgspec.DecodeError, match="nests too deeply"):
        wire.decode_request(b"\x81\xa1x" + b"\x91" * 200_000 + b"\x90")
    with pytest.raises(msgspec.DecodeError):
        wire.decode_request(b"\x81\xa4type\xa2\xff\xfe")


@given(st.binary(max_size=256))
def test_fuzzed_frames_raise_only_msgspec_errors(frame):
    for decode in (wire.decode_request, wire.decode_reply):
        try:
            decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass


@given(st.sampled_from([wire.HandshakeRequest(nonce=b"n" * 16, target="h:1", mac=b"m"), PIN, RELEASE]),
       st.integers(0, 60), st.integers(0, 255))
def test_bit_flipped_requests_raise_only_msgspec_errors(message, position, byte):
    frame = bytearray(wire.encode(message))
    frame[position % len(frame)] = byte
    try:
        wire.decode_request(bytes(frame))
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass


# ---------------------------------------------------------------------------------------------- kv_transfer_params
GOOD = {"do_remote_prefill": True, "remote_engine_id": "e", "remote_request_id": "r", "remote_host": "127.0.0.1",
        "remote_port": 5600, "remote_block_ids": [3, 4], "remote_num_tokens": 20, "lease_token": "tok",
        "prompt_digest": kv_params.prompt_digest(range(20))}


def test_transfer_params_accept_what_the_prefill_sends_and_round_trip():
    params = kv_params.parse_transfer_params({**GOOD, "do_remote_decode": False, "extra": "ignored"})
    assert params.remote_block_ids == [3, 4] and params.lease_token == "tok"
    assert kv_params.parse_transfer_params(kv_params.to_dict(params)) == params


@pytest.mark.parametrize("bad, named", [
    ({"remote_port": "x"}, "remote_port"), ({"remote_port": 0}, "remote_port"),
    ({"remote_block_ids": [-1]}, "non-negative"), ({"remote_block_ids": "all"}, "remote_block_ids"),
    ({"remote_num_tokens": 0}, "remote_num_tokens"), ({"remote_engine_id": None}, "remote_engine_id"),
    ({"lease_token": ""}, "lease_token"), ({"prompt_digest": ""}, "prompt_digest"),
    ({"lease_token": None}, "lease_token"),
])
def test_malformed_transfer_params_name_the_field(bad, named):
    with pytest.raises(ValueError, match=named):
        kv_params.parse_transfer_params({**GOOD, **bad})


@pytest.mark.parametrize("missing", ["lease_token", "prompt_digest"])
def test_params_without_token_or_digest_are_refused(missing):
    """Upstream-style params (no token, no digest) cannot drive a load."""
    params = dict(GOOD)
    del params[missing]
    with pytest.raises(ValueError, match=missing):
        kv_params.parse_transfer_params(params)


def test_prompt_digest_tells_prompts_apart():
    digest = kv_params.prompt_digest
    assert digest([1, 2, 3]) == digest((1, 2, 3)) == digest(range(1, 4))
    assert len({digest([1, 2, 3]), digest([3, 2, 1]), digest([1, 2]), digest([1, 2, 3, 0]), digest([2**40])}) == 5


@given(st.dictionaries(st.sampled_from(list(GOOD) + ["extra"]), st.none() | st.integers() | st.text(max_size=4)
                       | st.lists(st.integers(), max_size=3)))
def test_fuzzed_transfer_params_give_params_or_value_error(params):
    try:
        kv_params.parse_transfer_params(params)
    except ValueError:
        pass
