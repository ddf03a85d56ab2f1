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


def label(device: Device, tp: int, ep: bool = False) -> str:
    return f"{device.name} {'EP' if ep else 'TP'}{tp}"


def allreduce_s(device: Device, tp: int, payload_bytes: float) -> float:
    """Ring all-reduce: each rank moves 2 (t-1)/t of the payload over its scale-up link."""
    if tp == 1:
        return 0.0
    return ALLREDUCE_LATENCY_S + 2 * (tp - 1) / tp * payload_bytes / (device.scale_up_gb_s * 1e9)


def resident_bytes_per_rank(model: ModelSpec, tp: int, ep: bool = False) -> float:
    """Weight bytes one rank holds: a 1/tp shard of everything, or with expert parallelism (data-
    parallel attention) the dense part whole and 1/n of the routed experts."""
    if not ep:
        return model.weight_bytes / tp
    routed = model.num_moe_layers * model.num_experts * model.expert_bytes
    return model.weight_bytes - routed + routed / tp


def kv_free_bytes(model: ModelSpec, device: Device, tp: int, ep: bool = False) -> float:
    """Bytes left for KV across the instance after its weights (0 when the weights do not fit)."""
    per_rank = device.hbm_gb * 1e9 * GPU_MEMORY_UTILIZATION - resident_bytes_per_rank(model, tp, ep)
    return max(per_rank, 0.0) * tp


def sequence_kv_bytes(model: ModelSpec, context: float, tp: int, ep: bool = False) -> float:
    """KV one sequence occupies in the instance: data-parallel attention keeps it on one rank,
    unreplicated; tensor parallelism replicates what it cannot split (MLA's latent, KV heads < tp)."""
    return model.kv_bytes(context, 1 if ep else tp)


def max_sequences(model: ModelSpec, device: Device, tp: int, context: float, ep: bool = False) -> float:
    """How many sequences of ``context`` tokens fit in the KV memory."""
    return kv_free_bytes(model, device, tp, ep) / sequence_kv_bytes(model, context, tp, ep)


def fit_problem(model: ModelSpec, device: Device, tp: int, min_tokens: int, ep: bool = False) -> str:
    """Why the model cannot run on this (device, TP), or "" when it can hold ``min_tokens`` of KV."""
    if tp > device.max_tp:
        return f"{label(device, tp, ep)}: TP {tp} exceeds max_tp {device.max_tp} of {device.name}"
    if not ep and not model.valid_tp(tp):
        return (f"{label(device, tp)}: TP {tp} does not divide {model.num_heads} attention heads / "
                f"{model.num_kv_heads} KV heads")
    if ep and (not model.num_experts or model.num_experts % tp):
        return f"{label(device, tp, ep)}: EP needs an MoE whose {model.num_experts} experts split {tp} ways"
    usable = device.hbm_gb * GPU_MEMORY_UTILIZATION
    if resident_bytes_per_rank(model, tp, ep) / 1e9 >= usable:
        return (f"{label(device, tp, ep)}: weights {resident_bytes_per_rank(model, tp, ep) / 1e9:.1f} GB per rank > "
                f"{usable:.1f} GB usable ({GPU_MEMORY_UTILIZATION:.0%} of {device.hbm_gb:g} GB)")
    if max_sequences(model, device, tp, min_tokens, ep) < 1:
        return (f"{label(device, tp, ep)}: {kv_free_bytes(model, device, tp, ep) / 1e9:.2f} GB of KV room after "
                f"weights < {sequence_kv_bytes(model, min_tokens, tp, ep) / 1e9:.2f} GB needed by one request")
    return ""


def prefill_matmul_flops(model: ModelSpec, num_tokens: int) -> float:
    """FLOPs of one prefill's weight matmuls: 2 x active params per token."""
    return 2 * model.num_active_params * num_tokens


def weights_read_bytes(model: ModelSpec, num_tokens: float) -> float:
    """Weight bytes one forward of ``num_tokens`` tokens reads: every non-expert weight, and the
    routed experts those tokens select (all of them once a prompt is long)."""
    return model.dense_weight_bytes + model.num_moe_layers * model.experts_touched(num_tokens) * model.expert_bytes


