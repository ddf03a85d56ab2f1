"""The model layer reads real HF configs: hand-computed figures for five published models.

Configs are trimmed copies of the published config.json files (``planner_configs/``, source URL in
each). Every expected number below is worked out by hand in the comment above it, from the config
fields alone, and checked against the published parameter counts where the model card gives one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_hetero_pd.planner import perf
from vllm_hetero_pd.planner.catalog import load_catalog
from vllm_hetero_pd.planner.model import load_model

CONFIGS = Path(__file__).with_name("planner_configs")
CATALOG = load_catalog()


def model(name: str, **kw):
    return load_model(str(CONFIGS / f"{name}.json"), **kw)


def test_llama_3_1_70b():
    m = model("llama-3.1-70b")
    # attention per layer: q 8192*64*128 = 67,108,864; k+v 2*8192*8*128 = 16,777,216; o 67,108,864
    #   = 150,994,944; MLP 3*8192*28672 = 704,643,072; layer = 855,638,016; x80 = 68,451,041,280
    # embeddings 2*128256*8192 = 2,101,346,304 -> total 70,552,387,584 (model card: 70.6 B)
    assert m.num_params == pytest.approx(70_552_387_584, rel=0.02)
    assert m.num_params == pytest.approx(70.6e9, rel=0.02)
    # active = layers 68,451,041,280 + LM head 1,050,673,152 = 69,501,714,432
    assert m.num_active_params == pytest.approx(69_501_714_432, rel=0.02)
    # KV per token, BF16: 2 (K, V) * 80 layers * 8 heads * 128 * 2 B = 327,680 B
    assert m.kv_bytes(1, 1) == pytest.approx(327_680, rel=0.02)
    # FP8 weights, 16-bit embedding + LM head: 68,451,041,280 * 1 + 2,101,346,304 * 2 = 72.65 GB resident
    assert model("llama-3.1-70b", weight_dtype="fp8").weight_bytes == pytest.approx(72.65e9, rel=0.02)
    assert m.max_context == 131072 and m.sliding_window == 0


def test_mixtral_8x7b():
    m = model("mixtral-8x7b")
    # attention 4096*32*128*2 (q, o) + 2*4096*8*128 (k, v) = 33,554,432 + 8,388,608 = 41,943,040
    # expert 3*4096*14336 = 176,160,768; router 8*4096 = 32,768
    # layer 41,943,040 + 8*176,160,768 + 32,768 = 1,451,261,952; x32 = 46,440,382,464
    # + embeddings 2*32000*4096 = 262,144,000 -> 46,702,526,464 (Mistral: 46.7 B)
    assert m.num_params == pytest.approx(46_702_526_464, rel=0.02)
    assert m.num_params == pytest.approx(46.7e9, rel=0.02)
    # active: 32*(41,943,040 + 2*176,160,768 + 32,768) = 12,617,515,008 + LM head 131,072,000
    #   = 12,748,587,008; with the 131 M embedding lookup 12.88 B (Mistral: 12.9 B)
    assert m.num_active_params == pytest.approx(12_748_587_008, rel=0.02)
    assert m.num_active_params + 32000 * 4096 == pytest.approx(12.9e9, rel=0.02)
    # KV: 2*32*8*128*2 = 131,072 B/token; sliding_window is null in the published config
    assert m.kv_bytes(4096, 1) == pytest.approx(131_072 * 4096, rel=0.02)


def test_qwen3_30b_a3b_moe_reads_only_the_routed_experts():
    m = model("qwen3-30b-a3b")
    # attention 2048*32*128*2 + 2*2048*4*128 = 16,777,216 + 2,097,152 = 18,874,368
    # expert 3*2048*768 = 4,718,592; x128 = 603,979,776; router 128*2048 = 262,144
    # layer 623,116,288; x48 = 29,909,581,824; + embeddings 2*151936*2048 = 622,329,856
    #   -> 30,531,911,680 (Qwen: 30.5 B)
    assert m.num_params == pytest.approx(30_531_911_680, rel=0.02)
    assert m.num_params == pytest.approx(30.5e9, rel=0.02)
    # active: 48*(18,874,368 + 8*4,718,592 + 262,144) = 2,730,491,904 + LM head 311,164,928
    #   = 3,041,656,832; + lookup 311 M = 3.35 B (Qwen: 3.3 B)
    assert m.num_active_params == pytest.approx(3_041_656_832, rel=0.02)
    assert m.num_active_params + 151936 * 2048 == pytest.approx(3.3e9, rel=0.02)
    # decode at batch 1, BF16: dense read 48*(18,874,368 + 262,144) + LM head 311,164,928
    #   = 1,229,717,504 params = 2.459 GB; experts: 128*(1 - (1 - 8/128)^1) = 8 per layer
    #   -> 48*8*4,718,592*2 B = 3.624 GB; total 6.083 GB, vs 61.06 GB if every expert were read (10x)
    assert perf.weights_read_bytes(m, 1) == pytest.approx(6.083e9, rel=0.02)
    assert m.weight_bytes / perf.weights_read_bytes(m, 1) == pytest.approx(10.0, rel=0.02)
    # batch 64: 0.9375^64 = exp(64 ln 0.9375) = exp(-4.1305) = 0.01607 -> 128*(1-0.01607) = 125.94 experts
    assert m.experts_touched(64) == pytest.approx(125.94, rel=0.02)
    # KV: 2*48*4*128*2 = 98,304 B/token
    assert m.kv_bytes(1, 1) == pytest.approx(98_304, rel=0.02)


def test_deepseek_v3_mla_and_shared_experts():
    m = model("deepseek-v3")
    # MLA attention per layer: q_a 7168*1536 = 11,010,048; q_b 1536*128*(128+64) = 37,748,736;
    #   kv_a 7168*(512+64) = 4,128,768; kv_b 512*128*(128+128) = 16,777,216; o 128*128*7168 = 117,440,512
    #   = 187,105,280; x61 = 11,413,422,080
    # dense MLP, 3 layers: 3*3*7168*18432 = 1,189,085,184
    # expert 3*7168*2048 = 44,040,192: routed 58*256 = 653,930,790,912; shared 58*1 = 2,554,331,136
    # router 58*256*7168 = 106,430,464; embeddings 2*129280*7168 = 1,853,358,080
    # total 671,047,417,856 (DeepSeek: 671 B main model, plus a 14 B MTP module not served here)
    assert m.num_params == pytest.approx(671_047_417_856, rel=0.02)
    assert m.num_params == pytest.approx(671e9, rel=0.02)
    # active: 11,413,422,080 + 1,189,085,184 + 2,554,331,136 + 106,430,464 + 58*8*44,040,192
    #   (20,434,649,088) + LM head 926,679,040 = 36,624,596,992 (DeepSeek: 37 B)
    assert m.num_active_params == pytest.approx(36_624_596_992, rel=0.02)
    assert m.num_active_params == pytest.approx(37e9, rel=0.02)
    # MLA KV: one latent of 512 + 64 per token per layer: 61*576*2 B = 70,272 B (not 1.75 MB);
    # the checkpoint's quantization_config says fp8, so KV defaults to FP8: 35,136 B
    assert model("deepseek-v3", kv_dtype="bf16").kv_bytes(1, 1) == pytest.approx(70_272, rel=0.02)
    assert m.weight_dtype == "fp8" and m.kv_bytes(1, 1) == pytest.approx(35_136, rel=0.02)
    # the latent has no heads to split: TP8 holds it on every rank
    assert m.kv_bytes(1, 8) == pytest.approx(8 * 35_136, rel=0.02)
    assert m.valid_tp(8) and m.valid_tp(16)


def test_gpt_oss_120b_sliding_window_and_mxfp4_experts():
    m = model("gpt-oss-120b")
    # attention 2880*64*64*2 + 2*2880*8*64 = 23,592,960 + 2,949,120 = 26,542,080
    # expert 3*2880*2880 = 24,883,200; x128 = 3,185,049,600; router 128*2880 = 368,640
    # layer 3,211,960,320; x36 = 115,630,571,520; + embeddings 2*201088*2880 = 1,158,266,880
    #   -> 116,788,838,400 (OpenAI: 116.8 B)
    assert m.num_params == pytest.approx(116_788_838_400, rel=0.02)
    # active: 36*(26,542,080 + 4*24,883,200 + 368,640) = 4,551,966,720 + LM head 579,133,440
    #   = 5,131,100,160 (OpenAI: 5.1 B)
    assert m.num_active_params == pytest.approx(5_131_100_160, rel=0.02)
    # weights as shipped: experts MXFP4 36*3,185,049,600*4.25/8 = 60.92 GB; attention + router in BF16
    #   36*26,910,720*2 = 1.94 GB; embeddings 1,158,266,880*2 = 2.32 GB -> 65.17 GB
    assert (m.weight_dtype, m.expert_dtype, m.kv_dtype) == ("bf16", "mxfp4", "bf16")
    assert m.weight_bytes == pytest.approx(65.17e9, rel=0.02)
    # KV at 4096 tokens: 2*8*64*2 = 2,048 B per token per layer; 18 full layers keep 4096 tokens
    #   (150,994,944 B), 18 sliding layers keep 128 (4,718,592 B) -> 155,713,536 B, where counting
    #   every layer in full gives 36*4096*2048 = 301,989,888 B (1.94x)
    assert m.kv_bytes(4096, 1) == pytest.approx(155_713_536, rel=0.02)
    assert m.num_sliding_layers == 18 and m.sliding_window == 128


def test_four_bit_weights_use_fp4_units_only_where_they_exist():
    """gpt-oss prefill runs its MXFP4 matmuls at the FP4 peak on B200; H100 has no FP4 units and
    dequantizes to BF16, so B200's advantage exceeds its BF16 ratio 2250/989 = 2.3."""
    m = model("gpt-oss-120b")
    assert m.low_precision == "fp4"
    b200, h100 = CATALOG.device("B200"), CATALOG.device("H100")
    assert b200.peak_flops("fp4") == pytest.approx(9000e12 * b200.fp8_efficiency)
    assert h100.peak_flops("fp4") == pytest.approx(989e12 * h100.bf16_efficiency)
    ratio = perf.prefill_s(m, h100, 1, 8192) / perf.prefill_s(m, b200, 1, 8192)
    assert ratio > 2250 / 989
    int4 = model("llama-3.1-70b", weight_dtype="int4")
    # INT4: 68,451,041,280 * 4.125 / 8 + 2,101,346,304 * 2 = 39.5 GB
    assert int4.weight_bytes == pytest.approx(39.5e9, rel=0.02) and int4.low_precision == "bf16"


