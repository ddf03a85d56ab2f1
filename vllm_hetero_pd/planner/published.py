"""The model against published benchmark tables: NVIDIA NIM (dense), ML.ENERGY (MoE decode), dstack (MoE).

Run: ``python -m vllm_hetero_pd.planner.published``. The table (docs.nvidia.com/nim/benchmarking/
llm/1.0.0/performance, NIM 1.8.0, AIPerf) reports mean TTFT and ITL at fixed concurrency. A
closed loop of ``c`` clients is turned into an arrival rate by Little's law, ``rate x E2E(rate)
= c`` with ``E2E = TTFT + (OSL - 1) ITL``, and the model's means are compared at that rate.

Two device inputs are compared: the shipped H100 (MLE's FP8 matmul efficiency 70.9 %), and one
whose FP8 efficiency is fitted to a *different* run of the same table, 500 in / 2000 out at
concurrency 1 (TTFT 47.77 ms), so no validated point is used to fit. Llama-3.3-70B has Llama-3.1-
70B's geometry, so the preset stands in for it.

The first MoE check is the decode step: the ML.ENERGY leaderboard's vLLM runs of Qwen3-30B-A3B
BF16 on one H100 hold the batch at ``max_num_seqs`` and publish the median ITL, which is the
decode step at that batch. It tests the experts-touched-per-batch model with nothing fitted. The
data gives output lengths (mean about 920 tokens) but not prompt lengths, so the mean context is a
band.

The second gives MoE TTFT and ITL at six concurrencies: dstack's vLLM runs of DeepSeek-R1 FP8 on
8x H200 at fixed 3200 in / 800 out. Its clients stay in step (``lockstep``), and its early-2025
vLLM build runs far below the shipped H200's efficiencies, so the device is fitted on the two
lowest concurrencies (``fit_lockstep``) and the other four are validated.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import msgspec

from vllm_hetero_pd.planner import colocated, perf
from vllm_hetero_pd.planner.catalog import Device, load_catalog
from vllm_hetero_pd.planner.model import ModelSpec, from_hf_config, load_model
from vllm_hetero_pd.planner.workload import Workload

SOURCE = ("docs.nvidia.com/nim/benchmarking/llm/1.0.0/performance (NIM 1.8.0, Llama-3.3-70b-instruct, "
          "2x H100 80G, fp8 TP2)")
TP = 2
VALIDATED = Workload(isl=5000, osl=500, rate=1)
PUBLISHED = {1: (0.40677, 0.01858), 5: (0.5467, 0.02183), 25: (0.68869, 0.03875), 50: (0.83451, 0.05973)}
CALIBRATION = (Workload(isl=500, osl=2000, rate=1), 1, 0.04777)  # shape, concurrency, mean TTFT (s)

MOE_SOURCE = ("github.com/ml-energy/leaderboard public/data/models/Qwen__Qwen3-30B-A3B-Instruct-2507__lm-arena-chat"
              ".json @0ea52b6a (vLLM, 1x H100, BF16, TP1)")
QWEN3_30B_A3B = {  # huggingface.co/Qwen/Qwen3-30B-A3B-Instruct-2507/blob/main/config.json, the fields the model reads
    "_name_or_path": "Qwen/Qwen3-30B-A3B-Instruct-2507", "architectures": ["Qwen3MoeForCausalLM"],
    "num_hidden_layers": 48, "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
    "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936,
    "tie_word_embeddings": False, "max_position_embeddings": 262144, "torch_dtype": "bfloat16",
}
MOE_PUBLISHED = {8: (7.97, 0.01285), 16: (15.97, 0.01755), 32: (31.93, 0.02257), 64: (63.92, 0.02894),
                 96: (88.51, 0.03207)}  # max_num_seqs: (avg_batch_size, median ITL s)
MOE_CONTEXTS = (500, 1000, 2000)  # mean context band; the middle one is the point prediction

LOCKSTEP_SOURCE = ("github.com/dstackai/benchmarks Deepseek-R1/raw_data/online_results.csv @7f37e669 (branch "
                   "deepseek-r1-benchmark, README there): vLLM 0.7.4.dev181 on 8x H200, DeepSeek-R1 FP8 (block-"
                   "quantised checkpoint), TP8 without expert parallelism; SGLang bench_serving, random 3200 in / "
                   "800 out at range ratio 1, 500 prompts, no rate limit, --max-concurrency c")
DEEPSEEK_R1 = {  # huggingface.co/deepseek-ai/DeepSeek-R1/blob/main/config.json (DeepSeek-V3's geometry)
    "_name_or_path": "deepseek-ai/DeepSeek-R1", "architectures": ["DeepseekV3ForCausalLM"],
    "first_k_dense_replace": 3, "hidden_size": 7168, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
    "num_key_value_heads": 128, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 129280,
}
LOCKSTEP_TP = 8
LOCKSTEP_WORKLOAD = Workload(isl=3200, osl=800, rate=1)
# concurrency: (mean TTFT s, std of TTFT s, mean ITL s), the vLLM h200 rows at 3200/800
LOCKSTEP_PUBLISHED = {4: (0.97565, 0.01093, 0.02582), 8: (1.76575, 0.07269, 0.03139),
                      16: (3.36861, 0.21586, 0.04977), 32: (7.65078, 0.87488, 0.05182),
                      64: (14.16437, 2.81545, 0.06584), 128: (66.81162, 27.34644, 0.07211)}
# Tokens one prefill step may hold: vLLM V0 ran MLA without chunked prefill, so the budget is the
# model's context (163840). [inferred: the published TTFT spread of 11 ms on 976 ms at c=4 says the
# four prompts finish in one step, which chunked prefill would not do]
LOCKSTEP_BUDGET = 163840
LOCKSTEP_FIT = (4, 8)  # TTFT fitted at the first, ITL at both; the others are validated


class Row(msgspec.Struct, frozen=True, kw_only=True):
    """One concurrency: published and predicted means, and the arrival rate Little's law gives."""

    concurrency: int
    rate: float
    ttft_s: float
    itl_s: float
    published_ttft_s: float
    published_itl_s: float

    @property
    def errors(self) -> tuple[float, float]:
        return self.ttft_s / self.published_ttft_s - 1, self.itl_s / self.published_itl_s - 1


