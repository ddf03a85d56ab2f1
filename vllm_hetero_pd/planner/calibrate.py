"""``vllm-hetero-pd calibrate``: measure a running OpenAI-compatible vLLM instance and fit its device.

Prefill latency vs prompt length comes from ``max_tokens=1`` completions sent one at a time
(median per length); decode step latency vs batch from ``B`` concurrent streamed completions
(median per-request TPOT). Prompts are random token ids, fresh for every
request, so prefix caching cannot shorten a prefill. The fit (``fit.py``) is written as a catalog
file for ``plan --catalog``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import msgspec

from vllm_hetero_pd.planner.catalog import CatalogError, CatalogFile, load_catalog
from vllm_hetero_pd.planner.fit import DecodeSample, PrefillSample, fit_device
from vllm_hetero_pd.planner.model import ModelError, ModelSpec, load_model

HTTP_TIMEOUT = aiohttp.ClientTimeout(total=600)


class Completion(msgspec.Struct, frozen=True):
    """Client-side timing of one completion: start, first token, and each streamed chunk."""

    start: float
    chunk_times: tuple[float, ...]

    @property
    def ttft_s(self) -> float:
        return self.chunk_times[0] - self.start


def random_prompt(rng: random.Random, num_tokens: int, vocab_size: int) -> list[int]:
    """Token ids away from the special ids at the start of small vocabularies."""
    return [rng.randrange(16, vocab_size) for _ in range(num_tokens)]


async def served_model(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(f"{url}/v1/models") as resp:
        resp.raise_for_status()
        return (await resp.json())["data"][0]["id"]


async def complete(session: aiohttp.ClientSession, url: str, model: str, prompt: list[int],
                   max_tokens: int) -> Completion:
    """One streamed completion that ignores EOS, timed on arrival of every chunk."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0.0}
    start = time.perf_counter()
    times = []
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url} answered {resp.status}: {(await resp.text())[:300]}")
        async for line in resp.content:
            if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                times.append(time.perf_counter())
    if not times:
        raise RuntimeError(f"{url} streamed no tokens")
    return Completion(start=start, chunk_times=tuple(times))


async def open_loop(url: str, requests: Sequence[tuple[float, list[int], int]]) -> list[Completion | BaseException]:
    """Send each ``(offset s, prompt, max_tokens)`` at its offset from now without waiting for earlier
    answers: an open-loop client, so a slow server does not slow the arrivals and its queue builds as
    it would in production. A request that fails comes back as its exception, in its place, so that a
    goodput count can score it as a miss (``successes`` raises it instead)."""
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
        model = await served_model(session, url)

        async def one(offset: float, prompt: list[int], max_tokens: int) -> Completion:
            await asyncio.sleep(offset)
            return await complete(session, url, model, prompt, max_tokens)

        return list(await asyncio.gather(*(one(*r) for r in requests), return_exceptions=True))


def successes(runs: list[Completion | BaseException]) -> list[Completion]:
    """The completions of an ``open_loop`` run, raising the first failure (calibration and validation
    runs must not quietly lose requests)."""
    for run in runs:
        if isinstance(run, BaseException):
            raise run
    return runs


async def measure_prefill(url: str, lengths: list[int], repeats: int, vocab_size: int,
                          seed: int = 0) -> list[PrefillSample]:
    """Median TTFT of ``repeats`` single-token completions per prompt length (medians resist the
    stalls a shared host adds to single requests)."""
    rng = random.Random(seed)
    samples = []
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
        model = await served_model(session, url)
        await complete(session, url, model, random_prompt(rng, 8, vocab_size), 1)  # warm-up
        for length in lengths:
            ttfts = [(await complete(session, url, model, random_prompt(rng, length, vocab_size), 1)).ttft_s
                     for _ in range(repeats)]
            samples.append(PrefillSample(length, statistics.median(ttfts)))
    return samples


