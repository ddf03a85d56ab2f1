"""Faults against real engines: forged params, hostile peers, stalls and kills mid-transfer.

One cluster: prefills A and B (block size 32, short lease) and decode D (block size 128, so every
load goes through staging and translation; 1 MiB of staging, short timeouts). Whatever happens,
a request is answered exactly or fails; it never returns wrong output, no engine dies unless the
test kills it, and KV blocks come back. All three use ``UCX_TLS=tcp``: over TCP a READ needs the
prefill's worker process (which owns its NIXL agent) to progress it, so stopping that process with
SIGSTOP freezes the bytes in flight, while the prefill's engine core (which serves the side
channel, i.e. the pins) can be stopped or left running on its own. (With shared-memory transports
the decode would finish the READ by itself.)

The tests run in file order on the shared cluster; the last two kill A and then D.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vllm_hetero_pd.kv_params import prompt_digest
from vllm_hetero_pd.launch.cluster import LocalCluster
from vllm_hetero_pd.launch.instance import InstanceSpec
from vllm_hetero_pd.launch.instance import hetero_kv_config as hetero
from vllm_hetero_pd.launch.request import RequestFailed, post_json
from vllm_hetero_pd.ports import free_port
from vllm_hetero_pd.testing.compare import LOGPROB_TOLERANCE, compare, greedy_body, parse_completion
from vllm_hetero_pd.testing.metrics import metric_sum, scrape
from vllm_hetero_pd.transport import wire

from fake_peers import black_hole, empty_ranks, garbage, impostor, older_release
from pd_helpers import decode_fails, kv_usage, log_of, prefilled, wait_until

LEASE_S = 6.0
HANDSHAKE_S = 2.0
READ_TIMEOUT_S = 15.0
TCP = {"UCX_TLS": "tcp"}


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    producer = hetero("kv_producer", {"lease_s": LEASE_S, "heartbeat_s": 1.0})
    consumer = hetero("kv_consumer", {"heartbeat_s": 0.5, "transfer_timeout_s": READ_TIMEOUT_S,
                                      "handshake_timeout_s": HANDSHAKE_S, "staging_mib": 1})
    specs = [InstanceSpec(role="prefill", model=tiny_model, block_size=32, kv_transfer_config=producer,
                          env=TCP),
             InstanceSpec(role="prefill", model=tiny_model, block_size=32, kv_transfer_config=producer,
                          env=TCP),
             InstanceSpec(role="decode", model=tiny_model, block_size=128, kv_transfer_config=consumer,
                          env=TCP)]
    with LocalCluster(specs, tmp_path_factory.mktemp("faults")) as running:
        for instance in running.instances:  # the first request of an engine is slow (warm-up): not under test
            post_json(instance.url + "/v1/completions", greedy_body([11, 12, 13], max_tokens=2), "warm-up", 120)
        yield running


def decode(decode_url: str, prompt: list[int], params: dict) -> tuple[float, object]:
    """(seconds, Completion or RequestFailed) of one decode request."""
    start = time.monotonic()
    try:
        answer = post_json(decode_url + "/v1/completions", {**greedy_body(prompt), "kv_transfer_params": params},
                           "fault", 120)
        return time.monotonic() - start, parse_completion(answer)
    except (RequestFailed, OSError) as e:  # an error status, or the decode died under the request
        return time.monotonic() - start, e


def exact(prefill, decode_instance, prompt, ref) -> float:
    """One direct P/D request; assert it equals the reference; return its latency."""
    took, got = decode(decode_instance.url, prompt, prefilled(prefill.url, prompt, f"ok-{time.monotonic()}"))
    assert not isinstance(got, (RequestFailed, OSError)), got
    assert compare([ref], [got], LOGPROB_TOLERANCE) == []
    return took


def staging_occupancy(url: str) -> float:
    return metric_sum(scrape(url), "vllm:hetero_pd_staging_occupancy")


def settled(cluster) -> None:
    """Every live engine healthy, holding no KV blocks (the prefills after release or lease), staging empty."""
    for instance in cluster.instances:
        if instance.process.poll() is None:
            assert instance.is_healthy(), instance.name
            assert wait_until(lambda i=instance: kv_usage(i.url) == 0.0, LEASE_S + 15), f"{instance.name} holds KV"
    assert staging_occupancy(cluster.instances[2].url) == 0.0


def test_forged_params_at_a_fake_side_channel_are_refused(cluster, prompts, reference):
    a, _, d = cluster.instances
    exact(a, d, prompts[0], reference[0])  # d now knows engine A at its real address
    victim = prefilled(a.url, prompts[2], "victim")  # another tenant's live KV on A
    fake = impostor("127.0.0.1", a.side_channel_port)
    attacker_prompt = list(reversed(prompts[2]))
    forged = {**victim, "remote_host": "127.0.0.1", "remote_port": fake.port,
              "prompt_digest": prompt_digest(attacker_prompt)}
    decode_fails(d.url, attacker_prompt, forged)
    assert "but it was handshaken at" in log_of(d)
    decode_fails(d.url, attacker_prompt, {**forged, "remote_engine_id": "evil-engine"})
    assert "refusing an impostor or stale params" in log_of(d)
    assert "PinRequest" not in fake.kinds() and "ReleaseRequest" not in fake.kinds(), fake.kinds()
    fake.close()
    settled(cluster)


def test_hostile_side_channels_fail_alone(cluster, prompts, reference):
    a, _, d = cluster.instances
    baseline = [exact(a, d, prompts[i], reference[i]) for i in (0, 1, 0)]
    peers = {"garbage": garbage(), "black hole": black_hole(), "ranks=[]": empty_ranks("evil-empty"),
             "older release": older_release("evil-old")}
    template = prefilled(a.url, prompts[1], "template")
    with ThreadPoolExecutor(len(peers)) as pool:
        hostile = {name: pool.submit(decode, d.url, prompts[1],
                                     {**template, "remote_port": peer.port, "remote_engine_id": f"evil-{i}"})
                   for i, (name, peer) in enumerate(peers.items())}
        during = [exact(a, d, prompts[i], reference[i]) for i in (0, 1, 0)]
        results = {name: f.result() for name, f in hostile.items()}
    print(f"\nnormal request latency on the same decode: before {[round(t, 3) for t in baseline]} s, "
          f"while hostile handshakes ran {[round(t, 3) for t in during]} s")
    for name, (took, got) in results.items():
        print(f"hostile peer {name}: failed after {took:.2f} s")
        assert isinstance(got, (RequestFailed, OSError)), name
        assert took < 3 * HANDSHAKE_S + 10, f"{name}: the request must fail within its deadline"
        assert "ReleaseRequest" not in peers[name].kinds(), f"released on unverified peer {name}"
    log = log_of(d)
    assert "malformed reply" in log and "unreachable or timed out" in log
    assert f"speaks wire version {wire.WIRE_VERSION - 1}" in log  # names the field and the fix
    assert metric_sum(scrape(d.url), "vllm:hetero_pd_handshake_failures_total") >= 4
    for peer in peers.values():
        peer.close()
    settled(cluster)


def test_staging_exhaustion_queues_and_the_pool_refills(cluster, prompts, reference):
    a, b, d = cluster.instances
    jobs = [(n, a if i % 2 else b, i) for n, i in enumerate(list(range(4, 8)) * 2)]  # 8 long prompts, 1 MiB staging

    def pd(job) -> tuple[float, object]:
        n, prefill, i = job
        return decode(d.url, prompts[i], prefilled(prefill.url, prompts[i], f"exhaust-{n}"))

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(pd, jobs))
    got = [r for _, r in results]
    assert not [g for g in got if isinstance(g, (RequestFailed, OSError))]
    assert compare([reference[i] for _, _, i in jobs], got, LOGPROB_TOLERANCE) == []
    settled(cluster)


def process_of(instance, title: str) -> int:
    """The pid of the process titled ``title`` (``VLLM::Worker``, ``VLLM::EngineCore``) in the instance."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == instance.process.pid and title.encode() in (
                        entry / "cmdline").read_bytes():
                    return int(entry.name)
            except (OSError, ProcessLookupError):
                continue
    raise LookupError(f"no {title} process in {instance.name}")


