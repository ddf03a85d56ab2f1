"""Staging slots go back to the pool only after the device copy out of them has finished (review item 7).

On CUDA/ROCm ``translate`` is queued on a stream and on HPU it is lazy, while the next NIXL READ into
the same slots is not ordered with either; CPU has nothing to wait for. Both tests fail if the wait
is dropped or moved after the slots are returned.
"""

from types import SimpleNamespace

import torch

from vllm_hetero_pd.connector import receiver
from vllm_hetero_pd.connector.receiver import Receiver, Staging, wait_for_device
from vllm_hetero_pd.transport.nixl_agent import Memory


def test_land_chunk_waits_for_the_device_before_returning_slots(monkeypatch):
    staging = Staging(formats=[SimpleNamespace(block_size=16)], buffers=[], layouts=[], layer_addrs=[], free=[],
                      registration=None, memory=Memory("DRAM"), lists=[])
    seen = []
    monkeypatch.setattr(receiver, "translate", lambda *args, **kwargs: None)
    monkeypatch.setattr(receiver, "wait_for_device", lambda device: seen.append(list(staging.free)))
    rx = Receiver.__new__(Receiver)
    rx.local = SimpleNamespace(kv_caches={"l0": torch.zeros(1)}, device=torch.device("cpu"))
    t = SimpleNamespace(remote=SimpleNamespace(staging=staging, plan=None), chunk=(0, 2), slots=[3, 4],
                        job=SimpleNamespace(start=0, stop=32, local_block_ids=[7, 8]), stats=SimpleNamespace(
                            translate_s=0.0))
    rx._land_chunk(t)
    assert seen == [[]], "slots were back in the pool before the device copy finished"
    assert staging.free == [3, 4] and t.slots == []


def test_wait_for_device_synchronizes_a_cuda_stream(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: SimpleNamespace(
        synchronize=lambda: calls.append(device)))
    wait_for_device(torch.device("cuda", 1))
    wait_for_device(torch.device("cpu"))
    assert calls == [torch.device("cuda", 1)]