def test_moe_decode_step_grows_with_the_experts_the_batch_touches():
    """Qwen3-30B-A3B on H100 TP1: the batch-1 step reads 6.08 GB, not 61 GB; by batch 64 nearly
    every expert is read, so the step approaches the full-weight read."""
    m, dev = model("qwen3-30b-a3b"), CATALOG.device("H100")
    bandwidth = 3.35e12 * 0.8
    one = perf.decode_step_s(m, dev, 1, 1, 1024) - dev.step_overhead_s - dev.per_sequence_overhead_s
    # 6.083 GB weights + 1024 tokens * 98,304 B KV (0.101 GB) = 6.184 GB / 2.68 TB/s = 2.307 ms
    assert one == pytest.approx(6.184e9 / bandwidth, rel=0.02)
    full = perf.decode_step_s(m, dev, 1, 64, 1024)
    assert full > 8 * one


def test_a_checkpoint_config_round_trips_to_the_launch_name():
    from vllm_hetero_pd.planner.model import serve_name

    assert serve_name(str(CONFIGS / "deepseek-v3.json")) == "deepseek-ai/DeepSeek-V3"
    assert not model("deepseek-v3").online_fp8  # already FP8: no --quantization flag
    assert model("llama-3.1-70b", weight_dtype="fp8").online_fp8


