"""connector/mq_spin.py: the bound on vLLM's message-queue spin reaches the queues vLLM builds."""

from __future__ import annotations

import pytest
import zmq

from vllm_hetero_pd.connector import mq_spin

shm_broadcast = pytest.importorskip("vllm.distributed.device_communicators.shm_broadcast",
                                    reason="vLLM is not installed in this environment")


@pytest.fixture
def restored(monkeypatch):
    """Undo the module-level replacement after each test."""
    monkeypatch.setattr(shm_broadcast, "SpinCondition", shm_broadcast.SpinCondition)
    if hasattr(shm_broadcast, "_hetero_pd_original_spin_condition"):
        monkeypatch.delattr(shm_broadcast, "_hetero_pd_original_spin_condition")
    yield
    if hasattr(shm_broadcast, "_hetero_pd_original_spin_condition"):
        del shm_broadcast._hetero_pd_original_spin_condition


def test_a_reader_built_after_the_bound_spins_that_long_and_vllms_default_is_one_second(restored, tmp_path):
    context = zmq.Context()
    try:
        address = f"ipc://{tmp_path}/notify"
        assert shm_broadcast.SpinCondition(is_reader=True, context=context, notify_address=address).busy_loop_s == 1
        assert mq_spin.set_mq_spin(0.001)
        reader = shm_broadcast.SpinCondition(is_reader=True, context=context, notify_address=address + "2")
        assert reader.busy_loop_s == 0.001
        assert mq_spin.set_mq_spin(0.002)  # applied twice: wraps vLLM's class, not the earlier wrapper
        assert shm_broadcast.SpinCondition.__mro__[1] is shm_broadcast._hetero_pd_original_spin_condition
    finally:
        context.destroy(linger=0)


def test_the_message_queue_looks_the_class_up_when_it_builds_one(restored):
    """The replacement only works because MessageQueue names SpinCondition at build time."""
    import inspect

    assert "SpinCondition(" in inspect.getsource(shm_broadcast.MessageQueue.__init__)


@pytest.mark.parametrize("raw, message", [("fast", "is not a number"), ("-1", "between 0 and 10"),
                                          ("11", "between 0 and 10")])
def test_a_bad_value_is_an_error_naming_the_variable(restored, monkeypatch, raw, message):
    monkeypatch.setenv(mq_spin.ENV_VAR, raw)
    with pytest.raises(ValueError, match=message) as info:
        mq_spin.apply_mq_spin_from_env()
    assert mq_spin.ENV_VAR in str(info.value)


def test_unset_leaves_vllm_alone(restored, monkeypatch):
    monkeypatch.delenv(mq_spin.ENV_VAR, raising=False)
    original = shm_broadcast.SpinCondition
    mq_spin.apply_mq_spin_from_env()
    assert shm_broadcast.SpinCondition is original
