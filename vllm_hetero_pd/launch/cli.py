"""``vllm-hetero-pd launch``: N prefill + M decode vLLM instances on this host until Ctrl-C."""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path

from vllm_hetero_pd.launch.cluster import LocalCluster
from vllm_hetero_pd.launch.instance import InstanceSpec
from vllm_hetero_pd.testing.tiny_model import build_tiny_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny:llama-gqa-d32",
                        help="model directory, or tiny:<name> for a built-in tiny model (default %(default)s)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-prefill", type=int, default=1)
    parser.add_argument("--num-decode", type=int, default=1)
    parser.add_argument("--connector", default="NixlConnector",
                        help="kv_connector name for both roles (default %(default)s)")
    parser.add_argument("--kv-extra-config", type=json.loads, default={},
                        help="JSON object passed as kv_connector_extra_config")
    for role in ("prefill", "decode"):
        parser.add_argument(f"--{role}-tp", type=int, default=1)
        parser.add_argument(f"--{role}-block-size", type=int, default=None)
        parser.add_argument(f"--{role}-python", default=None,
                            help=f"Python of the environment the {role} runs in, e.g. .venv-028/bin/python for "
                                 "another vLLM release (default: this one)")
    parser.add_argument("--log-dir", type=Path, default=Path("logs"))
    parser.add_argument("--startup-timeout", type=float, default=300.0)


def resolve_model(model: str, dtype: str) -> str:
    return str(build_tiny_model(model.removeprefix("tiny:"), dtype)) if model.startswith("tiny:") else model


def pd_specs(args: argparse.Namespace, model: str) -> list[InstanceSpec]:
    def spec(role: str, kv_role: str) -> InstanceSpec:
        kv = {"kv_connector": args.connector, "kv_role": kv_role, "kv_buffer_device": "cpu",
              "kv_connector_extra_config": args.kv_extra_config}
        return InstanceSpec(role=role, model=model, kv_transfer_config=kv, dtype=args.dtype,
                            tensor_parallel_size=getattr(args, f"{role}_tp"),
                            block_size=getattr(args, f"{role}_block_size"), python=getattr(args, f"{role}_python"))

    return ([spec("prefill", "kv_producer")] * args.num_prefill) + ([spec("decode", "kv_consumer")] * args.num_decode)


def run(args: argparse.Namespace) -> int:
    model = resolve_model(args.model, args.dtype)
    with LocalCluster(pd_specs(args, model), args.log_dir, args.startup_timeout) as cluster:
        for inst in cluster.instances:
            print(f"{inst.name:10s} {inst.url}  side-channel {inst.side_channel_port}  log {inst.log_path}")
        print("all healthy; Ctrl-C or SIGTERM stops every instance", flush=True)
        wait_for_stop()
    return 0


def wait_for_stop() -> None:
    """Block until SIGINT or SIGTERM. Both are blocked first: ``sigwait`` only receives a blocked
    signal, and an unblocked SIGTERM would kill this process and orphan every instance."""
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    signal.sigwait(stop)
