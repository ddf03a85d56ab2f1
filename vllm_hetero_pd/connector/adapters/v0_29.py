"""vLLM 0.29: the 0.28 connector API (``get_finished``, no ``failed_recving``) on the era-C layout.

0.29 introduced ``KVCacheLayout`` and the one-buffer allocation, and kept the older connector
API; ``get_transfer_results`` came in 0.30 (``docs/compatibility.md``). So this release takes
its methods from ``v0_28`` and its layout and CPU_ATTN ISA lookups from ``v0_32``.
"""

from __future__ import annotations

from vllm_hetero_pd.connector.adapters.v0_28 import ConnectorAPI
from vllm_hetero_pd.connector.adapters.v0_32 import cpu_attn_isa, kv_cache_layout

ERA = "C"

__all__ = ["ERA", "ConnectorAPI", "cpu_attn_isa", "kv_cache_layout"]
