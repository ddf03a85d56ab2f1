"""Loggers for code that runs inside vLLM processes (connector, transport).

vLLM configures only its own ``vllm`` logger (format, ``VLLM_LOGGING_LEVEL``); a plugin logger
outside that tree loses every INFO line inside an engine. Naming ours ``vllm.hetero_pd.<module>``
puts them under vLLM's configuration there, and leaves them plain child loggers elsewhere.
"""

from __future__ import annotations

import logging


def get_logger(module: str) -> logging.Logger:
    return logging.getLogger("vllm.hetero_pd." + module.removeprefix("vllm_hetero_pd."))
