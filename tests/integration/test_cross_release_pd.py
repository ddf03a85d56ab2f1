"""Cross-release P/D (issue 11): a prefill on one vLLM release, a decode on another.

vLLM 0.32 runs from this environment (``.venv``), vLLM 0.28 from ``.venv-028`` (``make setup-028``);
both run this checkout (installed editable), so both speak the same wire protocol and meet by
``KVFormat``, never by version. Each pair serves the eight session prompts (50-900 tokens,
crossing block boundaries of 32 and 128) and must give the greedy ids and top-5 logprobs
(``LOGPROB_TOLERANCE``) of a monolithic engine **of the decode's release** at the decode's block
size, with the decode computing at most one prompt token per request. A second decode of the
same release and block size, whose connector scrambles one block of every transfer, is the
negative control of each direction: the same comparison must fail for it. The prompts are 1-900
tokens long and include both block sizes plus and minus one.

Pairs:
* 0.32 bs128 -> 0.28 bs32 and 0.28 bs32 -> 0.32 bs128: era C <-> era B, block sizes differ,
  so the decode READs into staging and the shim translates;
* 0.28 bs32 <-> 0.28 bs32: the era-B fast path, same format, READ straight into the KV cache.

Host-DRAM staging (``host_staging``), in both cross-release directions, on the prefill alone
(the decode READs the prefill's host mirror), on the decode alone (it READs into a host pool,
then copies into its cache) and on both.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import vllm

from vllm_hetero_pd.launch.cluster import LocalCluster
from vllm_hetero_pd.launch.greedy import run_disaggregated, run_greedy
from vllm_hetero_pd.launch.instance import InstanceSpec
from vllm_hetero_pd.launch.instance import hetero_kv_config as hetero
from vllm_hetero_pd.testing.compare import LOGPROB_TOLERANCE, compare
from vllm_hetero_pd.testing.metrics import metric_sum, prompt_tokens_by_source, scrape
from vllm_hetero_pd.testing.prompts import EDGE_LENGTHS, make_prompts

from pd_helpers import log_of

ROOT = Path(__file__).resolve().parents[2]
PYTHONS = {"0.32": sys.executable, "0.28": str(ROOT / ".venv-028" / "bin" / "python")}

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(not Path(PYTHONS["0.28"]).exists(), reason="needs .venv-028 (make setup-028)"),
    pytest.mark.skipif(not vllm.__version__.startswith("0.32."), reason="run from .venv (vLLM 0.32)"),
]


class Side(NamedTuple):
    release: str
    block_size: int


class Pair(NamedTuple):
    prefill: Side
    decode: Side


PAIRS = {
    "0.32-bs128-to-0.28-bs32": Pair(Side("0.32", 128), Side("0.28", 32)),
    "0.28-bs32-to-0.32-bs128": Pair(Side("0.28", 32), Side("0.32", 128)),
    "0.28-bs32-to-0.28-bs32": Pair(Side("0.28", 32), Side("0.28", 32)),
}
CORRUPT = slice(1, 4)  # prompts of 31, 33 and 97 tokens: the 1-token prompt moves no KV to corrupt
STAGED = {"host_staging": True}
NO_PREFIX_CACHE = ("--no-enable-prefix-caching",)


def spec(role: str, side: Side, model: str, extra: dict | None = None,
         extra_args: tuple[str, ...] = ()) -> InstanceSpec:
    kv = None if role == "monolithic" else hetero("kv_producer" if role == "prefill" else "kv_consumer", extra)
    return InstanceSpec(role=role, model=model, block_size=side.block_size, python=PYTHONS[side.release],
                        kv_transfer_config=kv, extra_args=list(extra_args))


@pytest.fixture(scope="module")
def prompts(tiny_model) -> list[list[int]]:
    return make_prompts(tiny_model, EDGE_LENGTHS)


@pytest.fixture(scope="module")
def reference_of(tiny_model, prompts, tmp_path_factory):
    """Greedy completions of a monolithic engine of one release and block size, computed once each."""
    cache = {}

    def reference(side: Side):
        if side not in cache:
            log_dir = tmp_path_factory.mktemp(f"monolithic-{side.release}-bs{side.block_size}")
            with LocalCluster([spec("monolithic", side, tiny_model)], log_dir) as cluster:
                cache[side] = run_greedy(cluster.instances[0].url, prompts)
        return cache[side]

    return reference


@pytest.mark.parametrize("name", list(PAIRS))
def test_cross_release_output_equals_the_decode_releases_monolithic(name, tiny_model, prompts, reference_of,
                                                                    log_dir):
    pair = PAIRS[name]
    reference = reference_of(pair.decode)
    specs = [spec("prefill", pair.prefill, tiny_model, {"lease_s": 120.0}),
             spec("decode", pair.decode, tiny_model),
             spec("decode", pair.decode, tiny_model, {"debug_corrupt_transfers": True})]
    with LocalCluster(specs, log_dir) as cluster:
        prefill, decode, corrupt = cluster.instances
        got = run_disaggregated(prefill.url, decode.url, prompts)
        on_decode = prompt_tokens_by_source(decode.url)
        samples = scrape(decode.url)
        scrambled = run_disaggregated(prefill.url, corrupt.url, prompts[CORRUPT])
        logs = {inst.name: log_of(inst) for inst in cluster.instances}

    assert compare(reference, got, LOGPROB_TOLERANCE) == []
    total = sum(len(p) for p in prompts)
    assert on_decode["local_compute"] <= len(prompts), on_decode
    assert on_decode["external_kv_transfer"] >= total - len(prompts), on_decode
    assert metric_sum(samples, "vllm:hetero_pd_transfer_seconds_count") == len(prompts)
    assert metric_sum(samples, "vllm:hetero_pd_failed_loads_total") == 0
    translated = metric_sum(samples, "vllm:hetero_pd_translate_seconds_sum") > 0
    assert translated == (pair.prefill.block_size != pair.decode.block_size), "only equal formats skip the shim"
    # every engine runs its release and describes its cache as CPU_ATTN LBHNC (era B and C alike)
    for inst, side in ((prefill, pair.prefill), (decode, pair.decode)):
        assert "native format detected/CPU_ATTN/LBHNC" in logs[inst.name], inst.name
        assert f"V1 LLM engine (v{side.release}." in logs[inst.name], (inst.name, side)
    # negative control: one scrambled block per transfer must break the comparison
    mismatches = compare(reference[CORRUPT], scrambled, LOGPROB_TOLERANCE)
    assert len(mismatches) == len(scrambled), mismatches


def assert_loaded_everything(decode_url: str, prompts: list[list[int]], runs: int) -> None:
    """The decode computed at most one prompt token per request, the rest arrived over NIXL."""
    on_decode = prompt_tokens_by_source(decode_url)
    total = sum(len(p) for p in prompts)
    assert on_decode["local_compute"] <= runs * len(prompts), on_decode
    assert on_decode["external_kv_transfer"] >= runs * (total - len(prompts)), on_decode
    assert metric_sum(scrape(decode_url), "vllm:hetero_pd_failed_loads_total") == 0


@pytest.mark.parametrize("name", list(PAIRS))
def test_host_staging_on_prefill_decode_and_both_equals_monolithic(name, tiny_model, prompts, reference_of, log_dir):
    pair = PAIRS[name]
    reference = reference_of(pair.decode)
    lease = {"lease_s": 120.0}
    specs = [spec("prefill", pair.prefill, tiny_model, lease),
             spec("prefill", pair.prefill, tiny_model, lease | STAGED),
             spec("decode", pair.decode, tiny_model, extra_args=NO_PREFIX_CACHE),
             spec("decode", pair.decode, tiny_model, STAGED, NO_PREFIX_CACHE)]  # each run must transfer again
    with LocalCluster(specs, log_dir) as cluster:
        plain_p, staged_p, plain_d, staged_d = cluster.instances
        combos = {"prefill": (staged_p, plain_d), "decode": (plain_p, staged_d), "both": (staged_p, staged_d)}
        got = {combo: run_disaggregated(p.url, d.url, prompts) for combo, (p, d) in combos.items()}
        assert_loaded_everything(plain_d.url, prompts, runs=1)
        assert_loaded_everything(staged_d.url, prompts, runs=2)
        logs = {inst.name: log_of(inst) for inst in cluster.instances}

    for combo, completions in got.items():
        assert compare(reference, completions, LOGPROB_TOLERANCE) == [], combo
    assert "host staging on" in logs[staged_p.name] and "rank(s) in DRAM" in logs[staged_p.name]
    assert "host staging on" not in logs[plain_p.name]
    # each decode logs where it READs from and into; the staging prefill advertises its host mirror
    step = "translate" if pair.prefill.block_size != pair.decode.block_size else "copy"
    assert f"READ from DRAM into DRAM staging, then {step} into the KV cache" in logs[staged_d.name]
    assert "staging pool in DRAM" in logs[staged_d.name]
    if step == "copy":  # same format: only the staging decode stages; the other READs the host mirror directly
        assert "direct READ from DRAM into the KV cache" in logs[plain_d.name]
