"""An instance can run from another environment's interpreter (a prefill on one vLLM release,
a decode on another)."""

import sys

from vllm_hetero_pd.launch.instance import InstanceSpec, hetero_kv_config, serve_command


def test_serve_command_uses_our_interpreter_by_default():
    spec = InstanceSpec(role="decode", model="m", kv_transfer_config=hetero_kv_config("kv_consumer"))
    assert serve_command(spec, 8000)[:3] == [sys.executable, "-m", "vllm_hetero_pd.launch.vllm_cli"]


def test_serve_command_runs_the_given_python():
    spec = InstanceSpec(role="prefill", model="m", python="/x/.venv-028/bin/python", block_size=32,
                        kv_transfer_config=hetero_kv_config("kv_producer"))
    cmd = serve_command(spec, 8000)
    assert cmd[:3] == ["/x/.venv-028/bin/python", "-m", "vllm_hetero_pd.launch.vllm_cli"]
    assert cmd[cmd.index("--block-size") + 1] == "32"


def test_launch_stops_on_sigterm_instead_of_orphaning_its_instances():
    """``vllm-hetero-pd launch`` must reach its ``with LocalCluster`` exit on SIGTERM (a background job
    ignores SIGINT); an unblocked SIGTERM used to kill it and leave every engine running."""
    import signal
    import subprocess
    import time

    code = ("from vllm_hetero_pd.launch.cli import wait_for_stop; print('waiting', flush=True); "
            "wait_for_stop(); print('stopped')")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "waiting"
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out.strip() == "stopped"


def test_kv_cache_size_is_a_flag_in_bytes_so_fractions_of_a_gib_work():
    spec = InstanceSpec(role="monolithic", model="m", kv_cache_space_gib=0.25)
    cmd = serve_command(spec, 8000)
    assert cmd[cmd.index("--kv-cache-memory-bytes") + 1] == str(2**28)
