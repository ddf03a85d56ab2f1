"""Performance model, queueing, model geometry and catalog checks against independent numbers.

Expected values come from published configs, from roofline floors worked by hand (decode: FP8
weight bytes / (HBM bandwidth x 0.8); prefill of 4096 tokens: 2*P*L + 2*n_l*L^2*d = 6.0e14 FLOPs at
the FP8 peak and published matmul efficiency), from simulation (M/D/1), or from the defining
equation (fixed points), never from the code under test.
"""

from __future__ import annotations

import json
import math

import msgspec
import numpy as np
import pytest

from vllm_hetero_pd.planner import colocated, perf
from vllm_hetero_pd.planner.catalog import CatalogError, load_catalog
from vllm_hetero_pd.planner.model import ModelError, load_model
from vllm_hetero_pd.planner.queueing import md1_wait_quantile, poisson_quantile
from vllm_hetero_pd.planner.workload import Slo, Workload

CATALOG = load_catalog()
LLAMA_70B_FP8 = load_model("llama-3.1-70b", weight_dtype="fp8")


def test_llama_geometry_matches_published_sizes():
    # 70.6 GB of FP8 weights read per step (layers at 1 B + the LM head at 2 B; 72.65 GB resident with
    # the 16-bit embedding table); BF16 KV per token = 2 (K, V) * 80 layers * 8 KV heads * 128 dims * 2 B = 320 KiB
    assert perf.weights_read_bytes(LLAMA_70B_FP8, 1) / 1e9 == pytest.approx(70.6, abs=0.1)
    assert load_model("llama-3.1-70b").kv_bytes(1, 1) == 320 * 1024
    assert load_model("llama-3.1-8b").kv_bytes(1, 1) == 128 * 1024
    assert load_model("llama-3.1-405b").kv_bytes(1, 1) == 504 * 1024
    assert load_model("llama-3.1-8b").num_params / 1e9 == pytest.approx(8.03, abs=0.01)


@pytest.mark.parametrize("device,floor_ms", [("B200", 11), ("H100", 26), ("Gaudi3", 24), ("MI300X", 17)])
def test_decode_weight_read_floor_matches_anchor_table(device, floor_ms):
    dev = CATALOG.device(device)
    step = perf.decode_step_s(LLAMA_70B_FP8, dev, 1, 0, 0) - dev.step_overhead_s
    assert step * 1e3 == pytest.approx(floor_ms, rel=0.06)


@pytest.mark.parametrize("device,prefill_ms", [("B200", 175), ("H100", 428)])
def test_prefill_4096_matches_anchor_table(device, prefill_ms):
    dev = CATALOG.device(device)
    t = perf.prefill_s(LLAMA_70B_FP8, dev, 1, 4096) - dev.prefill_overhead_s
    # the anchor runs all FLOPs at the FP8 rate; we run attention at BF16, a few % slower
    assert t * 1e3 == pytest.approx(prefill_ms, rel=0.05)


def test_tensor_parallel_speeds_prefill_up_sublinearly():
    dev = CATALOG.device("H100")
    times = [perf.prefill_s(LLAMA_70B_FP8, dev, tp, 4096) for tp in (1, 2, 4, 8)]
    assert all(a > b for a, b in zip(times, times[1:]))
    assert times[0] / times[3] < 8  # all-reduce and fixed overhead do not shrink with TP


def test_tp_validity_follows_vllm_head_rules():
    m = LLAMA_70B_FP8  # 64 heads, 8 KV heads
    assert [tp for tp in (1, 2, 3, 4, 8, 16) if m.valid_tp(tp)] == [1, 2, 4, 8, 16]
    odd = load_model("llama-3.1-8b").__class__(**{**_fields(m), "num_heads": 40, "num_kv_heads": 8})
    assert not odd.valid_tp(16) and odd.valid_tp(8)
    # KV heads are replicated beyond 8, so TP 16 stores 16 heads per token, not 8
    assert m.kv_bytes(1, 16) == 2 * m.kv_bytes(1, 8)
    problem = perf.fit_problem(m, CATALOG.device("H100"), 3, 100)
    assert "does not divide 64 attention heads" in problem


def _fields(struct) -> dict:
    return {f: getattr(struct, f) for f in struct.__struct_fields__}


