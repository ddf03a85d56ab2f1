"""Hardware catalog: accelerators, their prices and efficiencies, and the KV links between them.

The shipped catalog (``hardware.yaml`` beside this module) is data, not code: every number in it
carries a source so a reader can check it, and users replace or add devices with ``--catalog``
files of the same schema (``vllm-hetero-pd calibrate`` writes one). A device entry in a later file
replaces the entry of the same name; links are looked up most-specific first.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec

SHIPPED_CATALOG = Path(__file__).with_name("hardware.yaml")

# Numeric Device fields that must each name a source in ``Device.sources``.
_SOURCED_FIELDS = (
    "bf16_tflops", "fp8_tflops", "hbm_gb", "hbm_tb_s", "scale_up_gb_s", "scale_out_gb_s",
    "tdp_w", "price_per_hour", "bf16_efficiency", "fp8_efficiency", "attention_efficiency", "memory_efficiency",
    "prefill_overhead_s", "step_overhead_s", "per_sequence_overhead_s", "max_tp",
)


class CatalogError(ValueError):
    """A catalog file is malformed or inconsistent; the message names the file and field."""


class Device(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One accelerator (or a CPU socket) as the performance model sees it.

    Efficiencies scale the datasheet peaks to what kernels reach (matmul efficiency for compute,
    achieved/peak for HBM reads); overheads are the fixed per-forward costs a roofline misses
    (kernel launches, scheduling, sampling). ``kv_format`` names the KV byte layout the device's
    vLLM backend writes: two devices with different formats need the format shim between them.
    """

    name: str
    vendor: str
    kv_format: str
    bf16_tflops: float
    fp8_tflops: float
    hbm_gb: float
    hbm_tb_s: float
    scale_up_gb_s: float
    scale_out_gb_s: float
    tdp_w: float
    price_per_hour: float
    bf16_efficiency: float
    fp8_efficiency: float
    attention_efficiency: float
    memory_efficiency: float
    prefill_overhead_s: float
    step_overhead_s: float
    per_sequence_overhead_s: float
    max_tp: int
    sources: dict[str, str]
    fp4_tflops: float = 0.0  # dense FP4 (MXFP4/NVFP4) peak; 0 = no FP4 units, 4-bit weights run at BF16
    capex_usd: float = 0.0  # purchase price of one accelerator, for --cost tco; 0 = unknown

    def __post_init__(self) -> None:
        missing = [f for f in _SOURCED_FIELDS if not self.sources.get(f, "").strip()]
        missing += [f for f in ("fp4_tflops", "capex_usd") if getattr(self, f) and not self.sources.get(f, "").strip()]
        if missing:
            raise CatalogError(f"device {self.name}: no source for {', '.join(missing)}; "
                               "add a 'sources: {field: where the number comes from}' entry for each")
        for f in ("bf16_tflops", "hbm_gb", "hbm_tb_s", "scale_out_gb_s", "price_per_hour"):
            if getattr(self, f) <= 0:
                raise CatalogError(f"device {self.name}: {f} must be > 0, got {getattr(self, f)}")
        for f in ("bf16_efficiency", "fp8_efficiency", "attention_efficiency", "memory_efficiency"):
            if not 0 < getattr(self, f) <= 1:
                raise CatalogError(f"device {self.name}: {f} must be in (0, 1], got {getattr(self, f)}")
        for f in ("prefill_overhead_s", "step_overhead_s", "per_sequence_overhead_s", "fp8_tflops"):
            if getattr(self, f) < 0:
                raise CatalogError(f"device {self.name}: {f} must be >= 0, got {getattr(self, f)}")
        if self.max_tp < 1:
            raise CatalogError(f"device {self.name}: max_tp must be >= 1, got {self.max_tp}")

    def peak_flops(self, precision: str) -> float:
        """Achievable matmul FLOP/s at ``precision`` ("fp4", "fp8", "bf16"). A device without units
        for it runs weight-only kernels that dequantize to BF16 (Marlin-style W4A16/W8A16)
        [inferred]; FP4 reuses the FP8 efficiency [inferred: no public FP4 MAMF]."""
        if precision == "fp4" and self.fp4_tflops > 0:
            return self.fp4_tflops * 1e12 * self.fp8_efficiency
        if precision == "fp8" and self.fp8_tflops > 0:
            return self.fp8_tflops * 1e12 * self.fp8_efficiency
        return self.bf16_tflops * 1e12 * self.bf16_efficiency

    @property
    def attention_flops(self) -> float:
        """Achievable FLOP/s of attention (QK^T, AV), which runs on BF16 activations."""
        return self.bf16_tflops * 1e12 * self.attention_efficiency

    @property
    def memory_bytes_s(self) -> float:
        """Achievable HBM read bandwidth in bytes/s."""
        return self.hbm_tb_s * 1e12 * self.memory_efficiency


