"""The pure half of ``bench goodput``: the workload schedule, per-request SLO scoring, the summary
over repetitions, the crossover and the tables. Nothing here starts an engine or opens a socket.

Goodput at a rate is ``rate x attainment``: the offered requests/s times the share of them whose
own TTFT and own mean TPOT both meet the SLO. A request that failed counts as a miss. Latency
percentiles are over the requests that completed.
"""

from __future__ import annotations

import math
import random
import statistics

import msgspec

from vllm_hetero_pd.planner.calibrate import Completion
from vllm_hetero_pd.planner.goodput import Predicted, RequestSlo
from vllm_hetero_pd.planner.pd_validate import arrivals, quantiles

CONFIGS = ("monolithic", "pd")
LABELS = {"monolithic": "monolithic (2 cores)", "pd": "P/D (1 + 1 cores)"}
PREDICTED_MARGIN = 0.01  # a predicted win must exceed this share of the offered rate
ENGINE_START_S, CALIBRATION_S, TAIL_S = 120.0, 180.0, 8.0  # estimates for expected_s


class Mix(msgspec.Struct, frozen=True, kw_only=True):
    """Prompt and answer lengths, each drawn uniformly from its inclusive range."""

    isl: tuple[int, int] = (512, 1536)
    osl: tuple[int, int] = (128, 256)

    def __post_init__(self) -> None:
        for name, (low, high) in (("isl", self.isl), ("osl", self.osl)):
            if not 1 <= low <= high:
                raise ValueError(f"--{name} range must be 1 <= low <= high, got {low}-{high}")
        if self.osl[0] < 2:
            raise ValueError("--osl must be >= 2: TPOT needs two tokens")

    @property
    def mean_isl(self) -> int:
        return round(sum(self.isl) / 2)

    @property
    def mean_osl(self) -> int:
        return round(sum(self.osl) / 2)


class Request(msgspec.Struct, frozen=True):
    """One arrival: when (seconds after the run starts), how long its prompt, how many tokens back."""

    offset_s: float
    isl: int
    osl: int


def schedule(mix: Mix, rate: float, count: int, seed: int) -> list[Request]:
    """``count`` Poisson arrivals at ``rate`` with seeded lengths: the same seed gives the same run,
    so both settings at one (rate, repetition) serve exactly the same requests."""
    rng = random.Random(seed ^ 0x5EED)  # lengths apart from the arrival stream
    return [Request(t, rng.randint(*mix.isl), rng.randint(*mix.osl)) for t in arrivals(rate, count, seed)]


class Timing(msgspec.Struct, frozen=True):
    """Client-side TTFT and mean TPOT of one completed request (seconds)."""

    ttft_s: float
    tpot_s: float


def timing(completion: Completion, num_tokens: int) -> Timing:
    """TPOT as ``vllm bench serve`` defines it: (last token - first token) / (``num_tokens`` - 1),
    over the tokens asked for (EOS is ignored, so that many arrive). Counting chunks instead would
    shrink the TPOT of a stream an overloaded server delivers in bursts."""
    times = completion.chunk_times
    return Timing(completion.ttft_s, (times[-1] - times[0]) / (num_tokens - 1))


class Run(msgspec.Struct, frozen=True, kw_only=True):
    """One setting at one rate, one repetition."""

    config: str
    rate: float
    repeat: int
    timings: list[Timing]
    errors: list[str]

    def misses(self, slo: RequestSlo) -> tuple[int, int]:
        """Completed requests over the TTFT limit, and over the TPOT limit (a request can be both)."""
        return (sum(t.ttft_s > slo.ttft_s for t in self.timings), sum(t.tpot_s > slo.tpot_s for t in self.timings))

    def attainment(self, slo: RequestSlo) -> float:
        met = sum(t.ttft_s <= slo.ttft_s and t.tpot_s <= slo.tpot_s for t in self.timings)
        return met / (len(self.timings) + len(self.errors))

    def latencies(self) -> tuple[float, float, float, float]:
        """TTFT p50, p90, TPOT p50, p90 (s) of the completed requests."""
        return (*quantiles([t.ttft_s for t in self.timings]), *quantiles([t.tpot_s for t in self.timings]))


