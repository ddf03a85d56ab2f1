"""Keep NIXL's UCX progress thread from busy-spinning (opt-in, process-wide).

NIXL 1.5.1's Python wrapper sets ``pthrDelay = 0``, so the progress thread polls without
sleeping and burns about one core per agent. vLLM's upstream NixlConnector always enables that
thread; on a 2-core host two idle engines then starve their own forward passes (first prefill
74 s instead of 0.4 s). Setting ``HETERO_PD_NIXL_PROGRESS_DELAY_US`` makes every NIXL agent
created in this process poll with that timeout instead. It is applied from our vLLM plugin
entry point, which runs in every vLLM process, so upstream NixlConnector baselines get it too.
Our own connector does not need the variable: ``NixlAgent`` applies its ``progress_delay_us``
(``kv_connector_extra_config``, default 100) through ``set_progress_delay`` before it creates an agent.
It lives in ``transport`` because ``NixlAgent`` uses it; the plugin entry point imports it lazily.
"""

from __future__ import annotations

import os

from vllm_hetero_pd.log import get_logger

ENV_VAR = "HETERO_PD_NIXL_PROGRESS_DELAY_US"
logger = get_logger(__name__)


def apply_progress_delay_from_env() -> None:
    """Apply ``HETERO_PD_NIXL_PROGRESS_DELAY_US`` if set; a bad value raises rather than spins silently."""
    raw = os.environ.get(ENV_VAR)
    if not raw:
        return
    try:
        delay_us = int(raw)
    except ValueError:
        raise ValueError(f"{ENV_VAR}={raw!r} is not an integer number of microseconds") from None
    if delay_us <= 0:
        raise ValueError(f"{ENV_VAR} must be > 0 microseconds, got {delay_us}")
    set_progress_delay(delay_us)


def set_progress_delay(delay_us: int) -> None:
    """Clamp ``pthrDelay`` on every agent config the NIXL wrapper builds from now on.

    The wrapper assigns ``pthrDelay = 0`` after constructing the config, so the clamp has to sit
    in the attribute's setter, not in ``__init__``.
    """
    try:
        from nixl import _api as api
    except ImportError:
        return  # no NIXL in this process: nothing to tune
    bindings = api.nixlBind
    base = getattr(bindings, "_hetero_pd_original_config", bindings.nixlAgentConfig)
    field = base.pthrDelay

    class DelayedProgressConfig(base):  # type: ignore[misc, valid-type]
        @property
        def pthrDelay(self) -> int:
            return field.__get__(self)

        @pthrDelay.setter
        def pthrDelay(self, value: int) -> None:
            field.__set__(self, max(int(value), delay_us))

    bindings._hetero_pd_original_config = base
    bindings.nixlAgentConfig = DelayedProgressConfig
    logger.debug("NIXL progress thread delay raised to %d us", delay_us)