def closed_loop(model: ModelSpec, device: Device, workload: Workload, concurrency: int) -> tuple[float, float, float]:
    """(rate, mean TTFT, mean ITL) of ``concurrency`` clients that each send their next request when
    the last one ends: the rate with ``rate x E2E(rate) = concurrency`` (E2E grows with the rate)."""
    inst = colocated.instance(model, device, TP, workload)

    def e2e(rate: float) -> float:
        ttft, itl = colocated.latency(inst, rate, None)
        return ttft + (workload.osl - 1) * itl

    rate = perf.bisect(lambda r: r * e2e(r) < concurrency, 0.0, concurrency / e2e(0.0))
    return (rate, *colocated.latency(inst, rate, None))


def compute_scaled(device: Device, k: float) -> Device:
    """``device`` with every compute efficiency (matmul at each precision, attention) times ``k``."""
    return msgspec.structs.replace(device, fp8_efficiency=device.fp8_efficiency * k,
                                   bf16_efficiency=device.bf16_efficiency * k,
                                   attention_efficiency=device.attention_efficiency * k)


def fit_compute(device: Device, too_slow: Callable[[Device], bool]) -> Device:
    """``device`` compute-scaled to the boundary where ``too_slow`` stops holding (all efficiencies ≤ 1)."""
    top = 1 / max(device.fp8_efficiency, device.bf16_efficiency, device.attention_efficiency)
    return compute_scaled(device, perf.bisect(lambda k: too_slow(compute_scaled(device, k)), 1e-3, top))


def calibrated(model: ModelSpec, device: Device) -> Device:
    """``device`` with its compute efficiencies scaled so the calibration run's TTFT matches."""
    workload, concurrency, ttft = CALIBRATION
    fitted = fit_compute(device, lambda d: closed_loop(model, d, workload, concurrency)[1] > ttft)
    return msgspec.structs.replace(fitted, sources={
        **device.sources, "fp8_efficiency": f"fitted to {SOURCE}, 500/2000 at concurrency 1 (TTFT 47.77 ms)"})


def compare(device: Device, model: ModelSpec) -> list[Row]:
    """Model vs the published 5000/500 rows."""
    rows = []
    for c, (ttft, itl) in PUBLISHED.items():
        rate, p_ttft, p_itl = closed_loop(model, device, VALIDATED, c)
        rows.append(Row(concurrency=c, rate=rate, ttft_s=p_ttft, itl_s=p_itl, published_ttft_s=ttft,
                        published_itl_s=itl))
    return rows


