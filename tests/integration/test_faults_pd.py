"""Faults against real engines: forged params, hostile peers, stalls and kills mid-transfer.

One cluster: prefills A and B (block size 32, short lease) and decode D (block size 128, so every
load goes through staging and translation; 1 MiB of staging, short timeouts). All three use
``UCX_TLS=tcp``: over TCP a READ needs the target process to progress it, so stopping a prefill
with SIGSTOP really freezes the bytes in flight (with shared-memory transports the decode would
finish the READ on its own). Whatever happens, a request is answered exactly or fails; it never
returns wrong output, no engine dies unless the test kills it, and KV blocks come back.

The tests run in file order on the shared cluster; the last two kill A and then D.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from vllm_hetero_pd.kv_params import prompt_digest
from vllm_hetero_pd.launch.cluster import LocalCluster
from vllm_hetero_pd.launch.instance import InstanceSpec
from vllm_hetero_pd.launch.instance import hetero_kv_config as hetero
from vllm_hetero_pd.launch.request import RequestFailed, post_json
from vllm_hetero_pd.ports import free_port
from vllm_hetero_pd.testing.compare import LOGPROB_TOLERANCE, compare, greedy_body, parse_completion
from vllm_hetero_pd.testing.metrics import metric_sum, scrape

from fake_peers import black_hole, empty_ranks, garbage, impostor
from pd_helpers import decode_fails, kv_usage, log_of, prefilled, wait_until

LEASE_S = 3.0
HANDSHAKE_S = 1.0
TCP = {"UCX_TLS": "tcp"}


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    producer = hetero("kv_producer", {"lease_s": LEASE_S, "heartbeat_s": 1.0})
    consumer = hetero("kv_consumer", {"heartbeat_s": 0.5, "transfer_timeout_s": 20.0,
                                      "handshake_timeout_s": HANDSHAKE_S, "staging_mib": 1})
    specs = [InstanceSpec(role="prefill", model=tiny_model, block_size=32, kv_transfer_config=producer, env=TCP),
             InstanceSpec(role="prefill", model=tiny_model, block_size=32, kv_transfer_config=producer, env=TCP),
             InstanceSpec(role="decode", model=tiny_model, block_size=128, kv_transfer_config=consumer, env=TCP)]
    with LocalCluster(specs, tmp_path_factory.mktemp("faults")) as running:
        yield running


def decode(decode_url: str, prompt: list[int], params: dict) -> tuple[float, object]:
    """(seconds, Completion or RequestFailed) of one decode request."""
    start = time.monotonic()
    try:
        answer = post_json(decode_url + "/v1/completions", {**greedy_body(prompt), "kv_transfer_params": params},
                           "fault", 120)
        return time.monotonic() - start, parse_completion(answer)
    except RequestFailed as e:
        return time.monotonic() - start, e


def exact(prefill, decode_instance, prompt, ref) -> float:
    """One direct P/D request; assert it equals the reference; return its latency."""
    took, got = decode(decode_instance.url, prompt, prefilled(prefill.url, prompt, f"ok-{time.monotonic()}"))
    assert not isinstance(got, RequestFailed), got
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
    peers = {"garbage": garbage(), "black hole": black_hole(), "ranks=[]": empty_ranks("evil-empty")}
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
        assert isinstance(got, RequestFailed), name
        assert took < 3 * HANDSHAKE_S + 10, f"{name}: the request must fail within its deadline"
        assert "ReleaseRequest" not in peers[name].kinds(), f"released on unverified peer {name}"
    log = log_of(d)
    assert "malformed reply" in log and "unreachable or timed out" in log
    assert metric_sum(scrape(d.url), "vllm:hetero_pd_handshake_failures_total") >= 3
    for peer in peers.values():
        peer.close()
    settled(cluster)


def test_staging_exhaustion_queues_and_the_pool_refills(cluster, prompts, reference):
    a, b, d = cluster.instances
    jobs = [(a if i % 2 else b, i) for i in range(4, 8)] * 2  # 8 long prompts, 1 MiB of staging
    params = [prefilled(p.url, prompts[i], f"exhaust-{n}") for n, (p, i) in enumerate(jobs)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: decode(d.url, prompts[j[0][1]], j[1]), zip(jobs, params)))
    got = [r for _, r in results]
    assert not [g for g in got if isinstance(g, RequestFailed)]
    assert compare([reference[i] for _, i in jobs], got, LOGPROB_TOLERANCE) == []
    settled(cluster)


def test_prefill_stalled_mid_transfer_never_yields_wrong_output(cluster, prompts, reference):
    """SIGSTOP the prefill just after the decode starts loading, for longer than the lease and the
    READ timeout: the load must fail (lease ran out, or the READ timed out and was cancelled) or, if
    it had finished, be exact. Afterwards staging is empty and every block is free."""
    a, _, d = cluster.instances
    outcomes = []
    for trial, delay in enumerate((0.0, 0.005, 0.02, 0.05)):
        params = prefilled(a.url, prompts[7], f"stall-{trial}")
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(decode, d.url, prompts[7], params)
            time.sleep(delay)
            os.killpg(a.process.pid, signal.SIGSTOP)
            time.sleep(LEASE_S + 2)
            os.killpg(a.process.pid, signal.SIGCONT)
            took, got = future.result()
        if isinstance(got, RequestFailed):
            outcomes.append(f"failed after {took:.1f} s")
        else:
            assert compare([reference[7]], [got], LOGPROB_TOLERANCE) == [], f"trial {trial}: wrong output"
            outcomes.append("exact")
    log = log_of(d)
    reasons = {k: log.count(k) for k in ("ran out before its READ finished", "did not finish within",
                                         "could not pin the lease", "refused the lease")}
    print(f"\nstalled-prefill trials: {outcomes}; decode log reasons: {reasons}")
    assert a.is_healthy()
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
    outcome = "failed" if isinstance(got, RequestFailed) else "finished"
    print(f"\nprefill killed mid-transfer: the decode request {outcome} after {took:.2f} s")
    if not isinstance(got, RequestFailed):
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