def test_md1_quantile_tracks_simulation():
    """Lindley recursion with Poisson arrivals and fixed service: the p90 wait is within 15 %."""
    rng = np.random.default_rng(0)
    service = 0.1
    for rho in (0.5, 0.8):
        gaps = rng.exponential(service / rho, 200_000)
        wait, waits = 0.0, np.empty(len(gaps))
        for i, gap in enumerate(gaps):
            waits[i] = wait
            wait = max(0.0, wait + service - gap)
        simulated = np.quantile(waits[1000:], 0.9)
        assert md1_wait_quantile(rho / service, service, 0.9) == pytest.approx(simulated, rel=0.15)
    assert md1_wait_quantile(10.0, 0.1, 0.9) == math.inf


def test_poisson_quantile_matches_cdf():
    def cdf(n: int, mean: float) -> float:
        return sum(math.exp(-mean + i * math.log(mean) - math.lgamma(i + 1)) for i in range(n + 1))

    for mean in (0.3, 4.0, 37.5, 300.0):
        k = poisson_quantile(mean, 0.9)
        assert cdf(k, mean) >= 0.9 and (k == 0 or cdf(k - 1, mean) < 0.9)


def test_decode_batch_is_littles_law_fixed_point():
    dev, wl = CATALOG.device("MI300X"), Workload(isl=4096, osl=512, rate=1)
    for rate in (0.5, 3.0, 10.0):
        b = perf.decode_batch(LLAMA_70B_FP8, dev, 2, wl, rate)
        step = perf.decode_step_s(LLAMA_70B_FP8, dev, 2, b, wl.mean_context)
        assert b == pytest.approx(rate * wl.osl * step, rel=1e-9)
    assert perf.decode_batch(LLAMA_70B_FP8, dev, 2, wl, 1e6) == math.inf


def test_max_batch_within_is_the_exact_boundary():
    dev = CATALOG.device("H100")
    for tpot in (0.03, 0.05, 0.2):
        b = perf.max_batch_within(LLAMA_70B_FP8, dev, 4, 4352, tpot)
        assert perf.decode_step_s(LLAMA_70B_FP8, dev, 4, b, 4352) <= tpot
        assert perf.decode_step_s(LLAMA_70B_FP8, dev, 4, b + 1, 4352) > tpot


def test_capacity_meets_slo_at_capacity_and_misses_above():
    """At the reported capacity the predicted quantiles meet the SLO; 5 % above, they do not."""
    wl, slo = Workload(isl=2048, osl=256, rate=1), Slo(ttft_s=1.0, tpot_s=0.04)
    dev = CATALOG.device("H200")
    dec = perf.decode_capacity(LLAMA_70B_FP8, dev, 2, wl, slo)
    assert perf.decode_tpot_s(LLAMA_70B_FP8, dev, 2, wl, dec.rate, 0.9) <= slo.tpot_s * 1.001
    col = colocated.capacity(LLAMA_70B_FP8, dev, 4, wl, slo)
    ttft, tpot = colocated.predict(LLAMA_70B_FP8, dev, 4, wl, col.rate * 1.05, 0.9)
    assert ttft > slo.ttft_s or tpot > slo.tpot_s
    pre = perf.prefill_capacity(LLAMA_70B_FP8, dev, 2, wl, slo, CATALOG.link(dev, dev), perf.endpoint(dev, 2))
    service = perf.prefill_s(LLAMA_70B_FP8, dev, 2, wl.isl)
    kv = perf.kv_transfer_s(LLAMA_70B_FP8, dev, 2, perf.endpoint(dev, 2), CATALOG.link(dev, dev), wl.isl)
    handoff = kv + slo.tpot_s
    assert perf.prefill_ttft_s(service, handoff, pre.rate, 0.9) <= slo.ttft_s * 1.001
    assert perf.prefill_ttft_s(service, handoff, pre.rate * 1.05, 0.9) > slo.ttft_s


def test_infeasible_slo_reports_the_floor():
    dev = CATALOG.device("Gaudi2")
    cap = perf.prefill_capacity(LLAMA_70B_FP8, dev, 8, Workload(isl=4096, osl=16, rate=1),
                                Slo(ttft_s=0.1, tpot_s=0.05), CATALOG.link(dev, dev), perf.endpoint(dev, 8))
    assert cap.rate == 0 and cap.reason.startswith("TTFT floor") and "Gaudi2 TP8 > SLO 100 ms" in cap.reason


