"""Each instance's capacity per role, from the planner's performance model (``planner/perf.py``).

The one router module that imports the planner: the ratio controller and the desired-replica
gauges must size pools with the same model ``plan`` sizes them with. An instance is a shape
(catalog device, TP); its prefill capacity is ``perf.prefill_capacity`` with the KV going to a
decode of the same shape (exact for a homogeneous pool; a heterogeneous one is sized as if each
prefill fed its own kind), its decode capacity ``perf.decode_capacity``, both at the window's
mean ISL/OSL (rounded to whole tokens) under the router's SLO. Capacities do not depend on the
arrival rate, so they are cached per (shape, ISL, OSL).
"""

from __future__ import annotations

from pathlib import Path

from vllm_hetero_pd.planner import perf
from vllm_hetero_pd.planner.catalog import CatalogError, load_catalog
from vllm_hetero_pd.planner.model import ModelError, load_model
from vllm_hetero_pd.planner.workload import Slo, Workload
from vllm_hetero_pd.router.config import ConfigError, InstanceConfig, RatioConfig
from vllm_hetero_pd.router.ratio import RoleCapacity

_CACHE_ENTRIES = 4096


class CapacityModel:
    """The planner's model of the served model and the catalog's devices, queried per instance shape."""

    def __init__(self, config: RatioConfig) -> None:
        try:
            self.model = load_model(config.model, weight_dtype=config.dtype)
            self.catalog = load_catalog([Path(p) for p in config.catalog])
        except (ModelError, CatalogError) as exc:
            raise ConfigError(f"ratio: {exc}") from None
        self.default_device = config.device
        self.slo = Slo(ttft_s=config.ttft_ms / 1e3, tpot_s=config.tpot_ms / 1e3, quantile=config.quantile)
        self._cache: dict[tuple[str, int, int, int], RoleCapacity] = {}

    def check(self, instances: tuple[InstanceConfig, ...]) -> None:
        """Fail at start-up, naming the instance, when its device is not in the catalog."""
        for instance in instances:
            try:
                self.catalog.device(self.device_of(instance))
            except CatalogError as exc:
                raise ConfigError(f"instance {instance.url}: {exc}") from None

    def device_of(self, instance: InstanceConfig) -> str:
        return instance.device or self.default_device

    def capacity(self, instance: InstanceConfig, isl: float, osl: float) -> RoleCapacity:
        """Requests/s the instance sustains within the SLO as a prefill and as a decode."""
        key = (self.device_of(instance), instance.tp, max(1, round(isl)), max(1, round(osl)))
        found = self._cache.get(key)
        if found is None:
            if len(self._cache) >= _CACHE_ENTRIES:
                self._cache.clear()
            found = self._cache[key] = self._compute(*key)
        return found

    def price_per_hour(self, instance: InstanceConfig) -> float:
        return self.catalog.device(self.device_of(instance)).price_per_hour * instance.tp

    def _compute(self, device_name: str, tp: int, isl: int, osl: int) -> RoleCapacity:
        device = self.catalog.device(device_name)
        workload = Workload(isl=isl, osl=osl, rate=1.0)  # capacities are rates; this one is not used
        if self.model.max_context is not None and isl + osl > self.model.max_context:
            return RoleCapacity(prefill=0.0, decode=0.0)
        prefill = perf.prefill_capacity(self.model, device, tp, workload, self.slo, self.catalog.link(device, device),
                                        perf.endpoint(device, tp))
        decode = perf.decode_capacity(self.model, device, tp, workload, self.slo)
        return RoleCapacity(prefill=prefill.rate, decode=decode.rate)
