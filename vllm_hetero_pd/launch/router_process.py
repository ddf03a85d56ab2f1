"""The router as its own process (``vllm-hetero-pd proxy``), as tests and benchmarks run it."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from vllm_hetero_pd.ports import free_port


@contextlib.contextmanager
def running_router(prefill_urls: list[str], decode_urls: list[str], log_path: Path,
                   extra_args: tuple[str, ...] = (), timeout_s: float = 30.0) -> Iterator[str]:
    """Start a router in front of the given instances; yield its URL once ``/health`` answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm_hetero_pd.cli", "proxy", "--port", str(port), *extra_args]
    cmd += [a for url in prefill_urls for a in ("--prefill", url)]
    cmd += [a for url in decode_urls for a in ("--decode", url)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        router = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, router, log_path, timeout_s)
        yield url
    finally:
        router.terminate()
        router.wait(timeout=20)


def _wait_healthy(url: str, router: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if router.poll() is not None:
            raise RuntimeError(f"router exited with {router.returncode}; see {log_path}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"router at {url} not healthy after {timeout_s} s; see {log_path}")
