"""``vllm-hetero-pd tiny-model``: build (or find in the cache) a tiny model and print its directory."""

from __future__ import annotations

import argparse

from vllm_hetero_pd.testing.tiny_model import DTYPES, PRESETS, build_tiny_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default="llama-gqa-d32", choices=sorted(PRESETS))
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)


def run(args: argparse.Namespace) -> int:
    print(build_tiny_model(args.name, args.dtype))
    return 0
