"""End-to-end P/D benchmark: monolithic vs upstream NixlConnector vs HeteroNixlConnector (same and translated formats).

Every configuration runs in the same invocation on the same machine and model, so the ratios it prints
(ours / upstream TTFT, translated / same-format TTFT, connector bytes/s / raw NIXL bytes/s) compare like with
like. Load comes from ``vllm bench serve`` through our router (or straight at the monolithic engine); transfer
and translate times come from the decode's Prometheus histograms as deltas over the run. Engines run with
prefix caching off and every run gets a fresh seed, otherwise repeated prompts would hit the cache and skip
the transfer being measured: ``vllm bench serve``'s random prompts repeat over the tiny model's small
vocabulary, and with the cache on a monolithic TTFT fell from 365 to 36 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from vllm_hetero_pd.launch.bench_dynamic import NOISY_LOAD_AVERAGE
from vllm_hetero_pd.launch.cluster import LocalCluster
from vllm_hetero_pd.launch.goodput import spread
from vllm_hetero_pd.launch.instance import InstanceSpec, hetero_kv_config
from vllm_hetero_pd.launch.router_process import running_router
from vllm_hetero_pd.ports import free_port
from vllm_hetero_pd.testing.metrics import metric_sum, scrape

NO_PREFIX_CACHE = ["--no-enable-prefix-caching"]


class BenchConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One served configuration: how the prefill and decode engines are set up (no decode = monolithic)."""

    name: str
    prefill_kv: dict[str, Any] | None = None
    decode_kv: dict[str, Any] | None = None
    prefill_block_size: int = 128
    decode_block_size: int = 128  # also the monolithic engine's
    connector: str = "none"  # "none", "upstream" or "hetero": which histograms to read
    prefill_release: str = "0.32"  # vLLM release each side runs: "0.32" (this environment) or "0.28" (--python-028)
    decode_release: str = "0.32"