def test_cross_format_transfer_pays_for_the_shim():
    h100, mi300x = CATALOG.device("H100"), CATALOG.device("MI300X")
    same = perf.kv_transfer_s(LLAMA_70B_FP8, h100, 1, perf.endpoint(h100, 1), CATALOG.link(h100, mi300x), 4096)
    cross = perf.kv_transfer_s(LLAMA_70B_FP8, h100, 1, msgspec.structs.replace(perf.endpoint(h100, 1),
                               kv_format=mi300x.kv_format), CATALOG.link(h100, mi300x), 4096)
    link = CATALOG.link(h100, mi300x)
    assert cross - same == pytest.approx(LLAMA_70B_FP8.kv_bytes(4096, 1) / (link.shim_gb_s * 1e9))


def test_shipped_catalog_has_the_required_devices_with_sources():
    required = {"H100", "H200", "B200", "MI300X", "MI325X", "MI355X", "Gaudi2", "Gaudi3", "A100", "L40S", "CPU"}
    assert required <= set(CATALOG.devices)
    for dev in CATALOG.devices.values():
        assert all(dev.sources[f].strip() for f in ("bf16_tflops", "hbm_tb_s", "price_per_hour"))


def test_catalog_rejects_a_number_without_source(tmp_path):
    import msgspec

    entry = msgspec.to_builtins(CATALOG.device("H100"))
    del entry["sources"]["tdp_w"]
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(msgspec.yaml.encode({"devices": [entry]}))
    with pytest.raises(CatalogError, match="H100: no source for tdp_w"):
        load_catalog([bad])


def test_catalog_rejects_unknown_fields_and_unknown_devices(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("devices: []\nlinkz: []\n")
    with pytest.raises(CatalogError, match="linkz"):
        load_catalog([bad])
    with pytest.raises(CatalogError, match="unknown device 'H300'.*known devices"):
        CATALOG.device("H300")


def test_user_catalog_replaces_a_device_and_links_prefer_specific(tmp_path):
    h100 = CATALOG.device("H100")
    import msgspec

    cheap = msgspec.structs.replace(h100, price_per_hour=1.0)
    override = tmp_path / "mine.json"
    override.write_bytes(msgspec.json.encode({"devices": [cheap], "links": [
        {"prefill_vendor": "nvidia", "decode_vendor": "intel", "gb_s": 3.0, "latency_s": 0, "shim_gb_s": 9.0,
         "source": "test"}]}))
    merged = load_catalog([override])
    assert merged.device("h100").price_per_hour == 1.0
    assert merged.link(h100, CATALOG.device("Gaudi3")).gb_s == 3.0
    assert merged.link(h100, CATALOG.device("MI300X")).prefill_vendor == "*"
    assert merged.link(h100, CATALOG.device("B200")).prefill_vendor == "nvidia"


def test_model_config_errors_name_the_missing_field(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    with pytest.raises(ModelError, match="lacks num_hidden_layers, intermediate_size, vocab_size"):
        load_model(str(tmp_path))
    with pytest.raises(ModelError, match="neither a preset"):
        load_model("llama-9")


def test_moe_config_counts_all_experts_in_memory_but_active_ones_in_flops(tmp_path):
    cfg = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 256, "moe_intermediate_size": 32,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "num_local_experts": 8,
           "num_experts_per_tok": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = load_model(str(tmp_path))
    expert = 3 * 64 * 32
    assert m.num_params - m.num_active_params == 2 * 6 * expert + 100 * 64  # 6 idle experts per layer + lookup


def test_a_lone_request_decodes_at_the_batch_one_step_time():
    """At vanishing load the tagged request is alone in the batch: TPOT = step(batch=1), not step(0)."""
    dev, wl = CATALOG.device("H100"), Workload(isl=512, osl=64, rate=1)
    tpot = perf.decode_tpot_s(LLAMA_70B_FP8, dev, 2, wl, 1e-9, 0.5)
    assert tpot == pytest.approx(perf.decode_step_s(LLAMA_70B_FP8, dev, 2, 1, wl.mean_context))
