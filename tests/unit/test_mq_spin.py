"""connector/mq_spin.py: readers of the queues vLLM builds nap instead of yielding inside vLLM's window."""

from __future__ import annotations

import time

import pytest
import zmq
from vllm.distributed.device_communicators import shm_broadcast

from vllm_hetero_pd.connector import mq_spin


@pytest.fixture
def restored(monkeypatch):
    """Undo the module-level replacement after each test."""
    monkeypatch.setattr(shm_broadcast, "SpinCondition", shm_broadcast.SpinCondition)
    had_marker = hasattr(shm_broadcast, "_hetero_pd_original_spin_condition")
    yield
    if not had_marker and hasattr(shm_broadcast, "_hetero_pd_original_spin_condition"):
        del shm_broadcast._hetero_pd_original_spin_condition


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def test_inside_the_window_a_reader_naps_instead_of_yielding_and_keeps_vllms_window(restored, context, tmp_path,
                                                                                      monkeypatch):
    assert mq_spin.set_mq_nap(0.0001)
    reader = shm_broadcast.SpinCondition(is_reader=True, context=context, notify_address=f"ipc://{tmp_path}/n")
    assert reader.busy_loop_s == 1  # vLLM's window and its notifications stay as they are
    naps, yields = [], []
    monkeypatch.setattr(time, "sleep", naps.append)
    monkeypatch.setattr(shm_broadcast, "sched_yield", lambda: yields.append(1))
    reader.record_read()
    reader.wait(timeout_ms=10)
    assert naps == [0.0001] and yields == []


def test_past_the_window_a_reader_waits_for_the_notification_as_vllm_does(restored, context, tmp_path, monkeypatch):
    assert mq_spin.set_mq_nap(0.0001)
    reader = shm_broadcast.SpinCondition(is_reader=True, context=context, notify_address=f"ipc://{tmp_path}/n")
    reader.last_read = time.monotonic() - 2 * reader.busy_loop_s
    naps = []
    monkeypatch.setattr(time, "sleep", naps.append)
    reader.wait(timeout_ms=10)  # nothing notifies: the poll times out
    assert naps == []


def test_applied_twice_it_wraps_vllms_class_not_its_own_wrapper(restored):
    assert mq_spin.set_mq_nap(0.0001) and mq_spin.set_mq_nap(0.0002)
    assert shm_broadcast.SpinCondition.__mro__[1] is shm_broadcast._hetero_pd_original_spin_condition


def test_the_message_queue_looks_the_class_up_when_it_builds_one():
    """The replacement only works because MessageQueue names SpinCondition at build time."""
    import inspect

    assert "SpinCondition(" in inspect.getsource(shm_broadcast.MessageQueue.__init__)


@pytest.mark.parametrize("raw, message", [("fast", "is not a number"), ("0", "above 0 and at most 0.01"),
                                          ("0.5", "above 0 and at most 0.01")])
def test_a_bad_value_is_an_error_naming_the_variable(restored, monkeypatch, raw, message):
    monkeypatch.setenv(mq_spin.ENV_VAR, raw)
    with pytest.raises(ValueError, match=message) as info:
        mq_spin.apply_mq_nap_from_env()
    assert mq_spin.ENV_VAR in str(info.value)


def test_unset_leaves_vllm_alone(restored, monkeypatch):
    monkeypatch.delenv(mq_spin.ENV_VAR, raising=False)
    original = shm_broadcast.SpinCondition
    mq_spin.apply_mq_nap_from_env()
    assert shm_broadcast.SpinCondition is original
