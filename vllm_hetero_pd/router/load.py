"""What each instance's own ``/metrics`` says about its load, polled in the background.

From vLLM (0.32 names, summed over the engines of one server): ``vllm:kv_cache_usage_perc``
(fraction of KV blocks in use; averaged), ``vllm:num_requests_waiting``/``running``, the KV size
from ``vllm:cache_config_info``'s ``num_gpu_blocks`` and ``block_size`` labels, the prefix cache
counters, and ``process_start_time_seconds`` (a new value means the server restarted). From our
connector on a decode: ``vllm:hetero_pd_transfer_seconds`` and ``vllm:hetero_pd_translate_seconds``
(``_sum``/``_count``), which ``TransferRate`` turns into seconds per token moved, using the tokens
the router itself handed that decode with KV params between two scrapes.

Only the lines the router needs are parsed (a page of histograms is long, and this runs on the
router's event loop), so a text scan, not a full Prometheus parser.
"""

from __future__ import annotations

import msgspec

_WANTED = ("vllm:kv_cache_usage_perc", "vllm:num_requests_waiting", "vllm:num_requests_running",
           "vllm:cache_config_info", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
           "vllm:hetero_pd_transfer_seconds_sum", "vllm:hetero_pd_translate_seconds_sum",
           "vllm:num_preemptions_total", "process_start_time_seconds")
_EWMA_ALPHA = 0.3  # weight of the newest interval in the per-token transfer estimate


class LoadSample(msgspec.Struct, frozen=True, kw_only=True):
    """One scrape. ``kv_usage`` is None when the page has no such gauge (not a vLLM server)."""

    kv_usage: float | None = None
    num_waiting: int = 0
    num_running: int = 0
    capacity_tokens: int | None = None
    block_size: int | None = None
    prefix_queries: float = 0.0
    prefix_hits: float = 0.0
    transfer_s_total: float | None = None
    translate_s_total: float | None = None
    num_preemptions: float = 0.0
    start_time: float | None = None


def parse_metrics(text: str) -> LoadSample:
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    capacity = block_size = None
    for line in text.splitlines():
        if not line.startswith(_WANTED):
            continue
        name, _, rest = line.partition("{")
        labels = ""
        if rest:
            labels, _, value_text = rest.rpartition("}")
        else:
            name, _, value_text = line.partition(" ")
        try:
            value = float(value_text.split()[0])
        except (ValueError, IndexError):
            continue
        name = name.strip()
        if name == "vllm:cache_config_info":
            info = _labels(labels)
            try:
                blocks, size = int(info["num_gpu_blocks"]), int(info["block_size"])
            except (KeyError, ValueError):
                continue
            capacity = (capacity or 0) + blocks * size
            block_size = size
            continue
        sums[name] = sums.get(name, 0.0) + value
        counts[name] = counts.get(name, 0) + 1
    usage = sums.get("vllm:kv_cache_usage_perc")
    return LoadSample(
        kv_usage=None if usage is None else usage / counts["vllm:kv_cache_usage_perc"],
        num_waiting=int(sums.get("vllm:num_requests_waiting", 0)),
        num_running=int(sums.get("vllm:num_requests_running", 0)),
        capacity_tokens=capacity, block_size=block_size,
        prefix_queries=sums.get("vllm:prefix_cache_queries_total", 0.0),
        prefix_hits=sums.get("vllm:prefix_cache_hits_total", 0.0),
        transfer_s_total=sums.get("vllm:hetero_pd_transfer_seconds_sum"),
        translate_s_total=sums.get("vllm:hetero_pd_translate_seconds_sum"),
        num_preemptions=sums.get("vllm:num_preemptions_total", 0.0),
        start_time=sums.get("process_start_time_seconds"))


def _labels(text: str) -> dict[str, str]:
    """``a="1",b="x"`` -> dict (label values here hold no quotes or commas)."""
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if sep:
            out[key.strip()] = value.strip().strip('"')
    return out


class TransferRate:
    """Seconds per token a decode spends moving (or translating) KV, from its histogram's ``_sum``
    over the tokens the router handed it between two scrapes (an EWMA over intervals)."""

    __slots__ = ("seconds_per_token", "_last_total", "_tokens")

    def __init__(self) -> None:
        self.seconds_per_token: float | None = None
        self._last_total: float | None = None
        self._tokens = 0

    def add_tokens(self, num_tokens: int) -> None:
        self._tokens += num_tokens

    def update(self, total_s: float | None) -> None:
        if total_s is None:
            return
        if self._last_total is None or total_s < self._last_total:  # first scrape, or the server restarted
            self._last_total, self._tokens = total_s, 0
            return
        delta = total_s - self._last_total
        if self._tokens > 0 and delta > 0:
            sample = delta / self._tokens
            old = self.seconds_per_token
            self.seconds_per_token = sample if old is None else old + _EWMA_ALPHA * (sample - old)
            self._last_total, self._tokens = total_s, 0
        elif self._tokens == 0:
            self._last_total = total_s
