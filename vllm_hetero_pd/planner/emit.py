"""Write a plan as runnable launch scripts: one ``vllm serve`` per instance plus the router.

Each script runs on the host meant for that instance; hosts and ports come from environment
variables with local defaults, so the same directory works on one box or across a cluster.
``instances.json`` holds the same instances in the local launcher's ``InstanceSpec`` schema.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import msgspec

from vllm_hetero_pd.planner.model import ModelSpec
from vllm_hetero_pd.planner.search import Entry, Plan

CONNECTOR = "HeteroNixlConnector"
FIRST_PORT = 8100
FIRST_SIDE_CHANNEL_PORT = 5600  # ConnectorConfig.side_channel_port; one per prefill so a host can hold several
ROUTER_PORT = 8000


class Instance(msgspec.Struct, frozen=True, kw_only=True):
    """One instance to start: its name, role, shape, port and router weight."""

    name: str
    role: str  # "prefill" | "decode" | "monolithic"
    device: str
    tp: int
    port: int
    weight: float
    side_channel_port: int = 0  # prefill only: where decodes fetch KV metadata


def kv_transfer_config(inst: Instance) -> dict:
    """The ``--kv-transfer-config`` naming our connector; prefill produces KV, decode consumes it."""
    extra = {"side_channel_port": inst.side_channel_port} if inst.role == "prefill" else {}
    return {"kv_connector": CONNECTOR,
            "kv_role": "kv_producer" if inst.role == "prefill" else "kv_consumer",
            "kv_connector_extra_config": extra}


def instances(plan: Plan) -> list[Instance]:
    """Instances of the plan in pool order, each weighted by its planned capacity."""
    pools: list[tuple[str, tuple[Entry, ...]]] = (
        [("monolithic", plan.colocated)] if plan.mode == "colocated"
        else [("prefill", plan.prefill), ("decode", plan.decode)])
    out: list[Instance] = []
    for role, entries in pools:
        index = 0
        for e in entries:
            for _ in range(e.count):
                out.append(Instance(name=f"{role}_{index}", role=role, device=e.device, tp=e.tp,
                                    port=FIRST_PORT + len(out), weight=round(e.capacity_per_instance, 4),
                                    side_channel_port=FIRST_SIDE_CHANNEL_PORT + index if role == "prefill" else 0))
                index += 1
    return out


def serve_args(model: ModelSpec, model_name: str, inst: Instance) -> list[str]:
    """``vllm serve`` arguments for one instance (host and port are filled in by the script)."""
    args = ["vllm", "serve", model_name, "--tensor-parallel-size", str(inst.tp)]
    if model.fp8_weights:
        args += ["--quantization", "fp8"]
    if model.kv_bytes_per_element == 1:
        args += ["--kv-cache-dtype", "fp8"]
    if inst.role != "monolithic":
        args += ["--kv-transfer-config", json.dumps(kv_transfer_config(inst), separators=(",", ":"))]
    return args


def _script(comment: str, command: str) -> str:
    return f"#!/usr/bin/env bash\n# {comment}\nset -euo pipefail\n{command}\n"


def write_launch(plan: Plan, model: ModelSpec, model_name: str, out_dir: Path) -> list[Path]:
    """Write ``<role>_<i>.sh`` per instance, ``router.sh`` (disaggregated plans) and ``instances.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    insts = instances(plan)
    for inst in insts:
        var = inst.name.upper()
        command = (f'export VLLM_NIXL_SIDE_CHANNEL_HOST="${{{var}_ADDRESS:-127.0.0.1}}"  # reachable by decodes\n'
                   f'exec {shlex.join(serve_args(model, model_name, inst))} \\\n'
                   f'    --host "${{{var}_HOST:-0.0.0.0}}" --port "${{{var}_PORT:-{inst.port}}}"')
        path = out_dir / f"{inst.name}.sh"
        path.write_text(_script(f"{inst.role} instance on {inst.device} TP{inst.tp} "
                                f"(planned capacity {inst.weight:g} req/s); {plan.describe()}", command))
        written.append(path)
    if plan.mode == "disaggregated":
        flags = " \\\n    ".join(
            f'--{inst.role} "${{{inst.name.upper()}_URL:-http://127.0.0.1:{inst.port}}},weight={inst.weight:g}"'
            for inst in insts)
        command = f'exec vllm-hetero-pd proxy --port "${{ROUTER_PORT:-{ROUTER_PORT}}}" \\\n    {flags}'
        path = out_dir / "router.sh"
        path.write_text(_script("OpenAI-compatible P/D router; weights = planned per-instance capacity", command))
        written.append(path)
    for path in written:
        path.chmod(0o755)
    specs = [{"role": i.role, "model": model_name, "http_port": i.port, "tensor_parallel_size": i.tp,
              **({"kv_transfer_config": kv_transfer_config(i)} if i.role != "monolithic" else {})}
             for i in insts]
    spec_path = out_dir / "instances.json"
    spec_path.write_text(json.dumps(specs, indent=2) + "\n")
    written.append(spec_path)
    return written