class Link(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """KV transfer path from a prefill vendor to a decode vendor ("*" matches any).

    ``gb_s`` is per device lane: a TP-t prefill instance sends its t KV shards in parallel, so
    the instance moves ``min(t_prefill, t_decode) * gb_s``. ``shim_gb_s`` is the rate at which the
    format shim rewrites bytes when the two ends' ``kv_format`` differ.
    """

    prefill_vendor: str
    decode_vendor: str
    gb_s: float
    latency_s: float
    shim_gb_s: float
    source: str

    def __post_init__(self) -> None:
        if self.gb_s <= 0 or self.shim_gb_s <= 0 or self.latency_s < 0:
            raise CatalogError(f"link {self.prefill_vendor}->{self.decode_vendor}: gb_s and shim_gb_s "
                               "must be > 0 and latency_s >= 0")
        if not self.source.strip():
            raise CatalogError(f"link {self.prefill_vendor}->{self.decode_vendor}: empty source")


HOURS_PER_YEAR = 8760


class TcoInputs(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What owning an accelerator costs per hour besides its price, for ``--cost tco``.

    Hourly cost = capital recovery of ``capex x (1 + system_capex_fraction)`` over
    ``amortisation_years`` at ``cost_of_capital`` (an annuity), + energy of ``(TDP x
    power_utilisation + host_power_w) x pue`` at ``usd_per_kwh``, + facility rent of the
    provisioned ``TDP + host_power_w`` at ``facility_usd_per_kw_month``.
    """

    system_capex_fraction: float  # host, NICs, switches, rack per accelerator, as a fraction of its capex
    amortisation_years: float
    cost_of_capital: float  # per year
    power_utilisation: float  # mean draw / TDP
    host_power_w: float  # per accelerator
    pue: float
    usd_per_kwh: float
    facility_usd_per_kw_month: float
    sources: dict[str, str]

    def __post_init__(self) -> None:
        missing = [f for f in self.__struct_fields__ if f != "sources" and not self.sources.get(f, "").strip()]
        if missing:
            raise CatalogError(f"tco: no source for {', '.join(missing)} (mark assumptions as such)")
        if self.amortisation_years <= 0 or self.pue < 1 or min(self.cost_of_capital, self.usd_per_kwh) < 0:
            raise CatalogError("tco: amortisation_years must be > 0, pue >= 1, cost_of_capital and usd_per_kwh >= 0")

    def per_hour(self, device: Device) -> float:
        """$/h of owning and running one ``device``."""
        if device.capex_usd <= 0:
            raise CatalogError(f"device {device.name} has no capex_usd for --cost tco; add one with --catalog")
        r, n = self.cost_of_capital, self.amortisation_years
        annuity = r / (1 - (1 + r) ** -n) if r > 0 else 1 / n
        capital = device.capex_usd * (1 + self.system_capex_fraction) * annuity / HOURS_PER_YEAR
        draw_kw = (device.tdp_w * self.power_utilisation + self.host_power_w) / 1e3
        energy = draw_kw * self.pue * self.usd_per_kwh
        facility = (device.tdp_w + self.host_power_w) / 1e3 * self.facility_usd_per_kw_month * 12 / HOURS_PER_YEAR
        return capital + energy + facility


class CatalogFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The schema of one catalog YAML/JSON file."""

    version: str = ""  # when the numbers were last reviewed; --json reports it with the file
    tco: TcoInputs | None = None
    devices: list[Device] = []
    links: list[Link] = []


class Catalog(msgspec.Struct, frozen=True, kw_only=True):
    """Merged view of the shipped catalog and user files."""

    devices: dict[str, Device]
    links: list[Link]
    versions: dict[str, str] = {}  # file -> its version string, in load order
    tco: TcoInputs | None = None

    def owned(self, overrides: dict[str, float] | None = None) -> Catalog:
        """The catalog with every price replaced by its owned-hardware TCO per hour, after
        ``overrides`` (TCO input -> value, from ``--tco``)."""
        if self.tco is None:
            raise CatalogError("--cost tco needs a 'tco:' section in a catalog file")
        overrides = overrides or {}
        inputs = [f for f in TcoInputs.__struct_fields__ if f != "sources"]
        unknown = sorted(set(overrides) - set(inputs))
        if unknown:
            raise CatalogError(f"--tco {', '.join(unknown)}: not a TCO input; known: {', '.join(inputs)}")
        tco = msgspec.structs.replace(self.tco, **overrides, sources={
            **self.tco.sources, **{k: "--tco on the command line" for k in overrides}})
        devices = {n: msgspec.structs.replace(d, price_per_hour=tco.per_hour(d), sources={
            **d.sources, "price_per_hour": f"TCO: capex {d.sources['capex_usd']} + power + facility (catalog tco)"})
            for n, d in self.devices.items()}
        return msgspec.structs.replace(self, devices=devices, tco=tco)

    def digest(self) -> str:
        """SHA-256 of the merged numbers, so two reports can tell whether they used the same inputs."""
        return hashlib.sha256(msgspec.json.encode([self.devices, self.links])).hexdigest()[:16]

    def device(self, name: str) -> Device:
        """Look up a device by name, case-insensitively; unknown names list the known ones."""
        for key, dev in self.devices.items():
            if key.lower() == name.lower():
                return dev
        raise CatalogError(f"unknown device {name!r}; known devices: {', '.join(self.devices)} "
                           "(add new ones with --catalog FILE)")

    def link(self, prefill: Device, decode: Device) -> Link:
        """Most specific link for a vendor pair: exact, then prefill-only, decode-only, "*"->"*"."""
        for want in ((prefill.vendor, decode.vendor), (prefill.vendor, "*"),
                     ("*", decode.vendor), ("*", "*")):
            for link in reversed(self.links):  # later files win
                if (link.prefill_vendor, link.decode_vendor) == want:
                    return link
        raise CatalogError(f"no KV link from {prefill.vendor} to {decode.vendor}; "
                           "add a links entry (prefill_vendor/decode_vendor may be '*')")


def read_catalog_file(path: Path) -> CatalogFile:
    """Decode one YAML or JSON catalog file; errors name the file and the offending field."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CatalogError(f"cannot read catalog {path}: {e.strerror}") from e
    try:
        if path.suffix == ".json":
            return msgspec.json.decode(raw, type=CatalogFile)
        return msgspec.yaml.decode(raw, type=CatalogFile)
    except (msgspec.ValidationError, msgspec.DecodeError, CatalogError) as e:
        raise CatalogError(f"catalog {path}: {e}") from e


def load_catalog(extra_paths: list[Path] = ()) -> Catalog:
    """The shipped catalog with each file in ``extra_paths`` layered on top, in order."""
    devices: dict[str, Device] = {}
    links: list[Link] = []
    versions: dict[str, str] = {}
    tco = None
    for path in (SHIPPED_CATALOG, *extra_paths):
        part = read_catalog_file(Path(path))
        devices.update((d.name, d) for d in part.devices)
        links.extend(part.links)
        versions[str(path)] = part.version
        tco = part.tco or tco
    return Catalog(devices=devices, links=links, versions=versions, tco=tco)
