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

The engines start once per decode side (``engines_for``): a monolithic reference of the decode's
release, a prefill with and one without host staging of each release that prefills for it, and
three decodes (plain, staged, corrupting). Decodes run without prefix caching, so every request transfers again, and
each test reads only what its own requests added to a decode's counters (``counted``).
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

import pytest
import vllm

from vllm_hetero_pd.launch.cluster import LocalCluster
from vllm_hetero_pd.launch.greedy import run_disaggregated, run_greedy
from vllm_hetero_pd.launch.instance import InstanceSpec
from vllm_hetero_pd.launch.instance import hetero_kv_config as hetero
from vllm_hetero_pd.testing.compare import LOGPROB_TOLERANCE, compare
from vllm_hetero_pd.testing.prompts import EDGE_LENGTHS, make_prompts

from pd_helpers import counted, log_of

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


SIDES = (Side("0.32", 128), Side("0.28", 32))
PAIRS = {
    "0.32-bs128-to-0.28-bs32": Pair(SIDES[0], SIDES[1]),
    "0.28-bs32-to-0.32-bs128": Pair(SIDES[1], SIDES[0]),
    "0.28-bs32-to-0.28-bs32": Pair(SIDES[1], SIDES[1]),
}
CORRUPT = slice(1, 4)  # prompts of 31, 33 and 97 tokens: the 1-token prompt moves no KV to corrupt
LEASE = {"lease_s": 120.0}
STAGED = {"host_staging": True}
NO_PREFIX_CACHE = ("--no-enable-prefix-caching",)
KV_GIB = 0.25  # 128k tokens of the tiny model's KV (2 KiB each): ample, and eight engines fit in memory at once
# name -> (role, connector extra config, vLLM args); one of each per side
KINDS = {
    "monolithic": ("monolithic", None, ()),
    "prefill": ("prefill", LEASE, ()),
    "staged_prefill": ("prefill", LEASE | STAGED, ()),
    "decode": ("decode", None, NO_PREFIX_CACHE),
    "staged_decode": ("decode", STAGED, NO_PREFIX_CACHE),
    "corrupt_decode": ("decode", {"debug_corrupt_transfers": True}, NO_PREFIX_CACHE),
}


def spec(kind: str, side: Side, model: str) -> InstanceSpec:
    role, extra, args = KINDS[kind]
    kv = None if role == "monolithic" else hetero("kv_producer" if role == "prefill" else "kv_consumer", extra)
    return InstanceSpec(role=role, model=model, block_size=side.block_size, python=PYTHONS[side.release],
                        kv_transfer_config=kv, extra_args=list(args), kv_cache_space_gib=KV_GIB)


@pytest.fixture(scope="module")
def prompts(tiny_model) -> list[list[int]]:
    return make_prompts(tiny_model, EDGE_LENGTHS)


def engine_keys(decode: Side) -> list[tuple[str, Side]]:
    """What the pairs decoding on ``decode`` need: its reference, decodes, and both kinds of prefill of
    every release that prefills for it."""
    prefills = {pair.prefill for pair in PAIRS.values() if pair.decode == decode}
    prefill_keys = [(kind, side) for side in sorted(prefills) for kind in ("prefill", "staged_prefill")]
    decode_keys = [(kind, decode) for kind in ("decode", "staged_decode", "corrupt_decode")]
    return [("monolithic", decode), *prefill_keys, *decode_keys]


@pytest.fixture(scope="module")
def engines_for(tiny_model, tmp_path_factory):
    """``engines_for(decode_side)[kind, side]``: one cluster per decode side, started when first asked
    for and stopped when the tests move to the other side (both at once would not fit in 24 GiB)."""
    running: dict = {}
    with ExitStack() as stack:
        def engines(decode: Side) -> dict:
            if running.get("decode") != decode:
                stack.close()
                keys = engine_keys(decode)
                specs = [spec(kind, side, tiny_model) for kind, side in keys]
                log_dir = tmp_path_factory.mktemp(f"decode-{decode.release}-bs{decode.block_size}")
                cluster = stack.enter_context(LocalCluster(specs, log_dir, startup_timeout_s=600))
                running.update(decode=decode, engines=dict(zip(keys, cluster.instances)))
            return running["engines"]

        yield engines


