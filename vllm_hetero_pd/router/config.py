"""Router configuration: frozen msgspec Structs, built from CLI flags or a validated YAML file.

Everything the router may talk to is listed here; no request can add an address. Unknown keys
are rejected (``forbid_unknown_fields``) so a typo in ``router.yaml`` fails at start-up instead of
silently falling back to a default.
"""

from __future__ import annotations

import enum
from pathlib import Path
from urllib.parse import urlsplit

import msgspec


class ConfigError(ValueError):
    """A router option is invalid; the message names the option and how to fix it."""


class Role(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


class Policy(str, enum.Enum):
    """How a pool picks an instance (see ``policy.py``)."""

    ROUND_ROBIN = "round_robin"
    LEAST_WORK = "least_work"
    KV_AWARE = "kv_aware"  # prefill: cached prefix vs pending work; decode: load and KV capacity (scoring.py)


_USER = dict(frozen=True, kw_only=True, forbid_unknown_fields=True)


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


class InstanceConfig(msgspec.Struct, **_USER):
    """One vLLM server: its base URL (no ``/v1``) and its capacity weight relative to its pool.

    ``kv_events``: the ZMQ endpoint its engine publishes KV cache events on (vLLM's
    ``--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint":
    "tcp://*:5557"}'``, here ``tcp://host:5557``); ``kv_events_replay``: its ``replay_endpoint``,
    used to fetch batches the router missed. Without ``kv_events`` the router tracks what it sent
    the instance instead. ``kv_format``: a label for the KV format the instance exports or reads
    (for example the connector's ``export_format`` preset); a prefill and a decode with different
    labels pay the decode's translation time, and ``pairs`` rules may forbid the pair.
    ``device`` and ``tp``: the planner catalog device it runs on and its tensor-parallel size, the
    shape the ratio controller sizes it by (``ratio``; default ``ratio.device``).
    """

    url: str
    weight: float = 1.0
    kv_events: str | None = None
    kv_events_replay: str | None = None
    kv_format: str = ""
    device: str | None = None
    tp: int = 1

    def __post_init__(self) -> None:
        check_url(self.url)
        if not self.weight > 0:
            raise ConfigError(f"instance {self.url}: weight must be > 0, got {self.weight}")
        for name in ("kv_events", "kv_events_replay"):
            endpoint = getattr(self, name)
            if endpoint is not None and not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
                raise ConfigError(f"instance {self.url}: {name} {endpoint!r} must be a ZMQ endpoint like "
                                  "tcp://host:5557")
        if self.kv_events_replay is not None and self.kv_events is None:
            raise ConfigError(f"instance {self.url}: kv_events_replay needs kv_events as well")
        if self.tp < 1:
            raise ConfigError(f"instance {self.url}: tp must be >= 1, got {self.tp}")


class PoolConfig(msgspec.Struct, **_USER):
    instances: tuple[InstanceConfig, ...] = ()
    policy: Policy = Policy.LEAST_WORK


class PairRule(msgspec.Struct, **_USER):
    """A fact about prefill->decode pairs. ``prefill``/``decode`` match an instance URL, a
    ``kv_format`` label, or ``*`` (any). ``compatible: false`` means the decode cannot read (or
    translate) that prefill's KV: the pair is never chosen. ``transfer_ms_per_1k_tokens`` is a
    known transfer cost (for example a slow link) used instead of the decode's measured one.
    The first matching rule wins.
    """

    prefill: str = "*"
    decode: str = "*"
    compatible: bool = True
    transfer_ms_per_1k_tokens: float | None = None

    def __post_init__(self) -> None:
        if self.transfer_ms_per_1k_tokens is not None and self.transfer_ms_per_1k_tokens < 0:
            raise ConfigError(f"pairs: transfer_ms_per_1k_tokens must be >= 0, got {self.transfer_ms_per_1k_tokens}")

    def matches(self, prefill_url: str, prefill_format: str, decode_url: str, decode_format: str) -> bool:
        return (self.prefill in ("*", prefill_url, prefill_format)
                and self.decode in ("*", decode_url, decode_format))


class ScoringConfig(msgspec.Struct, **_USER):
    """Weights and inputs of the ``kv_aware`` policies (see ``scoring.py`` and docs/router.md).

    Costs are in prefill-token equivalents. A prefill costs ``(pending + prompt - prefix_weight *
    cached) / weight``; a decode ``decode_weight * (used + needed) / weight`` plus
    ``waiting_penalty_tokens`` per waiting request, and a decode whose KV would pass
    ``kv_high_watermark``, or for which this one request needs more than ``max_request_kv_fraction``
    of its whole KV, is chosen only when every decode would be; a pair adds its expected
    transfer and translation seconds times ``prefill_tokens_per_s * pair_weight``.
    """

    prefix_weight: float = 1.0
    decode_weight: float = 1.0
    pair_weight: float = 1.0
    waiting_penalty_tokens: float = 512.0
    kv_high_watermark: float = 0.9
    max_request_kv_fraction: float = 0.5
    prefill_tokens_per_s: float = 4000.0
    expected_output_tokens: int = 256
    block_size: int = 16
    approx_capacity_blocks: int = 65536
    approx_ttl_s: float = 600.0
    metrics_interval_s: float = 1.0
    resync_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("prefix_weight", "decode_weight", "pair_weight", "waiting_penalty_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"scoring.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.kv_high_watermark <= 1:
            raise ConfigError(f"scoring.kv_high_watermark must be in (0, 1], got {self.kv_high_watermark}")
        if not 0 < self.max_request_kv_fraction <= 1:
            raise ConfigError(f"scoring.max_request_kv_fraction must be in (0, 1], got {self.max_request_kv_fraction}")
        for name in ("prefill_tokens_per_s", "approx_ttl_s", "metrics_interval_s", "resync_s"):
            _positive(f"scoring.{name}", getattr(self, name))
        for name in ("block_size", "approx_capacity_blocks", "expected_output_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"scoring.{name} must be >= 1, got {getattr(self, name)}")


class RatioConfig(msgspec.Struct, **_USER):
    """The ratio controller and the desired-replica gauges (``ratio.py``, ``roles.py``, docs/router.md).

    ``model`` (a planner preset, config.json or model directory, with ``dtype``) and each
    instance's ``device``/``tp`` (default ``device``; catalog devices, ``catalog`` files added)
    give every instance's capacity per role at the observed workload under the SLO
    ``ttft_ms``/``tpot_ms`` at ``quantile``. Every ``interval_s`` the workload of the last
    ``window_s`` (at least ``min_requests`` requests) picks the best prefill:decode split of the
    mixed instances; one flips when that split's load is at least ``min_gain`` (relative) lower,
    the proposal has held ``hold_s``, ``cooldown_s`` passed since the last flip and no instance
    is draining. A flipping instance drains its old role first, for at most ``max_drain_s``.
    ``initial_prefill``: mixed instances that start as prefill (default half). Desired replicas
    per pool: ``ceil(rate x (1 + headroom) / capacity)`` within ``[min_replicas, max_replicas]``.
    """

    model: str
    dtype: str = "auto"
    device: str | None = None
    catalog: tuple[str, ...] = ()
    ttft_ms: float = 2000.0
    tpot_ms: float = 100.0
    quantile: float = 0.9
    window_s: float = 60.0
    min_requests: int = 20
    interval_s: float = 5.0
    hold_s: float = 15.0
    cooldown_s: float = 30.0
    min_gain: float = 0.1
    max_drain_s: float = 120.0
    headroom: float = 0.2
    min_replicas: int = 1
    max_replicas: int = 64
    initial_prefill: int | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms", "window_s", "interval_s", "max_drain_s"):
            _positive(f"ratio.{name}", getattr(self, name))
        for name in ("hold_s", "cooldown_s", "headroom"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ratio.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.min_gain < 1:
            raise ConfigError(f"ratio.min_gain must be in [0, 1), got {self.min_gain}")
        if not 0.5 <= self.quantile < 1:
            raise ConfigError(f"ratio.quantile must be in [0.5, 1), got {self.quantile}")
        if self.min_requests < 1:
            raise ConfigError(f"ratio.min_requests must be >= 1, got {self.min_requests}")
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ConfigError(f"ratio needs 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                              f"{self.min_replicas} and {self.max_replicas}")


class HealthConfig(msgspec.Struct, **_USER):
    """Health probing and ejection.

    An instance is ejected after ``max_failures`` consecutive failures (probes or requests) and
    re-admitted after its first successful probe.
    """

    path: str = "/health"
    interval_s: float = 2.0
    timeout_s: float = 1.0
    max_failures: int = 3

    def __post_init__(self) -> None:
        _positive("health.interval_s", self.interval_s)
        _positive("health.timeout_s", self.timeout_s)
        if self.max_failures < 1:
            raise ConfigError(f"health.max_failures must be >= 1, got {self.max_failures}")


class TimeoutConfig(msgspec.Struct, **_USER):
    """Upstream deadlines, so that no request waits forever on a stuck instance.

    ``connect_s`` bounds opening a connection; ``prefill_s`` bounds a whole prefill call;
    ``decode_total_s`` bounds a whole decode call. For streaming decode, ``decode_first_byte_s``
    bounds the wait for the first SSE event (it includes the KV transfer) and ``decode_idle_s`` the
    silence between two later chunks. A non-streaming decode sends nothing until it is done, so
    only ``decode_total_s`` applies to it.
    """

    connect_s: float = 3.0
    prefill_s: float = 120.0
    decode_first_byte_s: float = 120.0
    decode_idle_s: float = 60.0
    decode_total_s: float = 1800.0

    def __post_init__(self) -> None:
        for name in ("connect_s", "prefill_s", "decode_first_byte_s", "decode_idle_s", "decode_total_s"):
            _positive(f"timeouts.{name}", getattr(self, name))


DEFAULT_MIN_DISAGG_TOKENS = 0


class RouterConfig(msgspec.Struct, **_USER):
    """The whole router: pools, failure handling, security and limits.

    ``min_disagg_tokens``: when the part of a prompt that the chosen decode has not cached is
    shorter than this, the decode prefills it itself (0: never). ``local_prefill_fallback``: when
    no prefill instance can serve a request, let decode prefill locally instead of failing.
    ``max_attempts``: how many instances of one pool a request may try (each at most once).
    ``max_fan_out``: the most P/D exchanges one request may fan out into (prompts of a batch times
    ``n``); each runs concurrently, so this bounds what one request can load the pools with.
    ``api_key``: what clients must send as ``Authorization: Bearer``; ``upstream_api_key``: what the
    router sends to instances started with ``--api-key`` (the client's header is never forwarded).
    ``admin_token``: what admin endpoints require; without it they are disabled.
    ``tokenizer``: the model directory (or its ``tokenizer.json``); with it, prompt lengths and
    prefixes are counted in the engine's tokens, without it estimated (characters / 4).
    ``pairs``: rules about prefill->decode pairs (``PairRule``). ``scoring``: the ``kv_aware``
    weights (``ScoringConfig``). ``mixed``: instances started with ``kv_role: kv_both`` that may
    take either role (each is a candidate in both pools; without ``ratio`` both roles stay open).
    ``ratio``: the ratio controller and desired-replica gauges (``RatioConfig``; off without it).
    """

    prefill: PoolConfig = msgspec.field(default_factory=PoolConfig)
    decode: PoolConfig = msgspec.field(default_factory=PoolConfig)
    mixed: tuple[InstanceConfig, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    upstream_api_key: str | None = None
    admin_token: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    min_disagg_tokens: int = DEFAULT_MIN_DISAGG_TOKENS
    local_prefill_fallback: bool = True
    max_attempts: int = 3
    max_fan_out: int = 64
    tokenizer: str | None = None
    pairs: tuple[PairRule, ...] = ()
    scoring: ScoringConfig = msgspec.field(default_factory=ScoringConfig)
    health: HealthConfig = msgspec.field(default_factory=HealthConfig)
    timeouts: TimeoutConfig = msgspec.field(default_factory=TimeoutConfig)
    ratio: RatioConfig | None = None

    def __post_init__(self) -> None:
        if not self.decode.instances and not self.mixed:
            raise ConfigError("no decode instance: pass --decode URL (or list decode.instances in the config)")
        if not self.prefill.instances and not self.mixed and not self.local_prefill_fallback:
            raise ConfigError(
                "no prefill instance and local_prefill_fallback is off: pass --prefill URL or allow the fallback"
            )
        if self.max_body_bytes < 1024:
            raise ConfigError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.max_fan_out < 1:
            raise ConfigError(f"max_fan_out must be >= 1, got {self.max_fan_out}")
        if self.min_disagg_tokens < 0:
            raise ConfigError(f"min_disagg_tokens must be >= 0, got {self.min_disagg_tokens}")
        if self.api_key is not None and self.api_key == self.admin_token:
            raise ConfigError("api_key and admin_token must differ: a client key must not unlock admin endpoints")
        if self.tokenizer is not None and not (Path(self.tokenizer).is_dir() or Path(self.tokenizer).is_file()):
            raise ConfigError(f"tokenizer {self.tokenizer!r} does not exist; pass the model directory (the one "
                              "holding tokenizer.json)")
        seen: set[str] = set()
        for instance in self.instances:
            if instance.url in seen:
                raise ConfigError(f"instance {instance.url} is listed twice; list each instance once")
            seen.add(instance.url)
        if self.ratio is not None:
            self._check_ratio(self.ratio)

    @property
    def instances(self) -> tuple[InstanceConfig, ...]:
        return (*self.prefill.instances, *self.decode.instances, *self.mixed)

    def _check_ratio(self, ratio: RatioConfig) -> None:
        for instance in self.instances:
            if instance.device is None and ratio.device is None:
                raise ConfigError(f"instance {instance.url}: the ratio controller needs its device; add "
                                  "device=NAME (a planner catalog device such as CPU or H100) or set ratio.device")
        if ratio.initial_prefill is not None and not 0 <= ratio.initial_prefill <= len(self.mixed):
            raise ConfigError(f"ratio.initial_prefill must be between 0 and the {len(self.mixed)} mixed "
                              f"instances, got {ratio.initial_prefill}")


def check_url(url: str) -> None:
    """Accept only ``http(s)://host:port`` base URLs without a path, query or credentials."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"instance URL {url!r} must look like http://host:port")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError(f"instance URL {url!r} must be a base URL like http://host:port (no path such as /v1)")


_INSTANCE_OPTIONS = ("weight", "kv_events", "kv_events_replay", "kv_format", "device", "tp")


def parse_instance(spec: str) -> InstanceConfig:
    """Parse ``URL[,weight=W][,kv_events=tcp://H:P][,kv_events_replay=tcp://H:P][,kv_format=LABEL]
    [,device=NAME][,tp=N]`` as given to ``--prefill``/``--decode``/``--mixed``."""
    url, *options = spec.split(",")
    fields: dict = {}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip()
        if key not in _INSTANCE_OPTIONS or not sep:
            raise ConfigError(f"instance {spec!r}: unknown option {option!r}; options are "
                              + ", ".join(f"{k}=..." for k in _INSTANCE_OPTIONS))
        fields[key] = value.strip()
    if "weight" in fields:
        try:
            fields["weight"] = float(fields["weight"])
        except ValueError:
            raise ConfigError(f"instance {spec!r}: weight {fields['weight']!r} is not a number") from None
    if "tp" in fields:
        if not fields["tp"].isdigit():
            raise ConfigError(f"instance {spec!r}: tp {fields['tp']!r} is not a whole number")
        fields["tp"] = int(fields["tp"])
    return InstanceConfig(url=url.strip().rstrip("/"), **fields)


def load_config(path: str | Path) -> RouterConfig:
    """Read and validate a YAML config; errors name the file and the offending key."""
    try:
        return msgspec.yaml.decode(Path(path).read_bytes(), type=RouterConfig)
    except (msgspec.ValidationError, ConfigError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read router config {path}: {exc.strerror}") from None
