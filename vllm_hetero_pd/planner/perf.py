"""Performance model of one vLLM instance: a (device, TP) pair serving one phase or both.

Roofline with efficiency factors (planner-anchors sec. 8):

* prefill time = max(matmul FLOPs / achievable matmul FLOP/s + attention FLOPs (``2 n_l L^2 d``)
  / achievable attention FLOP/s, weight bytes / achievable bandwidth) + 2 all-reduces per layer
  + a fixed per-forward overhead;
* decode step time = max(weight + KV bytes over bandwidth, matmul + attention FLOPs over compute)
  + all-reduces + fixed step overhead + a per-sequence overhead;
* a prefill instance is an M/D/1 queue; its capacity is the largest arrival rate whose TTFT
  quantile (wait + prefill + KV transfer + shim + first decode step) meets the SLO;
* a decode instance's batch follows Little's law, ``batch = rate x OSL x TPOT(batch)``, with Poisson
  fluctuations (``queueing``); its capacity is the largest rate whose batch quantile keeps TPOT within
  the SLO and the KV within memory;
* a colocated instance runs both, prefill first: decode progresses only in the time prefill
  compute leaves (prefill shares each forward's fixed overhead with the decodes).

All functions are pure: data in, numbers out.
"""

from __future__ import annotations

import math

import msgspec

from vllm_hetero_pd.planner.catalog import Device, Link
from vllm_hetero_pd.planner.model import ModelSpec
from vllm_hetero_pd.planner.queueing import largest_poisson_mean, md1_wait_quantile, poisson_quantile
from vllm_hetero_pd.planner.workload import Slo, Workload

GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default --gpu-memory-utilization
ACTIVATION_BYTES = 2  # activations and all-reduce payloads stay BF16 under FP8 weights
ALLREDUCE_LATENCY_S = 10e-6  # [inferred] per-call latency of an intra-node ring all-reduce
TP_DEGREES = (1, 2, 4, 8)
_GIB = 1 << 30


class EngineLimits(msgspec.Struct, frozen=True):
    """vLLM's scheduler caps for one instance: running sequences and tokens per forward."""

    max_num_seqs: int
    max_num_batched_tokens: int


def serve_defaults(device: Device, tp: int) -> EngineLimits:
    """What ``vllm serve`` picks when the flags are absent (vLLM 0.32 ``arg_utils.py``
    ``get_batch_defaults``, OPENAI_API_SERVER context): by per-device memory, A100 excluded from
    the large tier, CPU scaled by world size. Non-NVIDIA GPUs follow the same memory rule."""
    memory = device.hbm_gb * 1e9
    if device.vendor == "cpu":
        return EngineLimits(128 * tp, 2048 * tp)
    if memory >= 160 * _GIB:
        return EngineLimits(1024, 16384)
    if memory >= 70 * _GIB and "a100" not in device.name.lower():
        return EngineLimits(1024, 8192)
    return EngineLimits(256, 2048)


class Capacity(msgspec.Struct, frozen=True, kw_only=True):
    """How many requests/s one instance sustains within the SLO, and what stops it going higher.

    ``rate`` is 0 when the instance cannot meet the SLO at any load; ``reason`` then says why, with
    numbers (for example "TTFT floor 412 ms on Gaudi2 TP8 > SLO 300 ms").
    """

    device: str
    tp: int
    rate: float
    binding: str
    reason: str = ""
    floor_s: float = 0.0  # zero-load latency of the binding metric when it misses the SLO
    max_num_seqs: int = 0  # the running-sequence cap the capacity assumes (emitted as --max-num-seqs)


def label(device: Device, tp: int) -> str:
    return f"{device.name} TP{tp}"


def allreduce_s(device: Device, tp: int, payload_bytes: float) -> float:
    """Ring all-reduce: each rank moves 2 (t-1)/t of the payload over its scale-up link."""
    if tp == 1:
        return 0.0
    return ALLREDUCE_LATENCY_S + 2 * (tp - 1) / tp * payload_bytes / (device.scale_up_gb_s * 1e9)


def kv_capacity_tokens(model: ModelSpec, device: Device, tp: int) -> float:
    """Tokens of KV the instance can hold after its weights (0 when the weights do not fit)."""
    free = device.hbm_gb * 1e9 * GPU_MEMORY_UTILIZATION * tp - model.weight_bytes
    return max(free, 0.0) / model.kv_bytes_per_token(tp)