class ConfigResult(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    num_requests: int
    ttft_p50_ms: float
    ttft_p90_ms: float
    tpot_p50_ms: float
    transfer_ms_per_req: float | None = None
    translate_ms_per_req: float | None = None
    bytes_per_req: float | None = None


def _upstream(role: str) -> dict[str, Any]:
    return {"kv_connector": "NixlConnector", "kv_role": role, "kv_buffer_device": "cpu"}


CONFIGS = (
    BenchConfig(name="monolithic"),
    BenchConfig(name="upstream-nixl", prefill_kv=_upstream("kv_producer"), decode_kv=_upstream("kv_consumer"),
                connector="upstream"),
    BenchConfig(name="ours-bs128-to-bs128", prefill_kv=hetero_kv_config("kv_producer"),
                decode_kv=hetero_kv_config("kv_consumer"), connector="hetero"),
    BenchConfig(name="ours-bs32-to-bs128", prefill_kv=hetero_kv_config("kv_producer"),
                decode_kv=hetero_kv_config("kv_consumer"), prefill_block_size=32, connector="hetero"),
    BenchConfig(name="ours-cuda-flash-attn-LBNHC-bs16-to-cpu",
                prefill_kv=hetero_kv_config("kv_producer", {"export_format": "cuda/flash_attn/C/LBNHC",
                                                            "export_block_size": 16}),
                decode_kv=hetero_kv_config("kv_consumer"), connector="hetero"),
    # Cross-release (issue 11): vLLM 0.28 (era B) on one side, block sizes differ.
    BenchConfig(name="monolithic-0.28-bs32", decode_block_size=32, decode_release="0.28"),
    BenchConfig(name="ours-0.32-bs128-to-0.28-bs32", prefill_kv=hetero_kv_config("kv_producer"),
                decode_kv=hetero_kv_config("kv_consumer"), decode_block_size=32, decode_release="0.28",
                connector="hetero"),
    BenchConfig(name="ours-0.28-bs32-to-0.32-bs128", prefill_kv=hetero_kv_config("kv_producer"),
                decode_kv=hetero_kv_config("kv_consumer"), prefill_block_size=32, prefill_release="0.28",
                connector="hetero"),
    BenchConfig(name="ours-0.32-bs128-to-0.28-bs32-host-staging",
                prefill_kv=hetero_kv_config("kv_producer", {"host_staging": True}),
                decode_kv=hetero_kv_config("kv_consumer", {"host_staging": True}), decode_block_size=32,
                decode_release="0.28", connector="hetero"),
)

# (transfer seconds histogram, translate seconds histogram or None, bytes counter) per connector.
_METRICS = {
    "hetero": ("vllm:hetero_pd_transfer_seconds", "vllm:hetero_pd_translate_seconds",
               "vllm:hetero_pd_bytes_transferred"),
    "upstream": ("vllm:nixl_xfer_time_seconds", None, "vllm:nixl_bytes_transferred"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model path (default: the tiny llama-gqa-d32 bf16 test model)")
    parser.add_argument("--num-prompts", type=int, default=30)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--configs", nargs="*", default=[c.name for c in CONFIGS], choices=[c.name for c in CONFIGS])
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of --num-prompts per config, on the same engines (and raw baseline runs)")
    parser.add_argument("--raw-repeats", type=int, default=200, help="raw NIXL READs timed per baseline run")
    parser.add_argument("--out", type=Path, default=Path("bench-e2e-out"), help="dir for results.json / results.md")
    parser.add_argument("--seed", type=int, default=None, help="base seed (default: from the clock, fresh per run)")
    parser.add_argument("--python-028", default=".venv-028/bin/python",
                        help="interpreter of the vLLM 0.28 environment, for the cross-release rows")


def _bench_serve(base_url: str, model: str, args: argparse.Namespace, seed: int, result_dir: Path) -> dict:
    """Drive ``vllm bench serve`` at ``base_url`` and return its saved JSON result."""
    result_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "vllm_hetero_pd.launch.vllm_cli", "bench", "serve", "--base-url", base_url,
           "--model", model, "--dataset-name", "random", "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
           "--max-concurrency", "1", "--seed", str(seed), "--percentile-metrics", "ttft,tpot",
           "--metric-percentiles", "50,90", "--save-result", "--result-dir", str(result_dir),
           "--result-filename", "result.json"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads((result_dir / "result.json").read_text())


def _histogram_totals(url: str, connector: str) -> dict[str, float]:
    samples = scrape(url)
    transfer, translate, nbytes = _METRICS[connector]
    totals = {"transfer_sum": metric_sum(samples, transfer + "_sum"),
              "transfer_count": metric_sum(samples, transfer + "_count"),
              "bytes": metric_sum(samples, nbytes + "_total") or metric_sum(samples, nbytes + "_sum")}
    if translate:
        totals["translate_sum"] = metric_sum(samples, translate + "_sum")
    return totals


def summarize(name: str, serve: dict, before: dict[str, float] | None, after: dict[str, float] | None) -> ConfigResult:
    """Turn one ``vllm bench serve`` result plus histogram deltas into a table row (per-request averages)."""
    row = {"name": name, "num_requests": int(serve["completed"]), "ttft_p50_ms": float(serve["p50_ttft_ms"]),
           "ttft_p90_ms": float(serve["p90_ttft_ms"]), "tpot_p50_ms": float(serve["p50_tpot_ms"])}
    if before is not None and after is not None:
        delta = {k: after[k] - before.get(k, 0.0) for k in after}
        if delta["transfer_count"] <= 0:
            raise RuntimeError(f"{name}: decode recorded no KV transfers; "
                               "was prefix caching on or the router bypassed?")
        n = row["num_requests"]
        row["transfer_ms_per_req"] = 1e3 * delta["transfer_sum"] / n
        row["bytes_per_req"] = delta["bytes"] / n
        if "translate_sum" in delta:
            row["translate_ms_per_req"] = 1e3 * delta["translate_sum"] / n
    return ConfigResult(**row)


def ratios(results: dict[str, ConfigResult], raw_bytes_per_s: float | None) -> dict[str, float]:
    """The ratios issue 4 names; each only when both sides were measured in this run."""
    out: dict[str, float] = {}
    same, upstream = results.get("ours-bs128-to-bs128"), results.get("upstream-nixl")
    if same and upstream:
        out["ttft_p50 ours-same-format / upstream"] = same.ttft_p50_ms / upstream.ttft_p50_ms
    for r in results.values():
        if same and r.name.startswith("ours-") and r is not same:
            out[f"ttft_p50 {r.name} / ours-same-format"] = r.ttft_p50_ms / same.ttft_p50_ms
        if raw_bytes_per_s and r.transfer_ms_per_req and r.bytes_per_req:
            out[f"transfer bytes/s {r.name} / raw NIXL"] = (r.bytes_per_req / (r.transfer_ms_per_req / 1e3)
                                                            / raw_bytes_per_s)
    return out


def markdown_table(rounds: dict[str, list[ConfigResult]], ratio_rounds: dict[str, list[float]],
                   raw_rounds: list[float], load: tuple[float, float]) -> str:
    """Each cell is ``mean (min-max)`` over the rounds; a ratio is taken round by round, then spread."""
    def cell(values: list[float | None], digits: int = 2, scale: float = 1.0) -> str:
        return "-" if None in values or not values else spread(values).cell(scale, digits)
    noisy = f" -- NOISY: above {NOISY_LOAD_AVERAGE} before the run, do not report these figures" \
        if load[0] > NOISY_LOAD_AVERAGE else ""
    n = max(len(r) for r in rounds.values())
    lines = [f"Load average {load[0]:.2f} before, {load[1]:.2f} after{noisy}. {n} round(s) per config on the same "
             f"engines; cells are mean (min-max) over rounds.", "",
             "| config | requests | TTFT p50 ms | TTFT p90 ms | TPOT p50 ms | transfer ms/req | translate ms/req "
             "| KiB/req |", "|---|---|---|---|---|---|---|---|"]
    for name, rs in rounds.items():
        lines.append(f"| {name} | {sum(r.num_requests for r in rs)} | {cell([r.ttft_p50_ms for r in rs])} | "
                     f"{cell([r.ttft_p90_ms for r in rs])} | {cell([r.tpot_p50_ms for r in rs])} | "
                     f"{cell([r.transfer_ms_per_req for r in rs], 3)} | "
                     f"{cell([r.translate_ms_per_req for r in rs], 3)} | "
                     f"{cell([r.bytes_per_req for r in rs], 1, 1 / 1024)} |")
    if raw_rounds:
        lines += ["", f"Raw NIXL READ (same bytes and descriptors, prepared lists, {len(raw_rounds)} run(s)): "
                      f"{cell(raw_rounds, 2, 1 / 2**30)} GiB/s"]
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {cell(v, 3)} |" for k, v in ratio_rounds.items()]
    return "\n".join(lines) + "\n"


def raw_nixl_bytes_per_s(bytes_per_req: int, desc_bytes: int, num_lists: int, repeats: int) -> float:
    """Mean throughput of a two-agent NIXL READ of ``bytes_per_req`` of DRAM, shaped as the connector reads
    a request: ``num_lists`` per-layer K/V lists of ``desc_bytes`` blocks, prepared once, the request's
    blocks adjacent in each list (as in a fresh cache), one prepared READ per request. This is the limit the
    connector's transfer is held to: same bytes, same descriptors, nothing but NIXL in between."""
    from vllm_hetero_pd.transport.block_layout import block_indices
    from vllm_hetero_pd.transport.nixl_agent import Memory, NixlAgent

    blocks = max(1, -(-bytes_per_req // (desc_bytes * num_lists)))
    num_blocks = 2 * blocks  # each list holds more blocks than one request reads, as a cache does
    size = num_lists * num_blocks * desc_bytes
    src, dst = np.ones(size, dtype=np.uint8), np.zeros(size, dtype=np.uint8)
    offsets = np.arange(num_lists * num_blocks, dtype=np.uint64) * desc_bytes
    agents = [NixlAgent(name=f"raw-{role}-{free_port()}", backends=["UCX"], backend_params={}, progress_delay_us=100)
              for role in ("src", "dst")]
    try:
        agents[0].register([(src.ctypes.data, src.nbytes)], "DRAM")
        agents[1].register([(dst.ctypes.data, dst.nbytes)], "DRAM")
        remote = agents[1].add_remote(agents[0].metadata())
        rows = np.stack([offsets, np.full_like(offsets, desc_bytes)], axis=1)
        local = agents[1].prepare("", rows + [dst.ctypes.data, 0], Memory("DRAM"))
        source = agents[1].prepare(remote, rows + [src.ctypes.data, 0], Memory("DRAM"))
        ids = block_indices(len(rows), num_blocks, list(range(blocks)))
        elapsed = 0.0
        for i in range(repeats + 1):  # the first READ sets up the connection, as a decode's first request does
            start = time.perf_counter()
            read = agents[1].read(local, ids, source, ids)
            while (state := agents[1].poll(read)) == "PROC":
                pass
            elapsed += (time.perf_counter() - start) if i else 0.0
            if state != "DONE":
                raise RuntimeError(f"raw NIXL READ ended in state {state}")
        if not (dst.reshape(num_lists, num_blocks, desc_bytes)[:, :blocks] == 1).all():
            raise RuntimeError("raw NIXL READ did not copy the source bytes")
        return len(ids) * desc_bytes * repeats / elapsed
    finally:
        for agent in agents:
            agent.close()


def _block_geometry(model: str, block_size: int = 128) -> tuple[int, int]:
    """Bytes of one block of one layer's K (or V), and how many such per-layer lists a cache has: the
    descriptors the connectors READ with."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    elem = 4 if cfg.get("torch_dtype") == "float32" else 2
    desc_bytes = block_size * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head_dim * elem
    return desc_bytes, 2 * cfg["num_hidden_layers"]


def run_config(config: BenchConfig, model: str, args: argparse.Namespace, seed: int,
               work: Path) -> list[ConfigResult]:
    """``args.repeat`` rounds of ``vllm bench serve`` on one launch of the config's engines, a fresh seed each."""
    pythons = {"0.32": None, "0.28": args.python_028}
    if config.decode_kv is None:
        specs = [InstanceSpec(role="monolithic", model=model, block_size=config.decode_block_size,
                              python=pythons[config.decode_release], extra_args=NO_PREFIX_CACHE)]
    else:
        specs = [InstanceSpec(role="prefill", model=model, block_size=config.prefill_block_size,
                              kv_transfer_config=config.prefill_kv, python=pythons[config.prefill_release],
                              extra_args=NO_PREFIX_CACHE),
                 InstanceSpec(role="decode", model=model, block_size=config.decode_block_size,
                              kv_transfer_config=config.decode_kv, python=pythons[config.decode_release],
                              extra_args=NO_PREFIX_CACHE)]
    seeds = [seed + 1000 * k for k in range(args.repeat)]
    with LocalCluster(specs, work / config.name / "logs") as cluster:
        if config.decode_kv is None:
            return [summarize(config.name, _bench_serve(cluster.instances[0].url, model, args, s,
                                                        work / config.name / f"round-{k}"), None, None)
                    for k, s in enumerate(seeds)]
        prefill, decode = cluster.instances
        rounds = []
        with running_router([prefill.url], [decode.url], work / f"{config.name}-router.log") as url:
            for k, s in enumerate(seeds):
                before = _histogram_totals(decode.url, config.connector)
                serve = _bench_serve(url, model, args, s, work / config.name / f"round-{k}")
                rounds.append(summarize(config.name, serve, before, _histogram_totals(decode.url, config.connector)))
    return rounds


def run(args: argparse.Namespace) -> int:
    if args.repeat < 1:
        raise SystemExit("error: --repeat must be at least 1")
    if args.model is None:
        from vllm_hetero_pd.testing.tiny_model import build_tiny_model
        args.model = str(build_tiny_model("llama-gqa-d32", "bfloat16"))
    seed = args.seed if args.seed is not None else int(time.time())
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-", dir=args.out))
    load_before = os.getloadavg()[0]
    print(f"load average before: {load_before:.2f}", flush=True)
    rounds: dict[str, list[ConfigResult]] = {}
    for index, config in enumerate(c for c in CONFIGS if c.name in args.configs):
        rounds[config.name] = run_config(config, args.model, args, seed + index, work)
        for r in rounds[config.name]:
            print(f"{config.name}: {msgspec.json.encode(r).decode()}", flush=True)
    per_req = [r.bytes_per_req for rs in rounds.values() for r in rs if r.bytes_per_req]
    raw = ([raw_nixl_bytes_per_s(int(max(per_req)), *_block_geometry(args.model), args.raw_repeats)
            for _ in range(args.repeat)] if per_req else [])
    ratio_rounds: dict[str, list[float]] = {}
    for k in range(args.repeat):
        for key, value in ratios({n: rs[k] for n, rs in rounds.items()}, raw[k] if raw else None).items():
            ratio_rounds.setdefault(key, []).append(value)
    load_after = os.getloadavg()[0]
    table = markdown_table(rounds, ratio_rounds, raw, (load_before, load_after))
    print(table)
    (args.out / "results.md").write_text(table)
    (args.out / "results.json").write_bytes(msgspec.json.encode(
        {"rounds": rounds, "raw_nixl_bytes_per_s": raw, "ratios": ratio_rounds, "seed": seed,
         "load_average": {"before": load_before, "after": load_after}}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
