"""``vllm-hetero-pd proxy``: run the P/D router from flags or a YAML config.

Flags build the same ``RouterConfig`` a YAML file does; with ``--config`` the file is the whole
configuration and instance/policy flags are refused, so there is one source of truth.
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
    RouterConfig,
    TimeoutConfig,
    load_config,
    parse_instance,
)

logger = logging.getLogger(__name__)

_POLICIES = [p.value for p in Policy]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="router.yaml (see docs/router.md); replaces the instance and policy flags")
    parser.add_argument("--prefill", action="append", default=[], metavar="URL[,weight=W]",
                        help="a prefill instance, e.g. http://10.0.0.1:8100,weight=2 (repeatable)")
    parser.add_argument("--decode", action="append", default=[], metavar="URL[,weight=W]",
                        help="a decode instance (repeatable)")
    parser.add_argument("--prefill-policy", choices=_POLICIES, default=Policy.LEAST_WORK.value)
    parser.add_argument("--decode-policy", choices=_POLICIES, default=Policy.LEAST_WORK.value)
    parser.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="listen port (default 8000)")
    parser.add_argument("--min-disagg-tokens", type=int, default=0,
                        help="prompts estimated shorter than this are prefilled by decode itself (0: never)")
    parser.add_argument("--no-local-prefill-fallback", action="store_true",
                        help="fail requests instead of prefilling on decode when no prefill instance can serve")
    parser.add_argument("--max-attempts", type=int, default=3, help="instances a request may try per pool")
    parser.add_argument("--max-failures", type=int, default=3, help="consecutive failures that eject an instance")
    parser.add_argument("--health-interval-s", type=float, default=2.0)
    parser.add_argument("--prefill-timeout-s", type=float, default=120.0)
    parser.add_argument("--decode-first-byte-timeout-s", type=float, default=120.0)
    parser.add_argument("--decode-idle-timeout-s", type=float, default=60.0)
    parser.add_argument("--api-key-env", default=None, metavar="VAR",
                        help="environment variable holding the client API key (keys stay out of `ps`)")
    parser.add_argument("--upstream-api-key-env", default=None, metavar="VAR",
                        help="environment variable holding the key sent to vLLM instances started with --api-key")
    parser.add_argument("--admin-token-env", default=None, metavar="VAR",
                        help="environment variable holding the admin token (admin endpoints are off without it)")
    parser.add_argument("--log-level", default="INFO")


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    """Build and validate the config; raises ``ConfigError`` naming the flag at fault."""
    if args.config:
        if args.prefill or args.decode:
            raise ConfigError("--config lists the instances; drop --prefill/--decode or drop --config")
        config = load_config(args.config)
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        return msgspec.structs.replace(config, **overrides)
    return RouterConfig(
        prefill=PoolConfig(instances=tuple(parse_instance(s) for s in args.prefill),
                           policy=Policy(args.prefill_policy)),
        decode=PoolConfig(instances=tuple(parse_instance(s) for s in args.decode), policy=Policy(args.decode_policy)),
        host=args.host or "127.0.0.1",
        port=8000 if args.port is None else args.port,
        api_key=_secret(args.api_key_env),
        upstream_api_key=_secret(args.upstream_api_key_env),
        admin_token=_secret(args.admin_token_env),
        min_disagg_tokens=args.min_disagg_tokens,
        local_prefill_fallback=not args.no_local_prefill_fallback,
        max_attempts=args.max_attempts,
        health=HealthConfig(interval_s=args.health_interval_s, max_failures=args.max_failures),
        timeouts=TimeoutConfig(prefill_s=args.prefill_timeout_s, decode_first_byte_s=args.decode_first_byte_timeout_s,
                               decode_idle_s=args.decode_idle_timeout_s),
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
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
    """uvloop (installed with vLLM) cuts the router's per-request CPU; asyncio works without it."""
    try:
        import uvloop
    except ImportError:
        logger.info("uvloop not installed; using the default asyncio event loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