@pytest.fixture(scope="module")
def reference_of(engines_for, prompts):
    """Greedy completions of the monolithic engine of one release and block size, computed once each."""
    cache = {}

    def reference(side: Side):
        if side not in cache:
            cache[side] = run_greedy(engines_for(side)["monolithic", side].url, prompts)
        return cache[side]

    return reference


def assert_loaded_everything(added: dict[str, float], prompts: list[list[int]]) -> None:
    """The decode computed at most one prompt token per request, the rest arrived over NIXL."""
    total = sum(len(p) for p in prompts)
    assert added["local_compute"] <= len(prompts), added
    assert added["external_kv_transfer"] >= total - len(prompts), added
    assert added["transfers"] == len(prompts), added
    assert added["failed_loads"] == 0, added


def check_output_equals_the_decode_releases_monolithic(pair: Pair, engines: dict, prompts, reference) -> None:
    prefill, decode = engines["prefill", pair.prefill], engines["decode", pair.decode]
    corrupt = engines["corrupt_decode", pair.decode]
    got, added = counted(decode.url, lambda: run_disaggregated(prefill.url, decode.url, prompts))
    scrambled = run_disaggregated(prefill.url, corrupt.url, prompts[CORRUPT])

    assert compare(reference, got, LOGPROB_TOLERANCE) == []
    assert_loaded_everything(added, prompts)
    translated = added["translate_s"] > 0
    assert translated == (pair.prefill.block_size != pair.decode.block_size), "only equal formats skip the shim"
    # every engine runs its release and describes its cache as CPU_ATTN LBHNC (era B and C alike)
    for inst, side in ((prefill, pair.prefill), (decode, pair.decode)):
        log = log_of(inst)
        assert "native format detected/CPU_ATTN/LBHNC" in log, inst.name
        assert f"V1 LLM engine (v{side.release}." in log, (inst.name, side)
    # negative control: one scrambled block per transfer must break the comparison
    mismatches = compare(reference[CORRUPT], scrambled, LOGPROB_TOLERANCE)
    assert len(mismatches) == len(scrambled), mismatches


def check_host_staging_on_prefill_decode_and_both(pair: Pair, engines: dict, prompts, reference) -> None:
    plain_p, staged_p = engines["prefill", pair.prefill], engines["staged_prefill", pair.prefill]
    plain_d, staged_d = engines["decode", pair.decode], engines["staged_decode", pair.decode]
    combos = {"prefill": (staged_p, plain_d), "decode": (plain_p, staged_d), "both": (staged_p, staged_d)}
    for combo, (p, d) in combos.items():
        got, added = counted(d.url, lambda p=p, d=d: run_disaggregated(p.url, d.url, prompts))
        assert compare(reference, got, LOGPROB_TOLERANCE) == [], combo
        assert_loaded_everything(added, prompts)

    staged_log, plain_log = log_of(staged_p), log_of(plain_p)
    assert "host staging on" in staged_log and "rank(s) in DRAM" in staged_log
    assert "host staging on" not in plain_log
    # each decode logs where it READs from and into; the staging prefill advertises its host mirror
    step = "translate" if pair.prefill.block_size != pair.decode.block_size else "copy"
    assert f"READ from DRAM into DRAM staging, then {step} into the KV cache" in log_of(staged_d)
    assert "staging pool in DRAM" in log_of(staged_d)
    if step == "copy":  # same format: only the staging decode stages; the other READs the host mirror directly
        assert "direct READ from DRAM into the KV cache" in log_of(plain_d)


CHECKS = {"equals-monolithic": check_output_equals_the_decode_releases_monolithic,
          "host-staging": check_host_staging_on_prefill_decode_and_both}
# grouped by decode side, so that each side's engines start once
CASES = [(name, check) for decode in SIDES for name, pair in PAIRS.items() if pair.decode == decode for check in CHECKS]


@pytest.mark.parametrize(("name", "check"), CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_cross_release(name, check, engines_for, prompts, reference_of):
    pair = PAIRS[name]
    reference = reference_of(pair.decode)
    CHECKS[check](pair, engines_for(pair.decode), prompts, reference)
