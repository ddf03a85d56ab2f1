"""``vllm-hetero-pd proxy``: run the P/D router from flags or a YAML config.

Flags build the same ``RouterConfig`` a YAML file does, and flags not given keep the defaults in
``config.py``. With ``--config`` the file is the whole configuration: only ``--host``/``--port``
may be added, other flags are refused, so there is one source of truth.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

import msgspec

from vllm_hetero_pd.router.config import (
    ConfigError,
    HealthConfig,
    Policy,
    PoolConfig,
    RatioConfig,
    RouterConfig,
    TimeoutConfig,
    load_config,
    parse_instance,
)

logger = logging.getLogger(__name__)

_POLICIES = "{" + ",".join(p.value for p in Policy) + "}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="router.yaml (see docs/router.md); replaces every flag but --host/--port")
    parser.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="listen port (default 8000)")
    parser.add_argument("--log-level", default="INFO")
    # Defaults of the flags below live in config.py only; None means "not given".
    parser.add_argument("--prefill", action="append", default=[], metavar="URL[,weight=W][,kv_events=tcp://H:P]",
                        help="a prefill instance, e.g. http://10.0.0.1:8100,weight=2,kv_events=tcp://10.0.0.1:5557 "
                             "(repeatable; also kv_events_replay=, kv_format=)")
    parser.add_argument("--decode", action="append", default=[], metavar="URL[,weight=W][,kv_events=tcp://H:P]",
                        help="a decode instance (repeatable; same options)")
    parser.add_argument("--mixed", action="append", default=[], metavar="URL[,device=NAME][,tp=N]",
                        help="an instance started with kv_role kv_both that may take either role (repeatable; "
                             "same options)")
    parser.add_argument("--ratio-model", metavar="MODEL",
                        help="turn on the ratio controller and desired-replica gauges, sized by the planner's model "
                             "of MODEL (preset, config.json or model directory); other knobs: ratio in --config")
    parser.add_argument("--ratio-dtype", metavar="DTYPE",
                        help="weight dtype the model is served in, for its sizing (default auto: the checkpoint's)")
    parser.add_argument("--ratio-device", metavar="NAME",
                        help="planner catalog device of instances without device=NAME (e.g. CPU, H100)")
    parser.add_argument("--ratio-catalog", action="append", default=[], metavar="FILE",
                        help="extra catalog file, e.g. one written by vllm-hetero-pd calibrate (repeatable)")
    parser.add_argument("--ttft-slo-ms", type=float, help="the ratio controller's TTFT p90 target (default 2000)")
    parser.add_argument("--tpot-slo-ms", type=float, help="the ratio controller's TPOT p90 target (default 100)")
    parser.add_argument("--prefill-policy", type=Policy, choices=list(Policy), metavar=_POLICIES,
                        help="default least_work; kv_aware: cached prefix vs pending work")
    parser.add_argument("--decode-policy", type=Policy, choices=list(Policy), metavar=_POLICIES,
                        help="default least_work; kv_aware: load and KV capacity from /metrics")
    parser.add_argument("--min-disagg-tokens", type=int,
                        help="prompts whose part not cached on the chosen decode is shorter than this are prefilled "
                             "by decode itself (default 0: never)")
    parser.add_argument("--tokenizer", metavar="MODEL_DIR",
                        help="the model directory (with tokenizer.json): count prompts in the engine's tokens")
    parser.add_argument("--no-local-prefill-fallback", action="store_const", const=False,
                        dest="local_prefill_fallback",
                        help="fail requests instead of prefilling on decode when no prefill instance can serve")
    parser.add_argument("--max-attempts", type=int, help="instances a request may try per pool (default 3)")
    parser.add_argument("--max-fan-out", type=int,
                        help="P/D exchanges one batch or n>1 request may fan out into (default 64)")
    parser.add_argument("--max-failures", type=int, help="consecutive failures that eject an instance (default 3)")
    parser.add_argument("--health-interval-s", type=float, help="seconds between health probes (default 2)")
    parser.add_argument("--prefill-timeout-s", type=float, help="bound on one prefill call (default 120)")
    parser.add_argument("--decode-first-byte-timeout-s", type=float,
                        help="bound on the wait for a stream's first event (default 120)")
    parser.add_argument("--decode-idle-timeout-s", type=float,
                        help="bound on the silence between two stream chunks (default 60)")
    parser.add_argument("--api-key-env", metavar="VAR",
                        help="environment variable holding the client API key (keys stay out of `ps`)")
    parser.add_argument("--upstream-api-key-env", metavar="VAR",
                        help="environment variable holding the key sent to vLLM instances started with --api-key")
    parser.add_argument("--admin-token-env", metavar="VAR",
                        help="environment variable holding the admin token (admin endpoints are off without it)")


_TOP_LEVEL = ("min_disagg_tokens", "local_prefill_fallback", "max_attempts", "max_fan_out", "tokenizer")
_HEALTH = {"max_failures": "max_failures", "health_interval_s": "interval_s"}
_TIMEOUTS = {"prefill_timeout_s": "prefill_s", "decode_first_byte_timeout_s": "decode_first_byte_s",
             "decode_idle_timeout_s": "decode_idle_s"}
_SECRETS = {"api_key_env": "api_key", "upstream_api_key_env": "upstream_api_key", "admin_token_env": "admin_token"}
_POLICY_FLAGS = ("prefill_policy", "decode_policy")
_RATIO = {"ratio_dtype": "dtype", "ratio_device": "device", "ttft_slo_ms": "ttft_ms", "tpot_slo_ms": "tpot_ms"}


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    """Build and validate the config; raises ``ConfigError`` naming the flag at fault."""
    listen = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if args.config:
        given = [f"--{name.replace('_', '-')}" for name in (*_TOP_LEVEL, *_HEALTH, *_TIMEOUTS, *_SECRETS,
                                                             *_POLICY_FLAGS, *_RATIO, "prefill", "decode", "mixed",
                                                             "ratio_model", "ratio_catalog")
                 if getattr(args, name) not in (None, [])]
        if given:
            raise ConfigError(f"--config holds the whole configuration; drop {', '.join(given)} or drop --config")
        return msgspec.structs.replace(load_config(args.config), **listen)
    pools = {
        role: PoolConfig(instances=tuple(parse_instance(s) for s in getattr(args, role)),
                         **_given({"policy": getattr(args, f"{role}_policy")}))
        for role in ("prefill", "decode")
    }
    return RouterConfig(
        **pools, **listen, mixed=tuple(parse_instance(s) for s in args.mixed), ratio=_ratio(args),
        **_given({name: getattr(args, name) for name in _TOP_LEVEL}),
        **_given({field: _secret(getattr(args, flag)) for flag, field in _SECRETS.items()}),
        health=HealthConfig(**_given({field: getattr(args, flag) for flag, field in _HEALTH.items()})),
        timeouts=TimeoutConfig(**_given({field: getattr(args, flag) for flag, field in _TIMEOUTS.items()})),
    )


def _ratio(args: argparse.Namespace) -> RatioConfig | None:
    """The ratio section from its flags; None without --ratio-model (other ratio flags then are an error)."""
    others = [f"--{name.replace('_', '-')}" for name in (*_RATIO, "ratio_catalog")
              if getattr(args, name) not in (None, [])]
    if args.ratio_model is None:
        if others:
            raise ConfigError(f"{', '.join(others)} configure the ratio controller; add --ratio-model MODEL")
        return None
    return RatioConfig(model=args.ratio_model, catalog=tuple(args.ratio_catalog),
                       **_given({field: getattr(args, flag) for flag, field in _RATIO.items()}))


def _given(values: dict) -> dict:
    return {k: v for k, v in values.items() if v is not None}


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        if config.tokenizer is not None:
            from vllm_hetero_pd.router.tokens import PromptTokenizer

            PromptTokenizer(config.tokenizer)  # fail here, with the message, not inside the server
        if config.ratio is not None:
            from vllm_hetero_pd.router.capacity import CapacityModel

            CapacityModel(config.ratio).check(config.instances)
    except ConfigError as exc:
        print(f"vllm-hetero-pd proxy: {exc}", file=sys.stderr)
        return 2
    _use_uvloop()
    asyncio.run(_serve(config))
    return 0


async def _serve(config: RouterConfig) -> None:
    from vllm_hetero_pd.router.app import start_router

    running = await start_router(config)
    print(f"router listening on {running.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop()


def _secret(env_var: str | None) -> str | None:
    if env_var is None:
        return None
    value = os.environ.get(env_var)
    if not value:
        raise ConfigError(f"environment variable {env_var} is empty or unset; export the secret in it")
    return value


def _use_uvloop() -> None:
    """Run on uvloop (installed with vLLM) when present, as vLLM's own API server does; asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        logger.info("uvloop not installed; using the default asyncio event loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
