"""Side-channel messages and kv_transfer_params: round trips, and fuzzed input yields only typed errors."""

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_hetero_pd.formats.presets import preset
from vllm_hetero_pd.transport import wire

FMT = preset("cpu/cpu_attn/vec").build(num_layers=4, num_blocks=64, num_kv_heads=4, head_size=32, dtype="float32")


def test_handshake_round_trip():
    rank = wire.RankInfo(tp_rank=0, agent_name="a", agent_metadata=b"\x00\x01", format=FMT,
                         layer_addrs=[[1, 2, 3, 4]], mem_type="DRAM")
    reply = wire.HandshakeReply(version=wire.WIRE_VERSION, engine_id="e", ranks=[rank])
    assert wire.decode_reply(wire.encode(reply)) == reply
    assert wire.decode_rank_info(wire.encode(rank)) == rank
    assert wire.decode_request(wire.encode(wire.PinRequest(request_id="r", block_ids=[1]))).block_ids == [1]


@given(st.binary(max_size=256))
def test_fuzzed_frames_raise_only_msgspec_errors(frame):
    for decode in (wire.decode_request, wire.decode_reply):
        try:
            decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass


@given(st.builds(lambda m: m, st.sampled_from([
    wire.HandshakeRequest(), wire.PinRequest(request_id="x", block_ids=[0, 1]), wire.ReleaseRequest(request_id="y")])),
    st.integers(0, 40), st.integers(0, 255))
def test_bit_flipped_requests_raise_only_msgspec_errors(message, position, byte):
    frame = bytearray(wire.encode(message))
    frame[position % len(frame)] = byte
    try:
        wire.decode_request(bytes(frame))
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass


GOOD = {"do_remote_prefill": True, "remote_engine_id": "e", "remote_request_id": "r", "remote_host": "127.0.0.1",
        "remote_port": 5600, "remote_block_ids": [3, 4], "remote_num_tokens": 200, "tp_size": 1}


def test_transfer_params_accepts_what_the_prefill_sends():
    assert wire.parse_transfer_params({**GOOD, "do_remote_decode": False}).remote_block_ids == [3, 4]


@pytest.mark.parametrize("bad, named", [
    ({"remote_port": "x"}, "remote_port"), ({"remote_port": 0}, "remote_port"),
    ({"remote_block_ids": [-1]}, "non-negative"), ({"remote_block_ids": "all"}, "remote_block_ids"),
    ({"remote_num_tokens": 0}, "remote_num_tokens"), ({"remote_engine_id": None}, "remote_engine_id"),
])
def test_malformed_transfer_params_name_the_field(bad, named):
    with pytest.raises(ValueError, match=named):
        wire.parse_transfer_params({**GOOD, **bad})


@given(st.dictionaries(st.sampled_from(list(GOOD) + ["extra"]), st.none() | st.integers() | st.text(max_size=4)
                       | st.lists(st.integers(), max_size=3)))
def test_fuzzed_transfer_params_give_params_or_value_error(params):
    try:
        wire.parse_transfer_params(params)
    except ValueError:
        pass
