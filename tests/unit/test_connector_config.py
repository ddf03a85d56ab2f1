"""kv_connector_extra_config validation: typos and bad values fail with the key named; fuzzing finds no crash."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_hetero_pd.config import ConfigError, ConnectorConfig, parse_config


def test_defaults_and_overrides():
    assert parse_config(None) == ConnectorConfig()
    cfg = parse_config({"lease_s": 10, "backends": ["UCX"], "backend_params": {"ucx_error_handling_mode": "none"}})
    assert cfg.lease_s == 10 and cfg.backend_params == {"ucx_error_handling_mode": "none"}


@pytest.mark.parametrize("extra, named", [
    ({"lease_secs": 1}, "lease_secs"),
    ({"lease_s": "long"}, "lease_s"),
    ({"lease_s": -1}, "lease_s"),
    ({"heartbeat_s": 60}, "heartbeat_s"),
    ({"side_channel_port": 70000}, "side_channel_port"),
    ({"backends": []}, "backends"),
    ({"staging_mib": 0}, "staging_mib"),
])
def test_bad_values_name_the_key(extra, named):
    with pytest.raises(ConfigError, match=named):
        parse_config(extra)


def test_side_channel_address_from_environment(monkeypatch):
    monkeypatch.setenv("VLLM_NIXL_SIDE_CHANNEL_HOST", "10.1.2.3")
    monkeypatch.setenv("VLLM_NIXL_SIDE_CHANNEL_PORT", "7000")
    cfg = parse_config({})
    assert cfg.host == "10.1.2.3" and cfg.port(dp_rank=2) == 7002
    assert parse_config({"side_channel_port": 6000}).port() == 6000


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=3), max_leaves=8)


@given(st.dictionaries(st.sampled_from(list(ConnectorConfig.__struct_fields__) + ["junk"]), json_values, max_size=5))
def test_fuzzed_config_gives_a_config_or_a_config_error(extra):
    try:
        assert isinstance(parse_config(extra), ConnectorConfig)
    except ConfigError:
        pass
