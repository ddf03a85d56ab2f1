"""Calibration fitting recovers known parameters from latencies generated with them."""

from __future__ import annotations

import msgspec
import pytest

from vllm_hetero_pd.planner import perf
from vllm_hetero_pd.planner.catalog import load_catalog
from vllm_hetero_pd.planner.fit import DecodeSample, PrefillSample, fit_device
from vllm_hetero_pd.planner.model import from_hf_config

TINY = from_hf_config({"num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 512,
                       "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32, "vocab_size": 2048},
                      name="tiny", weight_dtype="bf16", kv_dtype="bf16")


@pytest.mark.parametrize("mem_eff", [0.3, 0.7])
def test_fit_recovers_the_parameters_that_generated_the_samples(mem_eff):
    base = load_catalog().device("CPU")
    truth = msgspec.structs.replace(base, bf16_efficiency=0.42, attention_efficiency=0.11, memory_efficiency=mem_eff,
                                    prefill_overhead_s=0.011, step_overhead_s=0.006, per_sequence_overhead_s=0.0009)
    prefill = [PrefillSample(n, perf.prefill_s(TINY, truth, 1, n)) for n in (32, 128, 512, 1024, 2048)]
    decode = [DecodeSample(b, c, perf.decode_step_s(TINY, truth, 1, b, c)) for c in (96, 1500) for b in (1, 4, 16)]
    fitted, report = fit_device(base, TINY, 1, prefill, decode, "CPU-fit", "synthetic")
    assert fitted.name == "CPU-fit"
    assert fitted.bf16_efficiency == pytest.approx(0.42, rel=1e-6)
    assert fitted.attention_efficiency == pytest.approx(0.11, rel=1e-6)
    assert fitted.prefill_overhead_s == pytest.approx(0.011, rel=1e-6)
    assert fitted.memory_efficiency == pytest.approx(mem_eff, rel=0.06)  # grid resolution
    assert fitted.step_overhead_s == pytest.approx(0.006, rel=0.1)
    assert report.prefill_rms_rel_error < 1e-6 and report.decode_rms_rel_error < 0.02
    assert "calibrated" in fitted.sources["memory_efficiency"]
    assert msgspec.yaml.decode(msgspec.yaml.encode(fitted), type=type(fitted)) == fitted  # writable catalog entry


def test_fit_refuses_too_few_samples():
    base = load_catalog().device("CPU")
    with pytest.raises(ValueError, match="need >= 3 prefill and >= 3 decode samples"):
        fit_device(base, TINY, 1, [PrefillSample(8, 0.01)], [], "x", "nowhere")