def test_stalled_read_times_out_is_cancelled_and_the_pool_refills(cluster, prompts, reference):
    """The prefill's worker stops with a READ in flight; its engine core keeps answering pins, so the
    lease holds. The READ must time out, be cancelled before the failure is reported, and give its
    staging slots back; afterwards the same pair serves exactly."""
    a, _, d = cluster.instances
    worker = process_of(a, "VLLM::Worker")
    params = prefilled(a.url, prompts[7], "stalled-read")
    os.kill(worker, signal.SIGSTOP)
    try:
        took, got = decode(d.url, prompts[7], params)
    finally:
        os.kill(worker, signal.SIGCONT)
    print(f"\nREAD stalled by a stopped prefill worker: the request failed after {took:.1f} s")
    assert isinstance(got, (RequestFailed, OSError))
    assert READ_TIMEOUT_S <= took < READ_TIMEOUT_S + 10
    assert f"did not finish within transfer_timeout_s={READ_TIMEOUT_S:g}" in log_of(d)
    settled(cluster)
    exact(a, d, prompts[7], reference[7])


def test_read_outliving_its_lease_fails_and_never_succeeds(cluster, prompts, reference):
    """A READ is in flight (prefill worker stopped) when the prefill's engine core stops too, so no pin
    is answered: the lease runs out on the decode's clock before the READ can finish, and the load
    must fail even though the bytes arrive once the prefill resumes."""
    a, _, d = cluster.instances
    worker, core = process_of(a, "VLLM::Worker"), process_of(a, "VLLM::EngineCore")
    params = prefilled(a.url, prompts[7], "outlives-lease")
    os.kill(worker, signal.SIGSTOP)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(decode, d.url, prompts[7], params)
        time.sleep(2.0)  # handshake done earlier, first pin answered, READ posted and stuck
        os.kill(core, signal.SIGSTOP)
        time.sleep(LEASE_S + 2)
        os.kill(core, signal.SIGCONT)
        os.kill(worker, signal.SIGCONT)
        took, got = future.result()
    outcome = "failed" if isinstance(got, (RequestFailed, OSError)) else "succeeded"
    print(f"\nREAD outliving its lease: the request {outcome} after {took:.1f} s")
    assert isinstance(got, (RequestFailed, OSError)), "a load whose lease ran out must fail"
    assert "ran out before its READ finished" in log_of(d)
    settled(cluster)
    exact(a, d, prompts[7], reference[7])


