"""The prefill's export area: host staging mirrors written positions into a separate host buffer
in the native format (or the export preset), exactly, and ``kv_buffer_device`` turns it on only
where vLLM's field means something."""

from __future__ import annotations

import pytest
import torch

from vllm_hetero_pd.config import ConnectorConfig, with_kv_buffer_device
from vllm_hetero_pd.connector.metadata import ExportJob
from vllm_hetero_pd.connector.sender import ExportArea
from vllm_hetero_pd.formats.presets import preset
from vllm_hetero_pd.shim import allocate, decode

NATIVE = preset("cpu/cpu_attn/vec").build(num_layers=2, num_blocks=6, num_kv_heads=2, head_size=32,
                                           dtype="float32", block_size=32)


def filled_cache() -> torch.Tensor:
    cache = allocate(NATIVE)
    cache.copy_(torch.randint(-2**31, 2**31 - 1, cache.shape, dtype=torch.int32).view(cache.dtype))
    return cache


@pytest.mark.parametrize("extra", [{}, {"export_format": "cuda/flash_attn/C/LBNHC", "export_block_size": 16}],
                         ids=["native", "preset"])
def test_host_staging_mirrors_written_positions_exactly_into_its_own_host_buffer(extra):
    cache = filled_cache()
    area = ExportArea(NATIVE, ConnectorConfig(host_staging=True, **extra), torch.device("cpu"))
    shard = area.shards[0]
    if not extra:
        assert shard.format == NATIVE, "host staging alone keeps the native format"
    assert all(t.untyped_storage().data_ptr() != cache.untyped_storage().data_ptr() for t in shard.tensors)
    area.write(cache, ExportJob("r", [4, 1], 0, 50))
    export_ids = [b * area.ratio + j for b in (4, 1) for j in range(area.ratio)]
    k_ref, v_ref = decode(NATIVE, cache, [4, 1], 50)
    k, v = decode(shard.format, shard.buffers, export_ids, 50)
    assert torch.equal(k.view(torch.int32), k_ref.view(torch.int32))
    assert torch.equal(v.view(torch.int32), v_ref.view(torch.int32))
    untouched = [b for b in range(shard.format.num_blocks) if b not in export_ids]
    k_rest, _ = decode(shard.format, shard.buffers, untouched, len(untouched) * shard.format.block_size)
    assert not k_rest.view(torch.int32).any(), "only the job's positions are mirrored"


@pytest.mark.parametrize("buffer_device, device_type, staged", [
    ("cpu", "cuda", True), ("cpu", "hpu", True), ("cuda", "cuda", False),
    ("cpu", "cpu", False),  # vLLM's default on a CPU engine: says nothing
])
def test_kv_buffer_device_cpu_turns_staging_on_only_on_accelerators(buffer_device, device_type, staged):
    assert with_kv_buffer_device(ConnectorConfig(), buffer_device, device_type).host_staging is staged
    assert with_kv_buffer_device(ConnectorConfig(host_staging=True), buffer_device, device_type).host_staging
