"""``bench dynamic``'s numbers: goodput and latency quantiles per phase, the results table and the plot.

A request is *good* when it was not lost and met both SLOs: TTFT at most ``Slo.ttft_s`` and TPOT
at most ``Slo.tpot_s`` (a request whose tokens all came in its first chunk has no TPOT and is
judged by its TTFT alone). Goodput is the count of good requests and their share of the phase's
scheduled requests, so a lost request counts against it. Quantiles are ``pd_validate.quantiles``
(p50, p90; NaN with nothing measured) over the requests that were not lost.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import msgspec

from vllm_hetero_pd.launch.phased_workload import ScheduledRequest
from vllm_hetero_pd.launch.role_timeline import RoleSample
from vllm_hetero_pd.launch.timed_stream import StreamResult
from vllm_hetero_pd.planner.pd_validate import quantiles
from vllm_hetero_pd.testing.compare import Completion, compare_batched, max_logprob_delta

ALL = "whole run"
BATCHED_LOGPROB_TOLERANCE = 0.25
"""Top-logprob tolerance for answers served under load. The reference is computed one request at a
time; under load vLLM batches each request with others and chunks long prompts differently, and
in bf16 that alone moves logprobs: the first pilot's answers, all with equal greedy ids, differed
by 0.06-0.12 in every configuration, static ones included, and the monolithic engine replaying the
same schedule (the control in the results) flipped a greedy id at a near tie. So answers are compared
with ``testing.compare.compare_batched``: a flip is accepted only at a near tie within this tolerance.
It is a coarse guard: KV errors that move logprobs by less pass it; the strict check (1e-3, one request
at a time) is the end-to-end tests'."""


class Slo(msgspec.Struct, frozen=True, kw_only=True):
    """The per-request targets goodput counts against, and where they came from."""

    ttft_s: float
    tpot_s: float
    source: str

    def met(self, result: StreamResult) -> bool:
        return (not result.lost and result.ttft_s <= self.ttft_s
                and (result.tpot_s is None or result.tpot_s <= self.tpot_s))


class PhaseStats(msgspec.Struct, frozen=True, kw_only=True):
    """One configuration's requests of one phase (or of the whole run)."""

    requests: int
    lost: int
    good: int
    ttft_p50_s: float
    ttft_p90_s: float
    tpot_p50_s: float
    tpot_p90_s: float

    @property
    def goodput(self) -> float:
        return self.good / self.requests if self.requests else math.nan


class ConfigReport(msgspec.Struct, frozen=True, kw_only=True):
    """One configuration's run: per phase (and ``ALL``), flips, correctness and the engines afterwards."""

    name: str
    phases: dict[str, PhaseStats]
    role_flips: int
    mismatches: int
    in_flight_during_flips: int
    mismatches_during_flips: int
    near_ties: int
    max_logprob_delta: float
    kv_usage_after: dict[str, float]

    @property
    def lost(self) -> int:
        return self.phases[ALL].lost


def phase_stats(results: Sequence[StreamResult], slo: Slo) -> PhaseStats:
    """Goodput and quantiles of ``results``; pure."""
    kept = [r for r in results if not r.lost]
    ttft = quantiles([r.ttft_s for r in kept])
    tpot = quantiles([r.tpot_s for r in kept if r.tpot_s is not None])
    return PhaseStats(requests=len(results), lost=len(results) - len(kept), good=sum(slo.met(r) for r in results),
                      ttft_p50_s=ttft[0], ttft_p90_s=ttft[1], tpot_p50_s=tpot[0], tpot_p90_s=tpot[1])


def stats_by_phase(requests: Sequence[ScheduledRequest], results: Sequence[StreamResult], slo: Slo,
                   phase_names: Sequence[str]) -> dict[str, PhaseStats]:
    """``phase_stats`` of each phase's requests (by schedule, not by when they finished), then of all."""
    out = {name: phase_stats([res for req, res in zip(requests, results, strict=True) if req.phase == name], slo)
           for name in phase_names}
    out[ALL] = phase_stats(results, slo)
    return out


def mismatches(references: Sequence[Completion], results: Sequence[StreamResult],
               tolerance: float = BATCHED_LOGPROB_TOLERANCE) -> tuple[dict[int, str], list[int]]:
    """Request index -> how its answer differs from the monolithic one (``compare_batched``), and the
    requests whose ids diverged at a near tie, over the requests that were not lost (those count as lost)."""
    kept = [r for r in results if not r.lost]
    found, near = compare_batched([references[r.index] for r in kept], [r.completion for r in kept], tolerance)
    return {kept[m.prompt_index].index: m.reason for m in found}, [kept[i].index for i in near]