class Spread(msgspec.Struct, frozen=True):
    """Mean over repetitions and the lowest and highest of them."""

    mean: float
    low: float
    high: float

    def cell(self, scale: float = 1.0, digits: int = 2) -> str:
        """``mean (low-high)``, or just the value when it ran once."""
        if self.low == self.high:
            return f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} ({self.low * scale:.{digits}f}-{self.high * scale:.{digits}f})"


def spread(values: list[float]) -> Spread:
    return Spread(statistics.fmean(values), min(values), max(values))


class Point(msgspec.Struct, frozen=True, kw_only=True):
    """One setting at one rate over all repetitions, with the planner's prediction beside it."""

    config: str
    rate: float
    goodput: Spread
    attainment: Spread
    ttft_p50_s: Spread
    ttft_p90_s: Spread
    tpot_p50_s: Spread
    tpot_p90_s: Spread
    miss_ttft: int  # summed over repetitions
    miss_tpot: int
    requests: int
    errors: int
    predicted: Predicted | None


def summarize(runs: list[Run], slo: RequestSlo, predictions: dict[tuple[str, float], Predicted]) -> list[Point]:
    """One Point per (setting, rate), in rate order, monolithic first."""
    points = []
    for rate in sorted({r.rate for r in runs}):
        for config in CONFIGS:
            mine = [r for r in runs if r.rate == rate and r.config == config]
            if not mine:
                continue
            lat = list(zip(*(r.latencies() for r in mine)))
            misses = [r.misses(slo) for r in mine]
            points.append(Point(config=config, rate=rate, goodput=spread([rate * r.attainment(slo) for r in mine]),
                                attainment=spread([r.attainment(slo) for r in mine]),
                                ttft_p50_s=spread(list(lat[0])), ttft_p90_s=spread(list(lat[1])),
                                tpot_p50_s=spread(list(lat[2])), tpot_p90_s=spread(list(lat[3])),
                                miss_ttft=sum(m[0] for m in misses), miss_tpot=sum(m[1] for m in misses),
                                requests=sum(len(r.timings) + len(r.errors) for r in mine),
                                errors=sum(len(r.errors) for r in mine), predicted=predictions.get((config, rate))))
    return points


def pairs(points: list[Point]) -> list[tuple[Point, Point]]:
    """(monolithic, P/D) at every rate both ran."""
    by = {(p.config, p.rate): p for p in points}
    return [(by[("monolithic", r)], by[("pd", r)]) for r in sorted({p.rate for p in points})
            if ("monolithic", r) in by and ("pd", r) in by]


def wins(points: list[Point]) -> list[float]:
    """Rates at which P/D's goodput beats monolithic's in every repetition (its lowest repetition
    above monolithic's highest): a lead inside the noise is not a win."""
    return [pd.rate for mono, pd in pairs(points) if pd.goodput.low > mono.goodput.high]


def crossover(points: list[Point]) -> float | None:
    """The lowest rate P/D wins at, or None."""
    return min(wins(points), default=None)


def expected_s(rates: list[float], requests: int, repeat: int, calibrate: bool) -> float:
    """Rough wall time of a run: arrivals span ``requests / rate`` per setting, rate and repetition,
    plus the last answer's tail, the engines' start and the calibration (estimates for this 2-core
    box: engines start in 45-60 s each, and three start at once)."""
    measuring = repeat * len(CONFIGS) * sum(requests / rate + TAIL_S for rate in rates)
    return ENGINE_START_S + (CALIBRATION_S if calibrate else 0.0) + measuring


def first_win(rates: list[float], mono: list[float], pd: list[float]) -> float | None:
    """Lowest rate at which predicted P/D goodput beats monolithic's by ``PREDICTED_MARGIN`` of the
    rate (predictions carry no spread; differences below that are not a win anyone acts on)."""
    for rate, m, p in zip(rates, mono, pd):
        if p - m > PREDICTED_MARGIN * rate:
            return rate
    return None


