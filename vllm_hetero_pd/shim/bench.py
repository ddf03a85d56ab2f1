"""Shim throughput: GB/s per format pair next to a plain torch copy of the same bytes.

``python -m vllm_hetero_pd.shim.bench [--device cuda]`` (or ``add_arguments``/``run`` under a
``bench shim`` subcommand). Needs torch only, so it runs on a bare CUDA box. Default volume:
one 4k-token prompt of an 8B-class model (32 layers, 8 KV heads, head size 128, bf16), about
0.5 GiB of KV per side. The baseline is ``dst.copy_(src)`` of two contiguous buffers of the
same byte count, timed alternately in the same run; the ratio is baseline seconds / pair
seconds per round, reported as the mean over the rounds and their range. The load average
is printed before and after; above 1.5 before the run the table is marked noisy.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

from vllm_hetero_pd.formats import preset
from vllm_hetero_pd.shim.plan import plan
from vllm_hetero_pd.shim.translate import allocate, translate

# (source preset, source block size, destination preset, destination block size, dtype pair)
PAIRS = [
    ("cuda/flash_attn/C/LBHNC", 16, "cuda/flash_attn/C/LBHNC", 16, "bf16"),
    ("cuda/flash_attn/C/LBNHC", 16, "cuda/flash_attn/C/LBHNC", 16, "bf16"),
    ("cuda/flash_attn/C/LBNHC", 16, "cpu/cpu_attn/vec", 128, "bf16"),
    ("cuda/flash_attn/C/LBHNC", 16, "cpu/cpu_attn/vec", 128, "bf16"),
    ("hpu/gaudi", 128, "cpu/cpu_attn/vec", 128, "bf16"),
    ("cuda/flash_attn/C/LBNHC", 16, "hpu/gaudi", 128, "bf16"),
    ("cuda/flash_attn/A2/NHD", 16, "cuda/flash_attn/C/LBHNC", 16, "bf16"),
    ("cuda/flash_attn/C/LBHNC", 16, "rocm-gfx942/triton_attn/C/LBHNC", 16, "fp8 fn->fnuz"),
    ("cuda/flash_attn/C/LBHNC", 16, "cuda/flash_attn/C/LBHNC", 16, "bf16->fp8"),
]
DTYPES = {"bf16": ("bfloat16", "bfloat16"), "fp8 fn->fnuz": ("fp8", "fp8"), "bf16->fp8": ("bfloat16", "fp8")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=4096, help="prompt length (positions moved)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds per pair (at least 3)")
    parser.add_argument("--consecutive", action="store_true", help="consecutive block ids instead of shuffled ones")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--pairs", default="all", help="comma-separated row numbers to run (1-based), or 'all'")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_rounds(first, second, device: torch.device, repeat: int) -> tuple[list[float], list[float]]:
    """Seconds of two operations per round, timed alternately so both see the same machine load."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(repeat + 1):
        for fn, out in ((first, times[0]), (second, times[1])):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if i:  # the first round warms up
                out.append(time.perf_counter() - t0)
    return times


def _ids(count: int, consecutive: bool, rng: random.Random) -> list[int]:
    ids = list(range(count))
    if not consecutive:
        rng.shuffle(ids)
    return ids


def _measure(args: argparse.Namespace, device: torch.device, rng: random.Random,
             pair: tuple) -> tuple[int, list[float], list[float]]:
    """Bytes moved, shim and plain-copy seconds per round for one pair (buffers freed on return)."""
    src_name, src_bs, dst_name, dst_bs, dtypes = pair
    src_dtype, dst_dtype = DTYPES[dtypes]
    geometry = dict(num_layers=args.layers, num_kv_heads=args.kv_heads, head_size=args.head_size)
    src_blocks, dst_blocks = -(-args.tokens // src_bs), -(-args.tokens // dst_bs)
    scales = (2.0,) * args.layers if dtypes == "fp8 fn->fnuz" else ()  # exact byte-remap case
    src = preset(src_name).build(num_blocks=src_blocks, block_size=src_bs, dtype=src_dtype, **geometry)
    dst = preset(dst_name).build(num_blocks=dst_blocks, block_size=dst_bs, dtype=dst_dtype, k_scales=scales,
                                 v_scales=scales, **geometry)
    src_buf, dst_buf = allocate(src, device), allocate(dst, device)
    for t in src_buf if isinstance(src_buf, tuple) else (src_buf,):
        t.view(torch.uint8).random_(0, 120)  # finite in every dtype
    compiled = plan([src], dst)
    src_ids, dst_ids = _ids(src_blocks, args.consecutive, rng), _ids(dst_blocks, args.consecutive, rng)
    moved = args.tokens * args.layers * args.kv_heads * 2 * args.head_size * dst.element_bytes
    a = torch.empty(moved, dtype=torch.uint8, device=device).random_()
    b = torch.empty_like(a)

    def shim() -> None:
        translate(compiled, [src_buf], dst_buf, src_block_ids=src_ids, dst_block_ids=dst_ids, stop=args.tokens)

    shim_s, copy_s = _timed_rounds(shim, lambda: b.copy_(a), device, args.repeat)
    return moved, shim_s, copy_s


def run(args: argparse.Namespace) -> int:
    if args.repeat < 3:
        print("bench shim: --repeat must be at least 3 (the ratio's spread needs rounds)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(0)
    rows = range(1, len(PAIRS) + 1) if args.pairs == "all" else [int(x) for x in args.pairs.split(",")]
    print(f"shim bench: {args.tokens} tokens x {args.layers} layers x {args.kv_heads} KV heads x head "
          f"{args.head_size}, "
          f"device {device}, {'consecutive' if args.consecutive else 'shuffled'} block ids, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {args.repeat} rounds")
    load = os.getloadavg()[0]
    print(f"load average before: {load:.2f}" + (" -- NOISY: above 1.5, do not report these figures" if load > 1.5
                                                 else ""))
    print(f"{'#':>2}  {'source -> destination':<62} {'dtype':<13} {'MiB':>6} {'GB/s':>7} {'copy GB/s':>9} "
          f"{'ratio':>6} {'(min-max)':>11}")
    for row in rows:
        src_name, src_bs, dst_name, dst_bs, dtypes = PAIRS[row - 1]
        moved, shim_s, copy_s = _measure(args, device, rng, PAIRS[row - 1])
        gbs, copy_gbs = moved / statistics.median(shim_s) / 1e9, moved / statistics.median(copy_s) / 1e9
        ratios = [c / s for s, c in zip(shim_s, copy_s)]
        label = f"{src_name} bs{src_bs} -> {dst_name} bs{dst_bs}"
        print(f"{row:>2}  {label:<62} {dtypes:<13} {moved / 2**20:>6.0f} {gbs:>7.2f} {copy_gbs:>9.2f} "
              f"{statistics.mean(ratios):>6.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
        sys.stdout.flush()
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_hetero_pd.shim.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
