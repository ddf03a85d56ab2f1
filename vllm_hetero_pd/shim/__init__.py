"""Format-translation shim: any KV format to any other, with compiled CPU loops (``kernels``)
or vectorised torch copies.

``plan(src_formats, dst)`` once per peer, then ``translate(plan, src, dst, ...)`` per request.
"""

from vllm_hetero_pd.shim.canonical import decode, encode
from vllm_hetero_pd.shim.plan import TranslationPlan, plan
from vllm_hetero_pd.shim.translate import allocate, translate

__all__ = ["TranslationPlan", "allocate", "decode", "encode", "plan", "translate"]