def fit_problem(model: ModelSpec, device: Device, tp: int, min_tokens: int) -> str:
    """Why the model cannot run on this (device, TP), or "" when it can hold ``min_tokens`` of KV."""
    if tp > device.max_tp:
        return f"{label(device, tp)}: TP {tp} exceeds max_tp {device.max_tp} of {device.name}"
    if not model.valid_tp(tp):
        return (f"{label(device, tp)}: TP {tp} does not divide {model.num_heads} attention heads / "
                f"{model.num_kv_heads} KV heads")
    usable = device.hbm_gb * GPU_MEMORY_UTILIZATION * tp
    if model.weight_bytes / 1e9 >= usable:
        return (f"{label(device, tp)}: weights {model.weight_bytes / 1e9:.1f} GB > "
                f"{usable:.1f} GB usable ({GPU_MEMORY_UTILIZATION:.0%} of {tp} x {device.hbm_gb:g} GB)")
    tokens = kv_capacity_tokens(model, device, tp)
    if tokens < min_tokens:
        return (f"{label(device, tp)}: room for {tokens:.0f} KV tokens after weights < "
                f"{min_tokens} needed by one request")
    return ""


def prefill_matmul_flops(model: ModelSpec, num_tokens: int) -> float:
    """FLOPs of one prefill's weight matmuls: 2 x active params per token."""
    return 2 * model.num_active_params * num_tokens


def prefill_attention_flops(model: ModelSpec, num_tokens: int) -> float:
    """FLOPs of one prefill's causal attention, ``2 n_l L^2 d`` (QK^T and AV, halved by the mask)."""
    return 2 * model.num_layers * num_tokens ** 2 * model.num_heads * model.head_dim


def prefill_s(model: ModelSpec, device: Device, tp: int, num_tokens: int) -> float:
    """Execution time of one prefill of ``num_tokens`` tokens."""
    compute = (prefill_matmul_flops(model, num_tokens) / device.peak_flops(model.fp8_weights)
               + prefill_attention_flops(model, num_tokens) / device.attention_flops) / tp
    memory = model.weight_bytes / tp / device.memory_bytes_s
    comm = 2 * model.num_layers * allreduce_s(device, tp, num_tokens * model.hidden_size * ACTIVATION_BYTES)
    return max(compute, memory) + comm + device.prefill_overhead_s


def step_lines(model: ModelSpec, device: Device, tp: int, context: float) -> tuple[tuple[float, float], ...]:
    """Decode step time as the max of straight lines ``a + b x batch`` (memory-bound, compute-bound).

    Every term of the step is linear in the batch, so the step time is convex and piecewise
    linear; that makes Little's-law fixed points and SLO batch limits closed-form.
    """
    attention_width = model.num_heads * model.head_dim
    bandwidth = device.memory_bytes_s
    memory_a = model.weight_bytes / tp / bandwidth
    memory_b = context * model.kv_bytes_per_token(tp) / tp / bandwidth
    compute_b = (2 * model.num_active_params / device.peak_flops(model.fp8_weights)
                 + 4 * model.num_layers * context * attention_width / device.attention_flops) / tp
    comm_per_seq = 2 * model.num_layers * 2 * (tp - 1) / tp * model.hidden_size * ACTIVATION_BYTES / (
        device.scale_up_gb_s * 1e9)
    fixed_a = device.step_overhead_s + (2 * model.num_layers * ALLREDUCE_LATENCY_S if tp > 1 else 0.0)
    fixed_b = device.per_sequence_overhead_s + comm_per_seq
    return (memory_a + fixed_a, memory_b + fixed_b), (fixed_a, compute_b + fixed_b)


def decode_step_s(model: ModelSpec, device: Device, tp: int, batch: float, context: float) -> float:
    """Time of one decode step for ``batch`` sequences holding ``context`` tokens each on average."""
    return max(a + b * batch for a, b in step_lines(model, device, tp, context))


def kv_transfer_s(model: ModelSpec, prefill: Device, tp: int, link: Link, decode_format: str,
                  num_tokens: int) -> float:
    """Pull of one prompt's KV after its prefill, plus the shim when the two formats differ.

    The TP ranks of the prefill instance send their shards in parallel, one NIC lane each; vLLM's
    NIXL connector transfers after the prefill completes, so none of it overlaps compute.
    """
    unique_bytes = num_tokens * model.kv_bytes_per_token(1)
    lane_gb_s = min(link.gb_s, prefill.scale_out_gb_s)
    transfer = link.latency_s + unique_bytes / (tp * lane_gb_s * 1e9)
    shim = unique_bytes / (link.shim_gb_s * 1e9) if prefill.kv_format != decode_format else 0.0
    return transfer + shim