async def measure_decode(url: str, batches: list[int], contexts: list[int], steps: int, vocab_size: int,
                         repeats: int = 1, seed: int = 1) -> list[DecodeSample]:
    """Step time at batch B: ``B`` concurrent completions of ``steps`` tokens each (EOS ignored).

    Per request, (last token - first token) / (steps - 1) is its TPOT whatever the server's
    chunking of the stream; the median over the batch and ``repeats`` runs is the step time.
    """
    rng = random.Random(seed)
    samples = []
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
        model = await served_model(session, url)
        for context in contexts:
            for batch in batches:
                tpots = []
                for _ in range(repeats):
                    runs = await asyncio.gather(*(complete(session, url, model,
                                                           random_prompt(rng, context, vocab_size), steps)
                                                  for _ in range(batch)))
                    tpots += [(r.chunk_times[-1] - r.chunk_times[0]) / (steps - 1) for r in runs]
                samples.append(DecodeSample(batch, context + steps / 2, statistics.median(tpots)))
    return samples


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="base URL of a running vLLM server, e.g. http://127.0.0.1:8100")
    parser.add_argument("--model", required=True, help="the served model's config.json / directory / preset")
    parser.add_argument("--dtype", default="bf16", help="weight dtype the server runs (bf16, fp16, fp8, fp32)")
    parser.add_argument("--device", default="CPU", help="catalog device the server runs on (fitted fields replaced)")
    parser.add_argument("--name", default=None, help="name of the fitted device (default: same as --device)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the server")
    parser.add_argument("--catalog", action="append", default=[], type=Path, metavar="FILE")
    parser.add_argument("--lengths", default="32,128,256,512,1024", help="prompt lengths for prefill")
    parser.add_argument("--repeats", type=int, default=5, help="prefills per length (median kept)")
    parser.add_argument("--batches", default="1,2,4,8,16", help="decode batch sizes")
    parser.add_argument("--contexts", default="64,512", help="prompt lengths for decode runs")
    parser.add_argument("--steps", type=int, default=64, help="tokens generated per decode request")
    parser.add_argument("--out", type=Path, required=True, help="catalog YAML to write")


def calibrate(url: str, model: ModelSpec, base_device: str, name: str, tp: int, catalog_paths: list[Path],
              lengths: list[int], repeats: int, batches: list[int], contexts: list[int], steps: int):
    """Measure, then fit; returns (device, report, prefill samples, decode samples)."""
    base = load_catalog(catalog_paths).device(base_device)
    prefill = asyncio.run(measure_prefill(url, lengths, repeats, model.vocab_size))
    decode = asyncio.run(measure_decode(url, batches, contexts, steps, model.vocab_size, max(1, repeats // 2)))
    device, report = fit_device(base, model, tp, prefill, decode, name, url)
    return device, report, prefill, decode


def run(args: argparse.Namespace) -> int:
    try:
        model = load_model(args.model, weight_dtype=args.dtype)
        device, report, _, _ = calibrate(args.url, model, args.device, args.name or args.device, args.tp,
                                         args.catalog, _ints(args.lengths), args.repeats, _ints(args.batches),
                                         _ints(args.contexts), args.steps)
    except (CatalogError, ModelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (aiohttp.ClientError, RuntimeError) as e:
        print(f"error: measuring {args.url} failed: {e}; is a vLLM server running there?", file=sys.stderr)
        return 2
    args.out.write_bytes(msgspec.yaml.encode(CatalogFile(devices=[device])))
    print(f"wrote {args.out}: {device.name} prefill_overhead {device.prefill_overhead_s * 1e3:.2f} ms, "
          f"compute {device.bf16_tflops * device.bf16_efficiency:.3f} TFLOP/s achieved, memory efficiency "
          f"{device.memory_efficiency:.2f}, step overhead {device.step_overhead_s * 1e3:.2f} ms + "
          f"{device.per_sequence_overhead_s * 1e3:.3f} ms/sequence; fit RMS error prefill "
          f"{report.prefill_rms_rel_error:.1%}, decode {report.decode_rms_rel_error:.1%}")
    return 0
