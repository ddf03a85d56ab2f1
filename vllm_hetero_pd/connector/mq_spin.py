"""Bound how long vLLM's shared-memory message-queue readers spin before they sleep (opt-in).

vLLM's ``SpinCondition`` (``distributed/device_communicators/shm_broadcast.py``, 0.28 to 0.32)
makes a queue reader, such as a worker waiting for its engine core's next step, call
``sched_yield`` in a loop for ``busy_loop_s`` = 1 s after every message. Only after that does it
sleep on a ZMQ notification. That is cheap on a dedicated core. It is not cheap when engines
share cores:

* A prefill that holds KV leases keeps its engine stepping, because vLLM keeps a request whose
  blocks are held.
* Our connector sleeps 2 ms on such an idle step (``scheduler.IDLE_STEP_S``), so the worker gets a
  message every 2 ms and never stops spinning.
* Two such spinners on one core starve each other. Measured with two prefill engines bound to
  one core: while one held a single lease, a 200-token prefill on the other took 30 s instead of
  0.4 s. It finished only when the lease expired.

``HETERO_PD_MQ_SPIN_S`` sets ``busy_loop_s`` for every queue built in this process. The local
launcher sets 0.001, which is below the idle step, so an idle reader goes to sleep; busy steps
follow each other faster than that, so they still spin. It is applied from the vLLM plugin entry
point, which runs in every vLLM process before any queue is built.
"""

from __future__ import annotations

import os

from vllm_hetero_pd.log import get_logger

ENV_VAR = "HETERO_PD_MQ_SPIN_S"
logger = get_logger(__name__)


def apply_mq_spin_from_env() -> None:
    """Apply ``HETERO_PD_MQ_SPIN_S`` if set; a bad value raises rather than being ignored."""
    raw = os.environ.get(ENV_VAR)
    if not raw:
        return
    try:
        spin_s = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_VAR}={raw!r} is not a number of seconds") from None
    if not 0 <= spin_s <= 10:
        raise ValueError(f"{ENV_VAR} must be between 0 and 10 seconds, got {spin_s:g}")
    set_mq_spin(spin_s)


def set_mq_spin(spin_s: float) -> bool:
    """Make every ``SpinCondition`` built from now on spin ``spin_s`` seconds; False where this vLLM has none.

    The message queue looks ``SpinCondition`` up in its module when it builds one, so replacing
    the module's name with a subclass reaches every queue built later.
    """
    from vllm.distributed.device_communicators import shm_broadcast

    base = getattr(shm_broadcast, "_hetero_pd_original_spin_condition", getattr(shm_broadcast, "SpinCondition", None))
    if base is None:
        logger.debug("this vLLM has no SpinCondition; %s has no effect", ENV_VAR)
        return False

    class BoundedSpinCondition(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{**kwargs, "busy_loop_s": spin_s})

    shm_broadcast._hetero_pd_original_spin_condition = base
    shm_broadcast.SpinCondition = BoundedSpinCondition
    logger.debug("vLLM message-queue readers spin %g s before they sleep", spin_s)
    return True
