"""Make vLLM's shared-memory message-queue readers nap instead of spin on ``sched_yield`` (opt-in).

vLLM's ``SpinCondition`` (``distributed/device_communicators/shm_broadcast.py``, 0.28 to 0.32)
makes a queue reader, such as a worker waiting for its engine core's next step, call
``sched_yield`` in a loop for ``busy_loop_s`` = 1 s after every message. Only after that does it
sleep on a ZMQ notification. That is cheap on a dedicated core. It is not cheap when engines
share cores:

* A prefill that holds KV leases keeps its engine stepping, because vLLM keeps a request whose
  blocks are held.
* Such an idle step takes 2 ms (``scheduler.IDLE_STEP_S``, spent in the worker), so the worker
  gets a message every 2 ms and never stops spinning between them, nor does the engine core
  waiting for its answer.
* A spinner on a core starves other engines bound to it. Measured with two prefill engines bound
  to one core: while one held a single lease, a 200-token prefill on the other took 30 s instead
  of 0.4 s. It finished only when the lease expired.

Shortening the 1 s window is not the answer: readers then depend on the ZMQ notification,
and a missed one costs vLLM's 5 s recheck interval (a monolithic engine's first 128 tokens took
11 s instead of 0.8 s, measured). So ``HETERO_PD_MQ_NAP_S`` keeps vLLM's window and its
notifications and replaces each ``sched_yield`` inside the window with a sleep of that many
seconds. A reader still looks at the queue every nap, so no message waits on a notification,
and the core is free in between. The local launcher sets 0.0001 (100 µs). The variable is applied
from the vLLM plugin entry point, which runs in every vLLM process before any queue is built.
"""

from __future__ import annotations

import os
import time

from vllm_hetero_pd.log import get_logger

ENV_VAR = "HETERO_PD_MQ_NAP_S"
logger = get_logger(__name__)


def apply_mq_nap_from_env() -> None:
    """Apply ``HETERO_PD_MQ_NAP_S`` if set; a bad value raises rather than being ignored."""
    raw = os.environ.get(ENV_VAR)
    if not raw:
        return
    try:
        nap_s = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_VAR}={raw!r} is not a number of seconds") from None
    if not 0 < nap_s <= 0.01:
        raise ValueError(f"{ENV_VAR} must be above 0 and at most 0.01 seconds, got {nap_s:g}")
    set_mq_nap(nap_s)


def set_mq_nap(nap_s: float) -> bool:
    """Make every ``SpinCondition`` built from now on nap ``nap_s`` seconds where vLLM's would
    yield; False where this vLLM has none.

    The message queue looks ``SpinCondition`` up in its module when it builds one, so replacing
    the module's name with a subclass reaches every queue built later.
    """
    from vllm.distributed.device_communicators import shm_broadcast

    base = getattr(shm_broadcast, "_hetero_pd_original_spin_condition", getattr(shm_broadcast, "SpinCondition", None))
    if base is None:
        logger.debug("this vLLM has no SpinCondition; %s has no effect", ENV_VAR)
        return False

    class NappingSpinCondition(base):  # type: ignore[misc, valid-type]
        def wait(self, timeout_ms: int | None = None) -> None:
            if self.is_reader and time.monotonic() <= self.last_read + self.busy_loop_s:
                time.sleep(nap_s)  # where vLLM calls sched_yield: the next look is nap_s away
                return
            super().wait(timeout_ms)

    shm_broadcast._hetero_pd_original_spin_condition = base
    shm_broadcast.SpinCondition = NappingSpinCondition
    logger.debug("vLLM message-queue readers nap %g s between looks instead of yielding", nap_s)
    return True
