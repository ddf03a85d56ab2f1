"""The workload the ratio controller sees: arrivals and their ISL/OSL over a sliding window.

One sample per P/D exchange, taken when it arrives: its prompt tokens (the router's count, exact
with ``--tokenizer``) and its output tokens (``max_tokens``, else ``scoring.expected_output_tokens``:
the router answers before it knows how long a stream will be, and the model sizes a decode by
what it may have to hold). Times come from the caller, so the window is deterministic in tests.
"""

from __future__ import annotations

from collections import deque

from vllm_hetero_pd.router.ratio import Observation


class WorkloadWindow:
    """Samples of the last ``window_s`` seconds with running sums, so ``observe`` is O(evicted)."""

    __slots__ = ("window_s", "started_s", "_samples", "_num_prompt_tokens", "_num_output_tokens")

    def __init__(self, window_s: float, started_s: float) -> None:
        self.window_s = window_s
        self.started_s = started_s
        self._samples: deque[tuple[float, int, int]] = deque()
        self._num_prompt_tokens = 0
        self._num_output_tokens = 0

    def add(self, now_s: float, num_prompt_tokens: int, num_output_tokens: int) -> None:
        self._samples.append((now_s, num_prompt_tokens, num_output_tokens))
        self._num_prompt_tokens += num_prompt_tokens
        self._num_output_tokens += num_output_tokens

    def observe(self, now_s: float) -> Observation:
        """The window's rate (over its length, or the time since start while that is shorter) and means."""
        while self._samples and self._samples[0][0] <= now_s - self.window_s:
            _, isl, osl = self._samples.popleft()
            self._num_prompt_tokens -= isl
            self._num_output_tokens -= osl
        n = len(self._samples)
        span = min(self.window_s, now_s - self.started_s)
        return Observation(rate=n / span if span > 0 else 0.0, isl=self._num_prompt_tokens / n if n else 0.0,
                           osl=self._num_output_tokens / n if n else 0.0, num_requests=n)
