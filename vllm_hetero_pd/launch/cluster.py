"""Run a set of local vLLM instances as one unit: start, wait healthy, stop without orphans.

Each instance runs in its own session (``setsid``) so that a Ctrl-C in the launching shell does
not reach it half-way, and so that stopping it can signal its whole process group: vLLM spawns
an engine-core process and, with TP > 1, worker processes, which must all go.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgspec

from vllm_hetero_pd.launch.instance import UNSET_ENV, InstanceSpec, serve_command, serve_env
from vllm_hetero_pd.ports import free_port, is_free


class LaunchError(RuntimeError):
    """An instance died or did not become healthy; the message carries its log tail."""


def check_port_free(port: int) -> None:
    """Fail before starting anything when a port the user fixed is taken (vLLM would die later)."""
    if not is_free(port):
        raise LaunchError(f"port {port} is already in use; pick another or pass 0 to choose one")


def log_tail(path: Path, num_lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])
    except FileNotFoundError:
        return "<no log written>"


class Instance:
    """One running ``vllm serve`` process group."""

    def __init__(self, spec: InstanceSpec, name: str, log_dir: Path, cpu_cores: str):
        self.spec, self.name, self.cpu_cores = spec, name, cpu_cores
        self.http_port = spec.http_port or free_port()
        self.side_channel_port = spec.side_channel_port or free_port()
        for port in {spec.http_port, spec.side_channel_port} - {0}:
            check_port_free(port)
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.log_path = log_dir / f"{name}.log"
        self.command = serve_command(spec, self.http_port)
        inherited = {k: v for k, v in os.environ.items() if k not in UNSET_ENV}
        env = {**inherited, **serve_env(spec, self.side_channel_port, spec.cpu_cores or cpu_cores)}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)

    def is_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def failure(self, reason: str) -> LaunchError:
        return LaunchError(f"{self.name} ({self.spec.role}, {self.url}) {reason}; "
                           f"log {self.log_path}, last lines:\n{log_tail(self.log_path)}")

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after ``grace_s``."""
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(self.process.pid, signal.SIGKILL)  # children outliving the leader
        self.process.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


class LocalCluster:
    """Start instances, wait until all are healthy; use as a context manager so they always stop."""

    def __init__(self, specs: list[InstanceSpec], log_dir: Path, startup_timeout_s: float = 300.0):
        self.specs, self.log_dir, self.startup_timeout_s = specs, Path(log_dir), startup_timeout_s
        self.instances: list[Instance] = []

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        cores = sorted(os.sched_getaffinity(0))
        counts: dict[str, int] = {}
        try:
            for i, spec in enumerate(self.specs):
                counts[spec.role] = counts.get(spec.role, 0) + 1
                name = f"{spec.role}{counts[spec.role] - 1}"
                self.instances.append(Instance(spec, name, self.log_dir, _cores_for(i, spec, cores)))
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def restart(self, instance: Instance) -> Instance:
        """Stop ``instance`` and start it again on the same ports and cores, as a crashed engine that its
        supervisor brings back: a new process that knows nothing of the old one's KV. Returns the new one."""
        instance.stop()
        spec = msgspec.structs.replace(instance.spec, http_port=instance.http_port,
                                       side_channel_port=instance.side_channel_port)
        (self.log_dir / "restarted").mkdir(exist_ok=True)
        fresh = Instance(spec, instance.name, self.log_dir / "restarted", instance.cpu_cores)
        self.instances[self.instances.index(instance)] = fresh
        self._wait_healthy([fresh])
        return fresh

    def _wait_healthy(self, instances: list[Instance] | None = None) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        pending = list(self.instances if instances is None else instances)
        while pending:
            for inst in list(pending):
                if inst.process.poll() is not None:
                    raise inst.failure(f"exited with code {inst.process.returncode} during start-up")
                if inst.is_healthy():
                    pending.remove(inst)
            if pending and time.monotonic() > deadline:
                raise pending[0].failure(f"not healthy after {self.startup_timeout_s:.0f} s")
            time.sleep(0.5)

    def stop(self) -> None:
        for inst in self.instances:
            inst.stop()

    def by_role(self, role: str) -> list[Instance]:
        return [i for i in self.instances if i.spec.role == role]


def _cores_for(index: int, spec: InstanceSpec, cores: list[int]) -> str:
    """Which cores an instance's OpenMP threads are bound to.

    Prefills share the first core and decodes the others: while an engine holds a lease (or waits for
    KV), vLLM keeps stepping it and its worker spins a core, and a decode bound to a prefill's core
    starved for as long as the prefill held any lease (120 s measured on 2 cores). TP instances,
    kv_both ("both") and monolithic engines take cores round-robin (TP ranks one core each)."""
    tp = spec.tensor_parallel_size
    if tp == 1 and len(cores) > 1 and spec.role in ("prefill", "decode"):
        return str(cores[0] if spec.role == "prefill" else cores[1 + index % (len(cores) - 1)])
    return "|".join(str(cores[(index * tp + r) % len(cores)]) for r in range(tp))