def _largest_rate(meets_slo, upper: float) -> float:
    """Largest rate in [0, upper) for a monotone predicate (true at low load), by bisection."""
    lo, hi = 0.0, upper
    for _ in range(48):
        mid = (lo + hi) / 2
        if meets_slo(mid):
            lo = mid
        else:
            hi = mid
    return lo


def prefill_ttft_s(service_s: float, handoff_s: float, rate: float, q: float) -> float:
    """TTFT quantile of a prefill instance at ``rate``: M/D/1 wait + prefill + hand-off to decode."""
    return md1_wait_quantile(rate, service_s, q) + service_s + handoff_s


def prefill_capacity(model: ModelSpec, device: Device, tp: int, workload: Workload, slo: Slo,
                     link: Link, decode_format: str) -> Capacity:
    """Per-instance prefill capacity when the KV goes to decode devices of ``decode_format``.

    The first decode step is budgeted at the TPOT SLO, the slowest step any feasible decode
    instance may take, so the bound holds whichever decode instance the router picks.
    """
    problem = fit_problem(model, device, tp, workload.isl)
    if problem:
        return Capacity(device=device.name, tp=tp, rate=0.0, binding="memory", reason=problem)
    service = prefill_s(model, device, tp, workload.isl)
    handoff = kv_transfer_s(model, device, tp, link, decode_format, workload.isl) + slo.tpot_s
    floor = service + handoff
    if floor > slo.ttft_s:
        return Capacity(device=device.name, tp=tp, rate=0.0, binding="TTFT", floor_s=floor,
                        reason=f"TTFT floor {floor * 1e3:.0f} ms on {label(device, tp)} > SLO "
                               f"{slo.ttft_s * 1e3:.0f} ms (prefill {service * 1e3:.0f} ms + KV hand-off "
                               f"{handoff * 1e3:.0f} ms)")
    rate = _largest_rate(lambda r: prefill_ttft_s(service, handoff, r, slo.quantile) <= slo.ttft_s,
                         1 / service)
    return Capacity(device=device.name, tp=tp, rate=rate, binding="TTFT",
                    max_num_seqs=serve_defaults(device, tp).max_num_seqs)


def decode_batch(model: ModelSpec, device: Device, tp: int, workload: Workload, rate: float,
                 slowdown: float = 1.0) -> float:
    """Mean running batch at ``rate``: least fixed point of Little's law ``B = rate OSL TPOT(B)``.

    With TPOT the max of lines ``a_k + b_k B``, B is a fixed point exactly when it is at least
    ``c a_k / (1 - c b_k)`` for every line (c = rate x OSL x slowdown); inf when some line grows
    faster than B itself, i.e. the instance is overloaded.
    """
    c = rate * workload.osl * slowdown
    batch = 0.0
    for a, b in step_lines(model, device, tp, workload.mean_context):
        if c * b >= 1:
            return math.inf
        batch = max(batch, c * a / (1 - c * b))
    return batch


def decode_tpot_s(model: ModelSpec, device: Device, tp: int, workload: Workload, rate: float,
                  q: float, slowdown: float = 1.0) -> float:
    """TPOT quantile at ``rate``: step time of a batch holding the request itself plus the
    q-quantile of the others, who are Poisson with the mean batch (M/G/infinity seen by a tagged
    request)."""
    batch = decode_batch(model, device, tp, workload, rate, slowdown)
    if math.isinf(batch):
        return math.inf
    return decode_step_s(model, device, tp, 1 + poisson_quantile(batch, q), workload.mean_context) * slowdown


def max_batch_within(model: ModelSpec, device: Device, tp: int, context: float, tpot_s: float) -> int:
    """Largest integer batch whose step time stays within ``tpot_s`` (0 if even one sequence is too slow)."""
    limit = min((tpot_s - a) / b if b > 0 else (math.inf if a <= tpot_s else -1.0)
                for a, b in step_lines(model, device, tp, context))
    return max(0, math.floor(limit)) if limit < 1 << 40 else 1 << 40


