"""The plugin registers HeteroNixlConnector with vLLM's factory, idempotently and cheaply."""

import subprocess
import sys

import pytest
from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

import vllm_hetero_pd
from vllm_hetero_pd.connector.version import UnsupportedVllmVersion, check_vllm_version


def test_entry_point_registers_the_name_idempotently():
    vllm_hetero_pd.register()
    vllm_hetero_pd.register()
    cls = KVConnectorFactory.get_connector_class_by_name("HeteroNixlConnector")
    assert cls.__name__ == "HeteroNixlConnector"


def test_module_path_route_resolves_the_same_class():
    config = KVTransferConfig(kv_connector="HeteroNixlConnector", kv_role="kv_consumer",
                              kv_connector_module_path="vllm_hetero_pd.connector")
    assert KVConnectorFactory.get_connector_class(config).__name__ == "HeteroNixlConnector"


def test_import_is_cheap():
    """vLLM resolves the connector in every process: importing the package must not pull in NIXL or torch."""
    code = "import sys, vllm_hetero_pd, vllm_hetero_pd.connector; print('torch' in sys.modules, 'nixl' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("version", ["0.25.0", "0.33.0", "0.34.0", "1.0.0", "banana"])
def test_unsupported_vllm_versions_are_refused_with_the_range(version):
    with pytest.raises(UnsupportedVllmVersion, match=r"supports vLLM 0\.26, .* and 0\.32|cannot parse"):
        check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.26.0", "0.28.0", "0.28.0+cpu", "0.29.0", "0.31.1", "0.32.0", "0.32.0+cpu"])
def test_supported_versions_pass(version):
    check_vllm_version(version)
