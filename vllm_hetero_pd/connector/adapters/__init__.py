"""One module per vLLM KV-connector API: everything that differs between the releases we run on.

The connector core (``scheduler.py``, ``worker.py``, ``receiver.py``, ``leases.py``, the wire
protocol) is the same for every release; a peer of another release is met by ``KVFormat``, never
by version. What differs lives in exactly one adapter module, chosen by the installed vLLM
(``connector/version.py::RELEASES``). Each adapter exposes the same three names:

* ``ConnectorAPI``: a mixin for ``HeteroNixlConnector`` with the facade methods whose names,
  signatures or return types exist only in that connector API. It forwards to the facade's
  ``scheduler`` / ``worker`` objects and ``_bound()`` metadata, as the facade itself does.
* ``kv_cache_layout(vllm_config, backend) -> str``: the vLLM 0.29+ ``KVCacheLayout`` name that
  describes this release's per-layer KV tensors (``detect`` checks it against their strides).
* ``cpu_attn_isa(layer) -> str``: where this release keeps CPU_ATTN's kernel ISA.

``docs/compatibility.md`` lists every difference with file:line in both releases.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from vllm_hetero_pd.connector.version import adapter_name


def load(version: str | None = None) -> ModuleType:
    """The adapter module for ``version`` (default: the installed vLLM)."""
    return importlib.import_module(f"{__name__}.{adapter_name(version)}")