def decode_capacity(model: ModelSpec, device: Device, tp: int, workload: Workload, slo: Slo) -> Capacity:
    """Per-instance decode capacity: the batch quantile must meet both TPOT and KV memory."""
    request_tokens = workload.isl + workload.osl
    problem = fit_problem(model, device, tp, request_tokens)
    if problem:
        return Capacity(device=device.name, tp=tp, rate=0.0, binding="memory", reason=problem)
    context = workload.mean_context
    by_tpot = max_batch_within(model, device, tp, context, slo.tpot_s)
    if by_tpot == 0:
        floor = decode_step_s(model, device, tp, 1, context)
        return Capacity(device=device.name, tp=tp, rate=0.0, binding="TPOT", floor_s=floor,
                        reason=f"TPOT floor {floor * 1e3:.1f} ms on {label(device, tp)} > SLO "
                               f"{slo.tpot_s * 1e3:.1f} ms")
    by_memory = int(kv_capacity_tokens(model, device, tp) // context)
    max_batch = min(by_tpot, by_memory)
    mean_batch = largest_poisson_mean(max_batch - 1, slo.quantile)  # the request itself + the others
    step = decode_step_s(model, device, tp, mean_batch, context)
    rate = mean_batch / (workload.osl * step)  # Little's law at the largest admissible mean batch
    return Capacity(device=device.name, tp=tp, rate=rate,
                    binding="TPOT" if by_tpot <= by_memory else "KV memory",
                    max_num_seqs=serve_defaults(device, tp).max_num_seqs)


def colocated_latency(model: ModelSpec, device: Device, tp: int, workload: Workload, rate: float,
                      q: float) -> tuple[float, float]:
    """(TTFT, TPOT) quantiles of an instance that runs both phases at ``rate``.

    Prefill goes first (vLLM schedules waiting prefills into every step's token budget), so it
    sees an M/D/1 queue of its own. Decode progresses in the time prefill compute leaves: the
    prefill tokens ride in the same forward passes as the decodes, so only their marginal time
    (prefill minus its fixed per-forward overhead) stretches every step by ``1 / (1 - rho)``.
    """
    service = prefill_s(model, device, tp, workload.isl)
    if rate * service >= 1:
        return math.inf, math.inf
    ttft = md1_wait_quantile(rate, service, q) + service
    rho = rate * (service - device.prefill_overhead_s)
    return ttft, decode_tpot_s(model, device, tp, workload, rate, q, slowdown=1 / (1 - rho))


def colocated_capacity(model: ModelSpec, device: Device, tp: int, workload: Workload, slo: Slo) -> Capacity:
    """Per-instance capacity when one instance serves both phases (no disaggregation)."""
    problem = fit_problem(model, device, tp, workload.isl + workload.osl)
    if problem:
        return Capacity(device=device.name, tp=tp, rate=0.0, binding="memory", reason=problem)
    ttft0, tpot0 = colocated_latency(model, device, tp, workload, 0.0, slo.quantile)
    if ttft0 > slo.ttft_s or tpot0 > slo.tpot_s:
        which = "TTFT" if ttft0 > slo.ttft_s else "TPOT"
        floor, target = (ttft0, slo.ttft_s) if which == "TTFT" else (tpot0, slo.tpot_s)
        return Capacity(device=device.name, tp=tp, rate=0.0, binding=which, floor_s=floor,
                        reason=f"{which} floor {floor * 1e3:.1f} ms on {label(device, tp)} "
                               f"(colocated) > SLO {target * 1e3:.1f} ms")
    context = workload.mean_context
    by_memory = int(kv_capacity_tokens(model, device, tp) // context)

    def meets(rate: float) -> bool:
        ttft, tpot = colocated_latency(model, device, tp, workload, rate, slo.quantile)
        slowdown = 1 / (1 - rate * (service - device.prefill_overhead_s))
        batch = decode_batch(model, device, tp, workload, rate, slowdown)
        return ttft <= slo.ttft_s and tpot <= slo.tpot_s and poisson_quantile(batch, slo.quantile) <= by_memory

    service = prefill_s(model, device, tp, workload.isl)
    rate = _largest_rate(meets, 1 / service)
    ttft, tpot = colocated_latency(model, device, tp, workload, rate * 1.001, slo.quantile)
    binding = "TTFT" if ttft > slo.ttft_s else "TPOT" if tpot > slo.tpot_s else "KV memory"
    return Capacity(device=device.name, tp=tp, rate=rate, binding=binding,
                    max_num_seqs=serve_defaults(device, tp).max_num_seqs)