def prefill_s(model: ModelSpec, device: Device, tp: int, num_tokens: int, sequences: int = 1) -> float:
    """Execution time of one prefill forward of ``sequences`` prompts of ``num_tokens`` tokens each
    (batched whole, as an engine without chunked prefill runs prompts that arrive together)."""
    tokens = num_tokens * sequences
    compute = (prefill_matmul_flops(model, tokens) / device.peak_flops(model.low_precision)
               + sequences * model.prefill_attention_flops(num_tokens) / device.attention_flops) / tp
    memory = weights_read_bytes(model, tokens) / tp / device.memory_bytes_s
    comm = 2 * model.num_layers * allreduce_s(device, tp, tokens * model.hidden_size * ACTIVATION_BYTES)
    return max(compute, memory) + comm + device.prefill_overhead_s


class StepModel(msgspec.Struct, frozen=True):
    """Decode step time of one instance against its batch ``B`` at a fixed mean context:

    ``max(weights(B) + kv B, compute B) + fixed + per_seq B``, where ``weights(B)`` is the dense
    read plus the experts B tokens route to (concave in B; constant for dense models). Every term
    grows with B while ``time(B) / B`` falls, which is what ``decode_batch`` and ``max_batch``
    rely on for their bisections.
    """

    model: ModelSpec
    dense_s: float  # non-expert weight read
    expert_s: float  # one routed expert in every MoE layer
    kv_s: float  # per sequence
    compute_s: float  # per sequence
    fixed_s: float
    per_seq_s: float  # per-sequence overhead + its share of the all-reduces
    comm_token_s: float = 0.0  # all-reduce time per token riding in the step

    def time(self, batch: float, chunk: float = 0.0, chunk_compute_s: float = 0.0) -> float:
        """Step time with ``batch`` decodes, plus ``chunk`` prompt tokens of ``chunk_compute_s``
        compute each (vLLM V1 mixes both in one forward; the chunk shares the weight read)."""
        memory = self.dense_s + self.expert_s * self.model.experts_touched(batch + chunk) + self.kv_s * batch
        compute = self.compute_s * batch + chunk_compute_s * chunk
        return max(memory, compute) + self.fixed_s + self.per_seq_s * batch + self.comm_token_s * chunk

    @property
    def slope(self) -> float:
        """``time(B) / B`` as B grows without bound: the per-sequence cost at saturation."""
        return max(self.kv_s, self.compute_s) + self.per_seq_s


def step_model(model: ModelSpec, device: Device, tp: int, context: float, ep: bool = False) -> StepModel:
    """The decode step of (device, TP) at mean ``context``; see ``StepModel``.

    With ``ep`` the n = ``tp`` ranks run attention data-parallel (each its B/n sequences, dense
    weights read whole on every rank) and shard the routed experts, which two all-to-alls per MoE
    layer feed (dispatch and combine of each token's top-k hidden states) instead of all-reduces.
    """
    bandwidth = device.memory_bytes_s * tp
    compute = (2 * model.num_active_params / device.peak_flops(model.low_precision)
               + model.attention_flops_per_token(context, decode=True) / device.attention_flops) / tp
    link = device.scale_up_gb_s * 1e9
    if ep:
        moe_bytes = 2 * model.num_moe_layers * model.num_experts_per_token * model.hidden_size * ACTIVATION_BYTES
        return StepModel(model=model, dense_s=model.dense_weight_bytes / device.memory_bytes_s,
                         expert_s=model.num_moe_layers * model.expert_bytes / bandwidth,
                         kv_s=sequence_kv_bytes(model, context, tp, ep) / bandwidth, compute_s=compute,
                         fixed_s=device.step_overhead_s + 2 * model.num_moe_layers * ALLREDUCE_LATENCY_S * (tp > 1),
                         per_seq_s=device.per_sequence_overhead_s + moe_bytes * (tp - 1) / tp / tp / link)
    comm_per_token = 2 * model.num_layers * 2 * (tp - 1) / tp * model.hidden_size * ACTIVATION_BYTES / link
    return StepModel(model=model, dense_s=model.dense_weight_bytes / bandwidth,
                     expert_s=model.num_moe_layers * model.expert_bytes / bandwidth,
                     kv_s=model.kv_bytes(context, tp) / bandwidth, compute_s=compute,
                     fixed_s=device.step_overhead_s + (2 * model.num_layers * ALLREDUCE_LATENCY_S if tp > 1 else 0.0),
                     per_seq_s=device.per_sequence_overhead_s + comm_per_token, comm_token_s=comm_per_token)


