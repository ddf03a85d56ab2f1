"""Queueing formulas the performance model needs, and nothing else.

* Prefill behaves as an M/D/1 queue (DistServe sec. 3.1): Poisson arrivals, deterministic service D.
  Its mean wait is Pollaczek-Khinchine's ``rho D / (2 (1 - rho))``. For quantiles we use the standard
  exponential-tail approximation: with probability ``rho`` a request waits, and then the wait is
  exponential with the mean that makes the overall mean match P-K. Exact M/D/1 quantiles need an
  alternating series that loses all precision at high load; this form is monotone and stable.
* Running decodes form an M/G/infinity system while the batch is below its cap: the number in
  service is Poisson with mean ``rate x time in service`` (Little's law), whatever the output
  length distribution, so batch-size quantiles are Poisson quantiles.
"""

from __future__ import annotations

import math


def md1_mean_wait(rate: float, service_s: float) -> float:
    """Mean M/D/1 waiting time, Pollaczek-Khinchine ``rho D / (2 (1 - rho))``; inf when unstable."""
    rho = rate * service_s
    return rho * service_s / (2 * (1 - rho)) if rho < 1 else math.inf


def md1_wait_quantile(rate: float, service_s: float, q: float) -> float:
    """q-quantile of the M/D/1 waiting time (excluding service); inf when the queue is unstable."""
    rho = rate * service_s
    if rho >= 1:
        return math.inf
    if rho <= 1 - q:
        return 0.0
    return (md1_mean_wait(rate, service_s) / rho) * math.log(rho / (1 - q))


def poisson_quantile(mean: float, q: float) -> int:
    """Smallest k with P(Poisson(mean) <= k) >= q."""
    if mean <= 0:
        return 0
    if mean > 500:  # normal approximation; the pmf below would underflow
        return math.ceil(mean + _normal_quantile(q) * math.sqrt(mean) - 0.5)
    k, pmf = 0, math.exp(-mean)
    cdf = pmf
    while cdf < q:
        k += 1
        pmf *= mean / k
        cdf += pmf
    return k


def largest_poisson_mean(max_quantile: int, q: float) -> float:
    """Largest mean whose q-quantile is at most ``max_quantile`` (bisection; the quantile is monotone)."""
    if max_quantile < 0:
        return 0.0
    lo, hi = 0.0, max_quantile + 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if poisson_quantile(mid, q) <= max_quantile:
            lo = mid
        else:
            hi = mid
    return lo


def _normal_quantile(q: float) -> float:
    """Inverse standard normal CDF by bisection on math.erf (only used for very large means)."""
    lo, hi = -10.0, 10.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