def largest_delta(references: Sequence[Completion], results: Sequence[StreamResult]) -> float:
    """The largest top-logprob difference from the reference over answers with the reference's greedy ids."""
    deltas = [max_logprob_delta(references[r.index], r.completion) for r in results
              if not r.lost and r.completion.token_ids == references[r.index].token_ids]
    return max(deltas, default=0.0)


class GoalRow(msgspec.Struct, frozen=True, kw_only=True):
    """Issue 15's goal in one phase: dynamic's good requests against the better static split's."""

    phase: str
    dynamic_good: float
    best_static: str
    best_good: float

    @property
    def met(self) -> bool:
        """At least the better static split in a phase, strictly above both over the whole run."""
        return self.dynamic_good > self.best_good if self.phase == ALL else self.dynamic_good >= self.best_good

    def line(self) -> str:
        need = ">" if self.phase == ALL else ">="
        return (f"* {self.phase}: dynamic {self.dynamic_good:g} good vs best static {self.best_good:g} "
                f"({self.best_static}): {'met' if self.met else 'missed'} (goal {need})")


def goal_rows(good: Mapping[str, Mapping[str, float]], dynamic: str) -> list[GoalRow]:
    """The goal per phase from good counts by configuration and phase (one run's, or medians over rounds)."""
    if dynamic not in good or len(good) < 2:
        return []
    statics = [name for name in good if name != dynamic]
    rows = []
    for phase, got in good[dynamic].items():
        best = max(statics, key=lambda name: good[name][phase])
        rows.append(GoalRow(phase=phase, dynamic_good=got, best_static=best, best_good=good[best][phase]))
    return rows


def good_counts(reports: Sequence[ConfigReport]) -> dict[str, dict[str, float]]:
    return {r.name: {phase: s.good for phase, s in r.phases.items()} for r in reports}


def goal_lines(reports: Sequence[ConfigReport], dynamic: str) -> list[str]:
    """Issue 15's goal, checked: dynamic goodput >= the better static split in each phase, > both overall."""
    return [row.line() for row in goal_rows(good_counts(reports), dynamic)]


def summary_lines(rounds: Sequence[Sequence[ConfigReport]], dynamic: str) -> list[str]:
    """Every round side by side: good requests per round with their median and range, latency medians,
    and the goal checked on the medians and in each round."""
    names = [r.name for r in rounds[0]]
    by_round = [{r.name: r for r in reports} for reports in rounds]  # rounds may run configurations in any order
    lines = ["| config | phase | requests | good per round | median good | range | TTFT p50 ms (median) | "
             "TPOT p50 ms (median) | TPOT p90 ms (median) |", "|---" * 9 + "|"]
    medians: dict[str, dict[str, float]] = {}
    for name in names:
        for phase in by_round[0][name].phases:
            stats = [reports[name].phases[phase] for reports in by_round]
            good = [s.good for s in stats]
            medians.setdefault(name, {})[phase] = statistics.median(good)
            lines.append(f"| {name} | {phase} | {stats[0].requests} | {', '.join(map(str, good))} | "
                         f"{statistics.median(good):g} | {min(good)}-{max(good)} | "
                         f"{_ms(_median([s.ttft_p50_s for s in stats]))} | "
                         f"{_ms(_median([s.tpot_p50_s for s in stats]), 1)} | "
                         f"{_ms(_median([s.tpot_p90_s for s in stats]), 1)} |")
    per_round = [goal_rows(good_counts(reports), dynamic) for reports in rounds]
    lines += ["", f"Goal on the medians of {len(rounds)} round(s):"]
    for row in goal_rows(medians, dynamic):
        met_in = sum(r.met for rows in per_round for r in rows if r.phase == row.phase)
        lines.append(f"{row.line()}; met in {met_in} of {len(rounds)} rounds")
    return lines