def verdict(points: list[Point], slo: RequestSlo) -> str:
    """The measured answer in one paragraph, with the numbers it rests on."""
    both = pairs(points)
    if not both:
        return "no rate ran in both settings"
    rate = crossover(points)
    if rate is not None:
        mono, pd = next(pair for pair in both if pair[0].rate == rate)
        return (f"P/D beats monolithic from {rate:g} req/s: goodput {pd.goodput.cell()} vs {mono.goodput.cell()} "
                f"req/s (SLO met {pd.attainment.mean:.0%} vs {mono.attainment.mean:.0%}); it wins at "
                f"{', '.join(f'{r:g}' for r in wins(points))} req/s.")
    low_mono, low_pd = both[0]
    mono, pd = max(both, key=lambda pair: pair[0].goodput.mean - pair[1].goodput.mean)
    # where monolithic leads most, or (if it never leads on the mean) where P/D leads least
    lead = "leads most" if mono.goodput.mean > pd.goodput.mean else "is never ahead on the mean; closest"
    ahead = [f"{p.rate:g}" for m, p in both if p.goodput.mean > m.goodput.mean]
    return (f"P/D does not beat monolithic here ({both[0][0].rate:g}-{both[-1][0].rate:g} req/s"
            + (f"; ahead on the mean at {', '.join(ahead)} req/s but inside the repetitions' spread" if ahead else "")
            + f"). Monolithic {lead} at {mono.rate:g} req/s: goodput {pd.goodput.cell()} (P/D) vs "
            f"{mono.goodput.cell()} req/s; {_misses(pd, slo)} for P/D, {_misses(mono, slo)} for monolithic. "
            f"At the lowest rate ({low_mono.rate:g} req/s) TTFT p50 is {low_pd.ttft_p50_s.mean * 1e3:.0f} ms for P/D "
            f"vs {low_mono.ttft_p50_s.mean * 1e3:.0f} ms, TPOT p50 {low_pd.tpot_p50_s.mean * 1e3:.1f} vs "
            f"{low_mono.tpot_p50_s.mean * 1e3:.1f} ms.")


def _misses(point: Point, slo: RequestSlo) -> str:
    return (f"{point.miss_ttft} of {point.requests} requests over TTFT {slo.ttft_s * 1e3:g} ms, {point.miss_tpot} "
            f"over TPOT {slo.tpot_s * 1e3:g} ms, {point.errors} failed")


def _ms(spread_s: Spread, predicted_s: float | None, digits: int) -> str:
    """Measured ms with its spread, and the prediction after a slash."""
    cell = spread_s.cell(1e3, digits)
    if predicted_s is None:
        return cell
    return f"{cell} / {'inf' if math.isinf(predicted_s) else f'{predicted_s * 1e3:.{digits}f}'}"


def goodput_table(points: list[Point]) -> str:
    """Per rate: goodput of each setting, measured (mean and range over repetitions) / predicted."""
    def cell(p: Point) -> str:
        pred = "-" if p.predicted is None else f"{p.predicted.goodput:.2f}"
        return f"{p.goodput.cell()} / {pred} | {p.attainment.mean:.0%}"

    lines = ["| rate (req/s) | monolithic goodput meas / pred (req/s) | SLO met | P/D goodput meas / pred (req/s) "
             "| SLO met |", "|---|---|---|---|---|"]
    lines += [f"| {mono.rate:g} | {cell(mono)} | {cell(pd)} |" for mono, pd in pairs(points)]
    return "\n".join(lines)


def latency_table(points: list[Point]) -> str:
    """Per rate and setting: TTFT and TPOT p50/p90 in ms, measured (range) / predicted, and misses."""
    lines = ["| rate (req/s) | setting | TTFT p50 meas / pred (ms) | TTFT p90 | TPOT p50 meas / pred (ms) | TPOT p90 "
             "| misses TTFT, TPOT, failed / requests |", "|---|---|---|---|---|---|---|"]
    for p in points:
        measured = (p.ttft_p50_s, p.ttft_p90_s, p.tpot_p50_s, p.tpot_p90_s)
        pred = [None] * 4 if p.predicted is None else [*p.predicted.ttft_s, *p.predicted.tpot_s]
        cells = [_ms(m, q, digits) for m, q, digits in zip(measured, pred, (0, 0, 1, 1))]
        lines.append(f"| {p.rate:g} | {LABELS[p.config]} | " + " | ".join(cells)
                     + f" | {p.miss_ttft}, {p.miss_tpot}, {p.errors} / {p.requests} |")
    return "\n".join(lines)