def decode_step_s(model: ModelSpec, device: Device, tp: int, batch: float, context: float, ep: bool = False) -> float:
    """Time of one decode step for ``batch`` sequences holding ``context`` tokens each on average."""
    return step_model(model, device, tp, context, ep).time(batch)


class Endpoint(msgspec.Struct, frozen=True, order=True):
    """The decode side of a KV transfer as a prefill sees it: vendor (link), KV format (shim), NIC
    rate and lanes, the decode ranks that each pull their shard over their own NIC."""

    vendor: str
    kv_format: str
    nic_gb_s: float
    lanes: int


def endpoint(device: Device, tp: int, ep: bool = False) -> Endpoint:
    """A TP-``tp`` decode pulls over ``tp`` NICs; a data-parallel (EP) rank holds a request alone."""
    return Endpoint(vendor=device.vendor, kv_format=device.kv_format, nic_gb_s=device.scale_out_gb_s,
                    lanes=1 if ep else tp)


def kv_transfer_s(model: ModelSpec, prefill: Device, tp: int, decode: Endpoint, link: Link, num_tokens: int,
                  overlap_s: float = 0.0) -> float:
    """Exposed time of one prompt's KV pull, plus the shim when the two formats differ.

    ``min(tp, decode.lanes)`` shards move in parallel, each at the slowest of the link, the prefill
    NIC and the decode NIC. vLLM's NIXL connector pulls after the prefill ends (``overlap_s`` 0);
    a layer-wise transfer sent while ``overlap_s`` of prefill compute remains hides all of it
    but the last layer's share.
    """
    unique_bytes = model.kv_bytes(num_tokens, 1)
    lane_gb_s = min(link.gb_s, prefill.scale_out_gb_s, decode.nic_gb_s)
    wire = unique_bytes / (min(tp, decode.lanes) * lane_gb_s * 1e9)
    if overlap_s:
        wire = max(wire / model.num_layers, wire - overlap_s * (1 - 1 / model.num_layers))
    shim = unique_bytes / (link.shim_gb_s * 1e9) if prefill.kv_format != decode.kv_format else 0.0
    return link.latency_s + wire + shim


def prefill_ttft_s(service_s: float, handoff_s: float, rate: float, q: float) -> float:
    """TTFT quantile of a prefill instance at ``rate``: M/D/1 wait + prefill + hand-off to decode."""
    return md1_wait_quantile(rate, service_s, q) + service_s + handoff_s


def prefill_capacity(model: ModelSpec, device: Device, tp: int, workload: Workload, slo: Slo,
                     link: Link, decode: Endpoint, layerwise: bool = False) -> Capacity:
    """Per-instance prefill capacity when the KV goes to ``decode`` endpoints.

    The first decode step is budgeted at the TPOT SLO, the slowest step any feasible decode
    instance may take, so the bound holds whichever decode instance the router picks.
    """
    problem = fit_problem(model, device, tp, workload.isl)
    if problem:
        return Capacity(device=device.name, tp=tp, rate=0.0, binding="memory", reason=problem)
    service = prefill_s(model, device, tp, workload.isl)
    overlap = service - device.prefill_overhead_s if layerwise else 0.0
    handoff = kv_transfer_s(model, device, tp, decode, link, workload.isl, overlap) + slo.tpot_s
    floor = service + handoff
    if floor > slo.ttft_s:
        return Capacity(device=device.name, tp=tp, rate=0.0, binding="TTFT", floor_s=floor,
                        reason=f"TTFT floor {floor * 1e3:.0f} ms on {label(device, tp)} > SLO "
                               f"{slo.ttft_s * 1e3:.0f} ms (prefill {service * 1e3:.0f} ms + KV hand-off "
                               f"{handoff * 1e3:.0f} ms)")
    rate = bisect(lambda r: prefill_ttft_s(service, handoff, r, slo.quantile) <= slo.ttft_s,
                         0.0, 1 / service)
    return Capacity(device=device.name, tp=tp, rate=rate, binding="TTFT",
                    max_num_seqs=serve_defaults(device, tp).max_num_seqs)