def table(label: str, rows: list[Row]) -> str:
    lines = [f"| {label} | concurrency | rate (req/s) | TTFT published / predicted (ms) | error | "
             "ITL published / predicted (ms) | error |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        e_ttft, e_itl = r.errors
        lines.append(f"| | {r.concurrency} | {r.rate:.2f} | {r.published_ttft_s * 1e3:.0f} / {r.ttft_s * 1e3:.0f} | "
                     f"{e_ttft:+.0%} | {r.published_itl_s * 1e3:.1f} / {r.itl_s * 1e3:.1f} | {e_itl:+.0%} |")
    return "\n".join(lines)


class MoeRow(msgspec.Struct, frozen=True, kw_only=True):
    """One published batch: the median ITL, the predicted decode step at each ``MOE_CONTEXTS``
    context, and the step of the model before the MoE fix (every expert read on every step)."""

    max_num_seqs: int
    batch: float
    published_itl_s: float
    itl_s: tuple[float, ...]
    every_expert_itl_s: float


def moe_compare() -> list[MoeRow]:
    """Qwen3-30B-A3B BF16 on one shipped-catalog H100 vs the ML.ENERGY rows; nothing is fitted."""
    model = from_hf_config(QWEN3_30B_A3B, name="qwen3-30b-a3b", weight_dtype="bf16")
    every_expert = msgspec.structs.replace(model, num_experts_per_token=model.num_experts)
    device = load_catalog().device("H100")
    steps = [perf.step_model(model, device, 1, ctx) for ctx in MOE_CONTEXTS]
    before = perf.step_model(every_expert, device, 1, MOE_CONTEXTS[1])
    return [MoeRow(max_num_seqs=seqs, batch=batch, published_itl_s=itl, itl_s=tuple(s.time(batch) for s in steps),
                   every_expert_itl_s=before.time(batch)) for seqs, (batch, itl) in MOE_PUBLISHED.items()]


def moe_table(rows: list[MoeRow]) -> str:
    def ms(t: float, ref: float) -> str:
        return f"{t * 1e3:.1f} ({t / ref - 1:+.0%})"

    lines = [f"| max_num_seqs | batch | ITL published (ms) | predicted, context {MOE_CONTEXTS[1]} | "
             f"context {MOE_CONTEXTS[0]} | context {MOE_CONTEXTS[-1]} | every expert read (before) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        low, mid, high = (ms(t, r.published_itl_s) for t in r.itl_s)
        lines.append(f"| {r.max_num_seqs} | {r.batch:.1f} | {r.published_itl_s * 1e3:.1f} | {mid} | {low} | {high} | "
                     f"{ms(r.every_expert_itl_s, r.published_itl_s)} |")
    return "\n".join(lines)


def lockstep(model: ModelSpec, device: Device, tp: int, workload: Workload, concurrency: int,
             budget: int = LOCKSTEP_BUDGET) -> tuple[float, float]:
    """(mean TTFT, mean ITL) of ``concurrency`` clients that start together with fixed lengths, on an
    engine that prefills whole prompts, at most ``budget`` tokens a step, before it decodes.

    Why: such clients stay in step. Their requests arrive together, are prefilled together and
    end on the same step, so every round repeats the first: TTFT is the batched prefill (the
    prompts of a later step wait for the earlier ones), and ITL the decode step at batch
    ``concurrency``. Little's law with random arrivals (``closed_loop``) models none of that.
    """
    per_step = max(1, budget // workload.isl)
    elapsed, ttfts = 0.0, []
    for start in range(0, concurrency, per_step):
        batch = min(per_step, concurrency - start)
        elapsed += perf.prefill_s(model, device, tp, workload.isl, batch)
        ttfts += [elapsed] * batch
    return sum(ttfts) / concurrency, perf.decode_step_s(model, device, tp, concurrency, workload.mean_context)


def fit_lockstep(model: ModelSpec, device: Device) -> Device:
    """``device`` fitted to the ``LOCKSTEP_FIT`` rows only: compute efficiencies scaled so the first
    row's TTFT matches, then the memory efficiency and the fixed step cost so both rows' ITL match
    (the step is weight-read bound: its memory term grows with the experts a batch touches). A fit
    outside the catalog's ranges (an efficiency above 1, a negative overhead) fails its checks."""
    wl, (first, second), tp = LOCKSTEP_WORKLOAD, LOCKSTEP_FIT, LOCKSTEP_TP
    prefill_fitted = fit_compute(device, lambda d: lockstep(model, d, tp, wl, first)[0] > LOCKSTEP_PUBLISHED[first][0])

    step = perf.step_model(model, prefill_fitted, tp, wl.mean_context)

    def memory_s(batch: int) -> float:
        return step.dense_s + step.expert_s * model.experts_touched(batch) + step.kv_s * batch

    gap = {c: LOCKSTEP_PUBLISHED[c][2] - lockstep(model, prefill_fitted, tp, wl, c)[1] for c in LOCKSTEP_FIT}
    slower = 1 + (gap[second] - gap[first]) / (memory_s(second) - memory_s(first))  # memory time multiplier
    extra = gap[first] - (slower - 1) * memory_s(first)
    source = f"fitted to {LOCKSTEP_SOURCE}, concurrency {first} (TTFT) and {LOCKSTEP_FIT} (ITL)"
    return msgspec.structs.replace(prefill_fitted, memory_efficiency=device.memory_efficiency / slower,
                                   step_overhead_s=device.step_overhead_s + extra,
                                   sources={**device.sources, "fp8_efficiency": source, "memory_efficiency": source,
                                            "step_overhead_s": source})


class LockstepRow(msgspec.Struct, frozen=True, kw_only=True):
    """One published concurrency: means published and predicted, and whether the row was fitted."""

    concurrency: int
    ttft_s: float
    itl_s: float
    published_ttft_s: float
    published_ttft_std_s: float
    published_itl_s: float
    fitted: str  # "TTFT, ITL", "ITL" or "" (validated)

    @property
    def errors(self) -> tuple[float, float]:
        return self.ttft_s / self.published_ttft_s - 1, self.itl_s / self.published_itl_s - 1


def lockstep_compare() -> tuple[Device, list[LockstepRow]]:
    """DeepSeek-R1 FP8 on 8x H200, fitted on ``LOCKSTEP_FIT``, against every published concurrency."""
    model = from_hf_config(DEEPSEEK_R1, name="deepseek-r1", weight_dtype="auto")
    device = fit_lockstep(model, load_catalog().device("H200"))
    rows = []
    for c, (ttft, std, itl) in LOCKSTEP_PUBLISHED.items():
        p_ttft, p_itl = lockstep(model, device, LOCKSTEP_TP, LOCKSTEP_WORKLOAD, c)
        fitted = ", ".join(name for name, used in (("TTFT", c == LOCKSTEP_FIT[0]), ("ITL", c in LOCKSTEP_FIT)) if used)
        rows.append(LockstepRow(concurrency=c, ttft_s=p_ttft, itl_s=p_itl, published_ttft_s=ttft,
                                published_ttft_std_s=std, published_itl_s=itl, fitted=fitted))
    return device, rows


def lockstep_table(rows: list[LockstepRow]) -> str:
    lines = ["| concurrency | TTFT published (std) / predicted (ms) | error | ITL published / predicted (ms) | error | "
             "fitted here |", "|---|---|---|---|---|---|"]
    for r in rows:
        e_ttft, e_itl = r.errors
        lines.append(f"| {r.concurrency} | {r.published_ttft_s * 1e3:.0f} ({r.published_ttft_std_s * 1e3:.0f}) / "
                     f"{r.ttft_s * 1e3:.0f} | {e_ttft:+.0%} | {r.published_itl_s * 1e3:.1f} / {r.itl_s * 1e3:.1f} | "
                     f"{e_itl:+.0%} | {r.fitted or '-'} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options: the table and the model inputs are fixed so the numbers are reproducible."""


def run(args: argparse.Namespace) -> int:
    model = load_model("llama-3.1-70b", weight_dtype="fp8")
    shipped = load_catalog().device("H100")
    fitted = calibrated(model, shipped)
    print(f"{SOURCE}; ISL {VALIDATED.isl} / OSL {VALIDATED.osl}; vLLM V1 colocated model, means\n")
    print(table("shipped H100 (FP8 eff. 0.709)", compare(shipped, model)))
    print()
    print(table(f"H100, FP8 eff. {fitted.fp8_efficiency:.3f} fitted on 500/2000 c=1", compare(fitted, model)))
    print(f"\nMoE decode: {MOE_SOURCE}; Qwen3-30B-A3B-Instruct-2507, batch held at max_num_seqs, median ITL\n")
    print(moe_table(moe_compare()))
    device, rows = lockstep_compare()
    print(f"\nMoE TTFT and ITL, clients in step: {LOCKSTEP_SOURCE}; fitted H200: FP8 eff. "
          f"{device.fp8_efficiency:.3f}, memory eff. {device.memory_efficiency:.3f}, step overhead "
          f"{device.step_overhead_s * 1e3:.1f} ms\n")
    print(lockstep_table(rows))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_hetero_pd.planner.published",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
