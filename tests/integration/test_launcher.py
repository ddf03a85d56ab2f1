"""The launcher's failure paths: a broken instance fails fast with its log; nothing is left behind."""

import socket
import time

import pytest

from vllm_hetero_pd.launch.cluster import LaunchError, LocalCluster
from vllm_hetero_pd.launch.instance import InstanceSpec


def test_crash_at_start_reports_log_tail_within_timeout(tmp_path):
    spec = InstanceSpec(role="monolithic", model=str(tmp_path / "no-such-model"))
    start = time.monotonic()
    with pytest.raises(LaunchError) as err:
        LocalCluster([spec], tmp_path / "logs", startup_timeout_s=240).start()
    assert time.monotonic() - start < 240
    message = str(err.value)
    assert "exited with code" in message and "last lines:" in message
    assert "no-such-model" in message  # vLLM's own complaint about the path, from the log tail


def test_port_in_use_is_refused(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        with pytest.raises(LaunchError, match=f"port {busy} is already in use"):
            LocalCluster([InstanceSpec(role="monolithic", model="x", http_port=busy)], tmp_path).start()


def test_prefill_without_connector_config_is_rejected():
    with pytest.raises(ValueError, match="needs kv_transfer_config"):
        InstanceSpec(role="prefill", model="x")