def bisect(predicate, lo: float, hi: float, steps: int = 60) -> float:
    """Boundary of a predicate true on [lo, x) and false on [x, hi]."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predicate(mid) else (lo, mid)
    return lo


def decode_batch(model: ModelSpec, device: Device, tp: int, workload: Workload, rate: float,
                 slowdown: float = 1.0, ep: bool = False) -> float:
    """Mean running batch at ``rate``: least fixed point of Little's law ``B = c TPOT(B)``,
    c = rate x OSL x slowdown; inf when the instance is overloaded.

    ``TPOT(B) / B`` falls with B (``StepModel``), so ``c TPOT(B) > B`` holds exactly below the
    fixed point: a bisection finds it, and it exists only while ``c`` x the saturated
    per-sequence cost stays below 1.
    """
    step = step_model(model, device, tp, workload.mean_context, ep)
    c = rate * workload.osl * slowdown
    if c * step.slope >= 1:
        return math.inf
    hi = max(1.0, c * step.time(0))
    while c * step.time(hi) > hi:
        hi *= 2
    return bisect(lambda b: c * step.time(b) > b, 0.0, hi)


def decode_tpot_s(model: ModelSpec, device: Device, tp: int, workload: Workload, rate: float,
                  q: float, slowdown: float = 1.0, ep: bool = False) -> float:
    """TPOT quantile at ``rate``: step time of a batch holding the request itself plus the
    q-quantile of the others, who are Poisson with the mean batch (M/G/infinity seen by a tagged
    request)."""
    batch = decode_batch(model, device, tp, workload, rate, slowdown, ep)
    if math.isinf(batch):
        return math.inf
    return decode_step_s(model, device, tp, 1 + poisson_quantile(batch, q), workload.mean_context, ep) * slowdown


def max_batch_within(model: ModelSpec, device: Device, tp: int, context: float, tpot_s: float,
                     ep: bool = False) -> int:
    """Largest integer batch whose step time stays within ``tpot_s`` (0 if even one sequence is too slow)."""
    step = step_model(model, device, tp, context, ep)
    if step.time(1) > tpot_s:
        return 0
    hi = 2
    while step.time(hi) <= tpot_s:
        if hi >= 1 << 40:
            return hi
        hi *= 2
    lo = hi // 2  # time(lo) <= tpot < time(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if step.time(mid) <= tpot_s else (lo, mid)
    return lo


def decode_capacity(model: ModelSpec, device: Device, tp: int, workload: Workload, slo: Slo,
                    ep: bool = False) -> Capacity:
    """Per-instance decode capacity: the batch quantile must meet TPOT, KV memory and vLLM's
    ``max_num_seqs`` (the ``vllm serve`` default for the device, ``serve_defaults``)."""
    request_tokens = workload.isl + workload.osl
    problem = fit_problem(model, device, tp, request_tokens, ep)
    if problem:
        return Capacity(device=device.name, tp=tp, rate=0.0, binding="memory", reason=problem)
    context = workload.mean_context
    by_tpot = max_batch_within(model, device, tp, context, slo.tpot_s, ep)
    if by_tpot == 0:
        floor = decode_step_s(model, device, tp, 1, context, ep)
        return Capacity(device=device.name, tp=tp, rate=0.0, binding="TPOT", floor_s=floor,
                        reason=f"TPOT floor {floor * 1e3:.1f} ms on {label(device, tp, ep)} > SLO "
                               f"{slo.tpot_s * 1e3:.1f} ms")
    engines = tp if ep else 1  # data-parallel attention: one scheduler, and one max_num_seqs, per rank
    limits = {"TPOT": by_tpot, "KV memory": int(max_sequences(model, device, tp, context, ep)),
              "max_num_seqs": serve_defaults(device, tp).max_num_seqs * engines}
    binding = min(limits, key=limits.get)
    max_batch = limits[binding]
    mean_batch = largest_poisson_mean(max_batch - 1, slo.quantile)  # the request itself + the others
    step = decode_step_s(model, device, tp, mean_batch, context, ep)
    rate = mean_batch / (workload.osl * step)  # Little's law at the largest admissible mean batch
    return Capacity(device=device.name, tp=tp, rate=rate, binding=binding,
                    max_num_seqs=math.ceil(max_batch / engines))