def test_prefill_killed_mid_transfer_fails_fast_and_the_router_recovers(cluster, prompts, reference):
    a, b, d = cluster.instances
    params = prefilled(a.url, prompts[7], "kill-prefill")
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(decode, d.url, prompts[7], params)
        time.sleep(0.01)
        os.killpg(a.process.pid, signal.SIGKILL)
        took, got = future.result()
    outcome = "failed" if isinstance(got, (RequestFailed, OSError)) else "finished"
    print(f"\nprefill killed mid-transfer: the decode request {outcome} after {took:.2f} s")
    if not isinstance(got, (RequestFailed, OSError)):
        assert compare([reference[7]], [got], LOGPROB_TOLERANCE) == []
    assert took < LEASE_S + 10, "the load must fail fast once its prefill is gone"
    port = free_port()
    router = subprocess.Popen([sys.executable, "-m", "vllm_hetero_pd.cli", "proxy", "--port", str(port),
                               "--prefill", a.url, "--prefill", b.url, "--decode", d.url],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "router listening on" in router.stdout.readline()
        got = [parse_completion(post_json(f"http://127.0.0.1:{port}/v1/completions", greedy_body(p), f"r{i}", 120))
               for i, p in enumerate(prompts[:4])]
    finally:
        router.terminate()
        router.wait(10)
    assert compare(reference[:4], got, LOGPROB_TOLERANCE) == []
    settled(cluster)


def test_decode_killed_mid_transfer_frees_the_prefill_after_the_lease(cluster, prompts):
    _, b, d = cluster.instances
    params = prefilled(b.url, prompts[7], "kill-decode")
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(decode, d.url, prompts[7], params)
        time.sleep(0.01)
        os.killpg(d.process.pid, signal.SIGKILL)
        future.result()
    start = time.monotonic()
    assert wait_until(lambda: kv_usage(b.url) == 0.0, LEASE_S + 15), "the prefill kept the dead decode's blocks"
    print(f"\ndecode killed mid-transfer: prefill KV usage back to 0 after {time.monotonic() - start:.1f} s")
    assert b.is_healthy()
