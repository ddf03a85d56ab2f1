"""Prefill worker side: expose the KV cache to readers, natively or through an export area.

Usually a decode reads the prefill's own blocks. When the decode cannot read the native
format (or for tests that must produce another vendor's bytes on CPU), the prefill mirrors
every block it writes into a registered *export area* laid out in a configured preset format;
readers then see only that format. Export block ids follow from native ones by a fixed rule
(native block ``b`` holds export blocks ``b*r .. b*r+r-1``), so the scheduler can name them
without asking the workers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import msgspec
import torch

from vllm_hetero_pd.config import ConfigError, ConnectorConfig
from vllm_hetero_pd.connector.host_buffer import allocate_host
from vllm_hetero_pd.connector.metadata import ExportJob
from vllm_hetero_pd.formats.format import KVFormat, LayoutError, head_range
from vllm_hetero_pd.formats.presets import preset
from vllm_hetero_pd.shim.plan import TranslationPlan, plan
from vllm_hetero_pd.shim.translate import allocate, translate, warm_up
from vllm_hetero_pd.transport.block_layout import whole_cache_layer_addrs


@dataclass(frozen=True)
class ExportShard:
    """One exposed rank: the heads it holds, in the export format, in its own registered buffer."""

    format: KVFormat
    plan: TranslationPlan
    buffers: torch.Tensor | tuple[torch.Tensor, torch.Tensor]

    @property
    def tensors(self) -> list[torch.Tensor]:
        return list(self.buffers) if isinstance(self.buffers, tuple) else [self.buffers]

    @property
    def layer_addrs(self) -> list[list[int]]:
        return whole_cache_layer_addrs(self.format, [t.data_ptr() for t in self.tensors])


class ExportArea:
    """The export area of one prefill rank, optionally split into ``num_shards`` head shards.

    Shards make one rank look like ``num_shards`` TP ranks of another engine (each holding a
    slice of the heads, GQA replication included), so a decode's TP resharding (gathering heads
    from several source ranks) can be exercised, and served, from a prefill with fewer ranks.
    With host staging the area lives in host DRAM; without an export format it then holds the
    native format, so the copy is the device-to-host mirror alone.
    """

    def __init__(self, native: KVFormat, config: ConnectorConfig, device: torch.device):
        built = export_format(native, config)
        self.ratio = native.block_size // built.block_size
        self.shards = []
        for r in range(config.export_tp_size):
            try:
                first, count = head_range(native.num_heads, r, config.export_tp_size)
            except LayoutError as e:
                raise ConfigError(f"kv_connector_extra_config.export_tp_size {config.export_tp_size}: {e}") from None
            fmt = msgspec.structs.replace(built, head_start=native.head_start + first, num_heads=count)
            buffers = allocate_host(fmt) if config.host_staging else allocate(fmt, device)
            self.shards.append(ExportShard(fmt, plan([native], fmt), buffers))
            warm_up(self.shards[-1].plan)

    def write(self, kv_caches: Mapping[str, torch.Tensor], job: ExportJob) -> None:
        """Mirror positions ``[job.start, job.stop)`` of a request into its export blocks."""
        export_ids = [b * self.ratio + j for b in job.block_ids for j in range(self.ratio)]
        for shard in self.shards:
            translate(shard.plan, [kv_caches], shard.buffers, src_block_ids=job.block_ids,
                      dst_block_ids=export_ids, start=job.start, stop=job.stop)


def export_format(native: KVFormat, config: ConnectorConfig) -> KVFormat:
    """The whole-cache format readers see: the configured preset at the export block size, or
    (host staging alone) the native format itself."""
    if not config.export_format:
        return native
    try:
        rule = preset(config.export_format)
    except LayoutError as e:
        raise ConfigError(f"kv_connector_extra_config.export_format: {e}") from None
    export_bs = config.export_block_size or rule.block_size
    if native.block_size % export_bs:
        raise ConfigError(f"export_block_size {export_bs} must divide the engine's block size "
                          f"{native.block_size}; pick a divisor or change --block-size")
    return rule.build(num_layers=native.num_layers, num_blocks=native.num_blocks * (native.block_size // export_bs),
                      num_kv_heads=native.num_kv_heads, head_size=native.head_size,
                      head_size_v=native.head_size_v, dtype=native.dtype, block_size=export_bs,
                      k_scales=native.k_scales, v_scales=native.v_scales, layer_names=native.layer_names)