def _median(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.median(kept) if kept else math.nan


def sensitivity_lines(requests: Sequence[ScheduledRequest], rounds: Sequence[Mapping[str, Sequence[StreamResult]]],
                      slo: Slo, factors: Sequence[float], phase_names: Sequence[str]) -> list[str]:
    """Median good requests per configuration and phase with the TPOT SLO scaled by each factor (TTFT
    SLO kept): whether the goal's verdict hangs on where the SLO was put. The controller ran with 1x."""
    names = list(rounds[0])
    lines = ["| config | phase | " + " | ".join(f"TPOT <= {f * slo.tpot_s * 1e3:.1f} ms ({f:g}x)" for f in factors)
             + " |", "|---|---|" + "---|" * len(factors)]
    for name in names:
        for phase in [*phase_names, ALL]:
            cells = []
            for factor in factors:
                scaled = msgspec.structs.replace(slo, tpot_s=slo.tpot_s * factor)
                good = [stats_by_phase(requests, results[name], scaled, phase_names)[phase].good for results in rounds]
                cells.append(f"{statistics.median(good):g}")
            lines.append(f"| {name} | {phase} | " + " | ".join(cells) + " |")
    return lines


def markdown(reports: Sequence[ConfigReport], slo: Slo, header: Sequence[str], dynamic: str,
             control: tuple[int, int, float] | None = None) -> str:
    """The results table (one row per configuration and phase), the goal check and the correctness table;
    ``control`` is (answers differing, near ties, largest delta) of the monolithic engine replaying the schedule."""
    lines = [*header, "", f"SLO: TTFT <= {slo.ttft_s * 1e3:.0f} ms and TPOT <= {slo.tpot_s * 1e3:.1f} ms "
             f"({slo.source}).", "",
             "| config | phase | requests | good | goodput | TTFT p50 ms | TTFT p90 ms | TPOT p50 ms | TPOT p90 ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        for phase, s in r.phases.items():
            lines.append(f"| {r.name} | {phase} | {s.requests} | {s.good} | {s.goodput:.2f} | {_ms(s.ttft_p50_s)} | "
                         f"{_ms(s.ttft_p90_s)} | {_ms(s.tpot_p50_s, 1)} | {_ms(s.tpot_p90_s, 1)} |")
    lines += ["", *goal_lines(reports, dynamic), "",
              f"Outputs are compared with a monolithic engine answering one request at a time: greedy ids "
              f"equal and top-5 logprobs within {BATCHED_LOGPROB_TOLERANCE:g}, or ids diverging at a near tie "
              f"within it (batching under load moves bf16 logprobs; see the control).", "",
              "| config | role flips | requests lost | outputs != monolithic | near-tie divergences | largest "
              "logprob delta | in flight during a flip | of those != monolithic | KV usage after |", "|---" * 9 + "|"]
    if control is not None:
        lines.append(f"| monolithic, same schedule (control) | - | - | {control[0]} | {control[1]} | {control[2]:.3f} "
                     "| - | - | - |")
    for r in reports:
        usage = ", ".join(f"{v:.2f}" for v in r.kv_usage_after.values())
        lines.append(f"| {r.name} | {r.role_flips} | {r.lost} | {r.mismatches} | {r.near_ties} | "
                     f"{r.max_logprob_delta:.3f} | {r.in_flight_during_flips} | {r.mismatches_during_flips} | "
                     f"{usage} |")
    return "\n".join(lines) + "\n"


def _ms(seconds: float, digits: int = 0) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:.{digits}f}"


def plot(series: Sequence[RoleSample], run_start_s: float, phase_starts: Sequence[float], title: str,
         path: Path) -> None:
    """Roles of each instance and desired replicas per pool over time, phase boundaries dashed. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"prefill": "tab:orange", "decode": "tab:blue", "draining": "tab:gray", "both": "tab:green"}
    times = [s.at_s - run_start_s for s in series]
    instances = sorted({url for s in series for url in s.roles})
    fig, (roles_ax, replicas_ax) = plt.subplots(2, 1, sharex=True, figsize=(10, 5.5))
    for row, url in enumerate(instances):
        for t, nxt, sample in zip(times, [*times[1:], times[-1] + 1], series):
            role = sample.roles.get(url)
            if role is not None:
                roles_ax.broken_barh([(t, nxt - t)], (row - 0.4, 0.8), color=colours[role])
    roles_ax.set_yticks(range(len(instances)), [url.rsplit(":", 1)[-1] for url in instances])
    roles_ax.set_ylabel("instance (port)")
    roles_ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c, label=n) for n, c in colours.items()],
                    loc="upper right", ncols=4, fontsize="small")
    for pool in sorted({p for s in series for p in s.desired_replicas}):
        replicas_ax.step(times, [s.desired_replicas.get(pool, math.nan) for s in series], where="post",
                         label=f"desired_replicas{{{pool}}}", color=colours.get(pool))
    replicas_ax.set_ylabel("replicas")
    replicas_ax.set_xlabel("seconds from the start of the schedule")
    replicas_ax.legend(loc="upper right", fontsize="small")
    for ax in (roles_ax, replicas_ax):
        for start in phase_starts[1:]:
            ax.axvline(start, linestyle="--", color="black", linewidth=0.8)
    roles_ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
