"""``ConnectorConfig``: every HeteroNixlConnector option, parsed from ``kv_connector_extra_config``.

Unknown keys are errors, not silently dropped: a typo such as ``lease_secs`` would otherwise run
with the default and fail much later in a way that looks like a transfer bug.
"""

from __future__ import annotations

import os
from typing import Any

import msgspec


class ConfigError(ValueError):
    """An invalid ``kv_connector_extra_config``; the message names the key and the fix."""


class ConnectorConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Options of HeteroNixlConnector (all optional)."""

    backends: list[str] = msgspec.field(default_factory=lambda: ["UCX"])
    """NIXL backends to create, in order of preference."""
    backend_params: dict[str, str] = {}
    """Init parameters for each backend, e.g. {"ucx_error_handling_mode": "none"} with UCX_TLS=sm,self."""
    side_channel_host: str = ""
    """Address the prefill's side channel binds to and advertises; default $VLLM_NIXL_SIDE_CHANNEL_HOST or 127.0.0.1."""
    side_channel_port: int = 0
    """Side-channel TCP port; default $VLLM_NIXL_SIDE_CHANNEL_PORT or 5600 (plus the data-parallel rank)."""
    lease_s: float = 30.0
    """How long a prefill holds a finished request's blocks for its decode; decode heartbeats extend it."""
    heartbeat_s: float = 5.0
    """How often a decode that is still waiting to read renews its lease."""
    transfer_timeout_s: float = 30.0
    """A READ not finished after this long fails the request (vLLM's kv_load_failure_policy applies)."""
    handshake_timeout_s: float = 5.0
    """Per side-channel request (handshake, lease pin, release); these run off the engine's step."""
    side_channel_secret_env: str = ""
    """Name of an environment variable holding a shared secret (>= 16 chars); set it on both sides to
    authenticate handshakes (only peers holding the secret can handshake). Empty: no authentication."""
    staging_mib: int = 256
    """Decode-side staging pool for translated transfers, per remote engine; larger requests go in chunks."""
    max_remote_engines: int = 8
    """Decode side: prefill engines kept connected at once (each may hold a staging pool); the least
    recently used idle one is dropped to make room, and a request beyond that fails with a clear error."""
    remote_idle_s: float = 600.0
    """Decode side: a prefill engine with no transfer for this long is disconnected and its staging freed."""
    export_format: str = ""
    """Prefill only: expose KV in this preset's format (e.g. "cuda/flash_attn/C/LBNHC") instead of the native one."""
    export_block_size: int = 0
    """Block size of the export format; 0 = the preset's default. Must divide the native block size."""
    export_tp_size: int = 1
    """Prefill only, with export_format: expose each rank as this many TP ranks, each holding a slice of its heads."""
    host_staging: bool = False
    """Stage KV through registered host DRAM, for peers whose device memories cannot reach each other:
    a prefill mirrors written blocks into a host buffer that decodes READ; a decode READs into a host
    pool, then copies to its device cache (translating on the way). vLLM's kv_buffer_device="cpu" turns
    it on for an accelerator engine; on CPU engines that is vLLM's default, so only this key does."""
    progress_delay_us: int = 100
    """Poll timeout of NIXL's progress thread; 0 would busy-spin a core per agent."""
    debug_corrupt_transfers: bool = False
    """Negative control for tests: flip the bytes of the first transferred block of every request."""

    def __post_init__(self) -> None:
        positive = ("lease_s", "heartbeat_s", "transfer_timeout_s", "handshake_timeout_s", "staging_mib",
                    "progress_delay_us", "max_remote_engines", "remote_idle_s")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"kv_connector_extra_config.{name} must be > 0, got {getattr(self, name)!r}")
        if self.heartbeat_s >= self.lease_s:
            raise ConfigError(f"kv_connector_extra_config.heartbeat_s ({self.heartbeat_s}) must be shorter than "
                              f"lease_s ({self.lease_s}), or leases expire between heartbeats")
        if not 0 <= self.side_channel_port < 65536:
            raise ConfigError(f"kv_connector_extra_config.side_channel_port {self.side_channel_port} is not a TCP port")
        if not self.backends:
            raise ConfigError("kv_connector_extra_config.backends is empty; use e.g. [\"UCX\"]")
        if self.export_tp_size < 1:
            raise ConfigError(f"kv_connector_extra_config.export_tp_size must be >= 1, got {self.export_tp_size}")
        if self.export_tp_size > 1 and not self.export_format:
            raise ConfigError("kv_connector_extra_config.export_tp_size needs export_format "
                              "(the shards are export areas)")
        if self.export_block_size < 0:
            raise ConfigError("kv_connector_extra_config.export_block_size must be >= 0")

    @property
    def exports(self) -> bool:
        """A prefill mirrors written blocks into a separate registered area (its readers see only that)."""
        return bool(self.export_format) or self.host_staging

    @property
    def host(self) -> str:
        return self.side_channel_host or os.environ.get("VLLM_NIXL_SIDE_CHANNEL_HOST", "127.0.0.1")

    def port(self, dp_rank: int = 0) -> int:
        return (self.side_channel_port or int(os.environ.get("VLLM_NIXL_SIDE_CHANNEL_PORT", "5600"))) + dp_rank


def with_kv_buffer_device(config: ConnectorConfig, kv_buffer_device: str, device_type: str) -> ConnectorConfig:
    """Honour vLLM's own ``kv_buffer_device: "cpu"`` on an accelerator engine (as NixlConnector's
    ``use_host_buffer`` does); on a CPU engine vLLM defaults it to "cpu", so it says nothing there."""
    if kv_buffer_device == "cpu" and device_type != "cpu" and not config.host_staging:
        return msgspec.structs.replace(config, host_staging=True)
    return config


def parse_config(extra: dict[str, Any] | None) -> ConnectorConfig:
    """Validate ``kv_connector_extra_config``; raise ``ConfigError`` naming the offending key."""
    try:
        return msgspec.convert(extra or {}, ConnectorConfig)
    except msgspec.ValidationError as e:
        raise ConfigError(f"invalid kv_connector_extra_config for HeteroNixlConnector: {e}. "
                          f"Valid keys: {', '.join(ConnectorConfig.__struct_fields__)}") from None
