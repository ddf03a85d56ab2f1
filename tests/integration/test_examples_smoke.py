"""examples/cpu-to-cpu.sh --smoke for real: two vLLM CPU engines with HeteroNixlConnector, the
router, one request through it (HTTP 200), then everything stopped. One run, about 2-3 minutes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from vllm_hetero_pd.ports import free_ports

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_cpu_to_cpu_smoke_through_the_router(tiny_model, tmp_path):
    prefill, decode, router, side = free_ports(4)
    env = {**os.environ, "HETERO_PD": str(Path(sys.executable).parent / "vllm-hetero-pd"), "MODEL": tiny_model,
           "PREFILL_PORT": str(prefill), "DECODE_PORT": str(decode), "ROUTER_PORT": str(router),
           "SIDE_CHANNEL_PORT": str(side), "LOG_DIR": str(tmp_path)}
    proc = subprocess.run([str(EXAMPLES / "cpu-to-cpu.sh"), "--smoke"], env=env, capture_output=True, text=True,
                          timeout=900)
    logs = {p.name: p.read_text() for p in tmp_path.glob("*.log")}
    assert proc.returncode == 0, (proc.stdout, proc.stderr, {k: v[-3000:] for k, v in logs.items()})
    assert "smoke: HTTP 200" in proc.stdout
    body = json.loads((tmp_path / "smoke-response.json").read_text())
    assert body["choices"][0]["text"] and body["usage"]["completion_tokens"] > 0
    # The prefill exports CUDA FLASH_ATTN's layout, so the decode must have read it over NIXL into
    # its staging pool and translated it; without a transfer this pool is never created.
    assert "staging pool" in logs["decode.log"], logs["decode.log"][-3000:]
    assert not any(listening(p) for p in (prefill, decode, router)), "a process outlived the script"
