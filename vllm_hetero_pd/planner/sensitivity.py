"""How far a cost ratio moves when the catalog inputs nobody measured move.

Every device field whose source is marked ``[inferred]`` or ``[assumption]`` (and every such TCO
input) is moved, one at a time, to a low and a high value; the ratio is recomputed by a full
search each time. The band is the range over all those moves, and the inputs are ranked by how far
each one swings the ratio (a tornado chart in numbers). The ranges are our choice
[assumption]: prices and capex +-30 %, efficiencies +-20 % (capped at 1), fixed overheads
halved and doubled, NIC rates halved and doubled, TCO inputs +-30 %.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from vllm_hetero_pd.planner.catalog import Catalog, TcoInputs

RANGES = {
    "price_per_hour": (0.7, 1.3), "capex_usd": (0.7, 1.3),
    "bf16_efficiency": (0.8, 1.2), "fp8_efficiency": (0.8, 1.2), "attention_efficiency": (0.8, 1.2),
    "memory_efficiency": (0.8, 1.2), "prefill_overhead_s": (0.5, 2.0), "step_overhead_s": (0.5, 2.0),
    "per_sequence_overhead_s": (0.5, 2.0), "scale_out_gb_s": (0.5, 2.0),
}
TCO_RANGE = (0.7, 1.3)
_UNMEASURED = ("[inferred]", "[assumption]")


class Swing(msgspec.Struct, frozen=True):
    """The ratio with one input at its low and at its high value."""

    input: str  # "Gaudi3.memory_efficiency" or "tco.amortisation_years"
    low: float
    high: float

    @property
    def width(self) -> float:
        return abs(self.high - self.low)


class Band(msgspec.Struct, frozen=True):
    """A ratio, its range over every one-at-a-time move, and the moves ranked by swing."""

    base: float
    low: float
    high: float
    swings: list[Swing]

    def describe(self, top: int = 3) -> str:
        movers = ", ".join(f"{s.input} {s.low:.2f}-{s.high:.2f}x" for s in self.swings[:top])
        return f"{self.base:.2f}x (band {self.low:.2f}-{self.high:.2f}x; moved most by {movers})"


def _unmeasured(source: str) -> bool:
    return any(tag in source for tag in _UNMEASURED)


def uncertain_inputs(catalog: Catalog, devices: set[str], tco: bool) -> list[tuple[str, str]]:
    """(device or "tco", field) of every unmeasured input the ratio can depend on."""
    out = [(name, field) for name in sorted(devices) for field in RANGES
           if field in catalog.devices[name].sources and _unmeasured(catalog.devices[name].sources[field])
           and (tco or field != "capex_usd") and not (tco and field == "price_per_hour")]
    if tco and catalog.tco is not None:
        out += [("tco", f) for f, source in sorted(catalog.tco.sources.items()) if _unmeasured(source)]
    return out


def moved(catalog: Catalog, where: str, field: str, factor: float) -> Catalog:
    """``catalog`` with one input scaled by ``factor`` (efficiencies capped at 1)."""
    if where == "tco":
        tco: TcoInputs = catalog.tco
        scaled = msgspec.structs.replace(tco, **{field: getattr(tco, field) * factor})
        return msgspec.structs.replace(catalog, tco=scaled)
    dev = catalog.devices[where]
    value = getattr(dev, field) * factor
    if field.endswith("efficiency"):
        value = min(value, 1.0)
    devices = {**catalog.devices, where: msgspec.structs.replace(dev, **{field: value})}
    return msgspec.structs.replace(catalog, devices=devices)


def band(ratio: Callable[[Catalog], float], catalog: Catalog, devices: set[str], tco: bool = False) -> Band:
    """``ratio(catalog)`` and its band when each unmeasured input of ``devices`` moves in turn.

    ``catalog`` is the rental catalog; in TCO mode ``ratio`` applies ``Catalog.owned`` itself, so
    capex and the TCO inputs can be moved before ownership costs are computed.
    """
    swings = []
    for where, field in uncertain_inputs(catalog, devices, tco):
        lo, hi = TCO_RANGE if where == "tco" else RANGES[field]
        swings.append(Swing(f"{where}.{field}", ratio(moved(catalog, where, field, lo)),
                            ratio(moved(catalog, where, field, hi))))
    base = ratio(catalog)
    values = [base] + [v for s in swings for v in (s.low, s.high)]
    return Band(base=base, low=min(values), high=max(values), swings=sorted(swings, key=lambda s: -s.width))