def test_expert_parallel_decode_stops_replicating_the_mla_latent():
    """DeepSeek-V3 FP8 on 8x H200 at 4352 tokens of context (4096 in, 512 out):
    resident weights 669.19e9 * 1 B + 1.853e9 embedding/LM head params * 2 B = 672.9 GB.
    TP8: 84.1 GB per rank, 141*0.9 - 84.1 = 42.8 GB free x 8 = 342 GB; the latent sits on all 8
      ranks: 8 * 35,136 B * 4352 = 1.223 GB per sequence -> 280 sequences.
    EP8: dense 672.9 - 653.93 (routed experts) = 18.97 GB whole + 653.93 / 8 = 81.74 GB -> 100.7 GB
      per rank, 26.2 GB free x 8 = 209.5 GB; one copy per sequence 35,136 * 4352 = 152.9 MB -> 1370."""
    m, dev = model("deepseek-v3"), CATALOG.device("H200")
    assert m.weight_bytes == pytest.approx(672.9e9, rel=0.02)
    assert perf.max_sequences(m, dev, 8, 4352) == pytest.approx(280, rel=0.02)
    assert perf.max_sequences(m, dev, 8, 4352, ep=True) == pytest.approx(1370, rel=0.02)
    from vllm_hetero_pd.planner.workload import Slo, Workload

    wl, slo = Workload(isl=4096, osl=512, rate=1), Slo(ttft_s=2, tpot_s=0.1)
    tp8, ep8 = (perf.decode_capacity(m, dev, 8, wl, slo, ep=ep) for ep in (False, True))
    assert tp8.binding == "KV memory" and ep8.rate > 2 * tp8.rate
    assert ep8.max_num_seqs <= perf.serve_defaults(dev, 8).max_num_seqs  # per DP engine
    assert "EP needs an MoE" in perf.fit_problem(model("llama-3.1-70b"), dev, 8, 100, ep=True)
