"""Host-DRAM buffers for staging mode (``host_staging``): where KV waits between device and wire.

Two vendors' device memories cannot in general RDMA each other, but both can reach host DRAM.
A staging prefill mirrors its written blocks into a host buffer and advertises that; a staging
decode READs into a host pool and copies from there into its device cache. Buffers are
page-locked when a CUDA/ROCm device is present, so device copies run as DMA and can be queued
without blocking the engine's thread. On a CPU engine they are plain memory, separate from the
KV cache, so the whole path still runs (and is tested) there.
"""

from __future__ import annotations

import torch

from vllm_hetero_pd.formats.format import KVFormat
from vllm_hetero_pd.shim.translate import KVBuffers, allocate

HOST = torch.device("cpu")


def allocate_host(fmt: KVFormat) -> KVBuffers:
    """A zeroed whole cache in ``fmt`` in host DRAM (page-locked when an accelerator is present)."""
    buffers = allocate(fmt, HOST)
    if not torch.cuda.is_available():
        return buffers
    return tuple(t.pin_memory() for t in buffers) if isinstance(buffers, tuple) else buffers.pin_memory()


def mem_type_of(device: torch.device) -> str:
    """NIXL's memory type for buffers on ``device``."""
    return "DRAM" if device.type == "cpu" else "VRAM"


def device_id_of(device: torch.device) -> int:
    """NIXL's device id for ``device``: the GPU index (0 for host memory)."""
    return device.index or 0
