"""What one local vLLM instance is: a frozen description, separate from the process that runs it."""

from __future__ import annotations

import json
import sys
from typing import Any, Literal

import msgspec

Role = Literal["prefill", "decode", "both", "monolithic"]  # "both": kv_both, prefills and decodes


class InstanceSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One ``vllm serve`` process on this host. Ports 0 are chosen automatically at launch."""

    role: Role
    model: str
    http_port: int = 0
    side_channel_port: int = 0
    tensor_parallel_size: int = 1
    block_size: int | None = None
    dtype: str | None = None
    kv_transfer_config: dict[str, Any] | None = None
    cpu_cores: str | None = None  # VLLM_CPU_OMP_THREADS_BIND, e.g. "0" or "0|1" for TP 2
    kv_cache_space_gib: float = 1.0  # KV cache in GiB (--kv-cache-memory-bytes)
    env: dict[str, str] = {}
    extra_args: list[str] = []
    python: str | None = None  # interpreter of another environment (e.g. ".venv-028/bin/python"); default: ours

    def __post_init__(self) -> None:
        if self.role != "monolithic" and not self.kv_transfer_config:
            raise ValueError(f"a {self.role} instance needs kv_transfer_config (e.g. a NixlConnector config)")
        if self.block_size is not None and self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")


def hetero_kv_config(role: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``--kv-transfer-config`` for HeteroNixlConnector in ``role`` (kv_producer / kv_consumer / kv_both)."""
    return {"kv_connector": "HeteroNixlConnector", "kv_role": role, "kv_connector_extra_config": extra or {}}


def serve_command(spec: InstanceSpec, http_port: int) -> list[str]:
    """The exact ``vllm serve`` command line for ``spec`` (through our version-fixing wrapper)."""
    cmd = [spec.python or sys.executable, "-m", "vllm_hetero_pd.launch.vllm_cli", "serve", spec.model,
           "--host", "127.0.0.1", "--port", str(http_port), "--enforce-eager",
           "--tensor-parallel-size", str(spec.tensor_parallel_size),
           "--kv-cache-memory-bytes", str(int(spec.kv_cache_space_gib * 2**30))]
    if spec.block_size is not None:
        cmd += ["--block-size", str(spec.block_size)]
    if spec.dtype is not None:
        cmd += ["--dtype", spec.dtype]
    if spec.kv_transfer_config:
        cmd += ["--kv-transfer-config", json.dumps(spec.kv_transfer_config)]
    return cmd + list(spec.extra_args)


# Dropped from the inherited environment: vLLM's legacy whole-GiB KV setting would replace
# ``--kv-cache-memory-bytes`` (and an empty value fails vLLM 0.28's env parsing).
UNSET_ENV = ("VLLM_CPU_KVCACHE_SPACE",)


def serve_env(spec: InstanceSpec, side_channel_port: int, cpu_cores: str) -> dict[str, str]:
    """Per-instance environment: NIXL side channel, thread pinning, NIXL progress delay."""
    env = {
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_OMP_THREADS_BIND": cpu_cores,
        "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
        "VLLM_NIXL_SIDE_CHANNEL_PORT": str(side_channel_port),
        "HETERO_PD_NIXL_PROGRESS_DELAY_US": "100",
        # local instances share cores: a waiting worker naps instead of spinning (connector/mq_spin.py)
        "HETERO_PD_MQ_NAP_S": "0.0001",
        # The progress-delay clamp loads NIXL (and UCX) in the engine core; UCX does not survive a
        # fork, so TP workers must be spawned, not forked (with fork, handshakes with them stall).
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(spec.env)
    return env
