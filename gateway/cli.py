"""The `gateway` command: run, check-config, demo, emulator."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.config import Config, ConfigError, load_config, share_budget, summary

EXIT_CONFIG = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG
    handler: Any = args.handler
    result: int = handler(args)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway", description="Introspection-caching reverse proxy for Authlete."
    )
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="serve the proxy and admin listeners")
    _config_option(run)
    _loop_option(run)
    run.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="processes sharing the proxy listener via SO_REUSEPORT (default 1)",
    )
    # Used by the supervisor of --workers for each worker; not for people.
    run.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    run.add_argument("--admin-socket", help=argparse.SUPPRESS)
    # a worker of --workers N: its 1/N of the Authlete call budget
    run.add_argument("--budget-share", type=int, default=1, help=argparse.SUPPRESS)
    run.set_defaults(handler=_cmd_run)

    check = sub.add_parser("check-config", help="validate a config file and summarise its routes")
    _config_option(check)
    check.set_defaults(handler=_cmd_check)

    demo = sub.add_parser(
        "demo", help="run the gateway with the Authlete emulator and an echo upstream on loopback"
    )
    demo.add_argument("--config", "-c", help="demo config (default: the bundled demo.yaml)")
    demo.add_argument("--tokens", help="emulator tokens YAML (default: the bundled demo tokens)")
    _loop_option(demo)
    demo.set_defaults(handler=_cmd_demo)

    emu = sub.add_parser(
        "emulator",
        help="run the Authlete introspection emulator alone",
        description="Serve an emulation of Authlete's POST /api/{serviceId}/auth/introspection\n"
        "for tests, benchmarks and trying the gateway without an Authlete account. Tokens\n"
        "come from --tokens and from the control API under /_emulator/ (no authentication:\n"
        "loopback only unless --allow-remote).",
        epilog=_EMULATOR_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    emu.add_argument(
        "--listen",
        default="127.0.0.1:18400",
        help="host:port to serve on; a loopback address unless --allow-remote "
        "(default %(default)s)",
    )
    emu.add_argument(
        "--service-id",
        default="715948317",
        help="the Authlete service id, the {serviceId} of the introspection path: the "
        "gateway's authlete.service_id must match (default %(default)s)",
    )
    emu.add_argument(
        "--access-token",
        default=os.environ.get("AUTHLETE_ACCESS_TOKEN", "emulator-access-token"),
        help="the service access token callers must present as Bearer; the gateway's "
        "authlete.access_token (env AUTHLETE_ACCESS_TOKEN, default emulator-access-token)",
    )
    emu.add_argument(
        "--tokens",
        metavar="FILE",
        help="YAML file of access tokens to know from the start (the format of the bundled "
        "gateway/data/demo-tokens.yaml); more can be added through the control API",
    )
    emu.add_argument(
        "--latency",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="seconds added to every introspection call (default 0)",
    )
    emu.add_argument(
        "--rate",
        type=float,
        metavar="PER_SECOND",
        help="rate limit on introspection calls, a token bucket of this many calls per second; "
        "over it callers get 429 with X-RateLimit-* headers (off by default)",
    )
    emu.add_argument(
        "--burst",
        type=int,
        default=200,
        help="the rate limit's bucket size, calls allowed at once (with --rate; default 200)",
    )
    emu.add_argument(
        "--reset-form",
        choices=("delta", "epoch"),
        default="delta",
        help="how X-RateLimit-Reset is written: seconds until the reset (delta) or the reset "
        "time in epoch seconds (epoch) (default %(default)s)",
    )
    emu.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --listen address other than loopback (the control API has no authentication)",
    )
    _loop_option(emu)
    emu.set_defaults(handler=_cmd_emulator)
    return parser


_EMULATOR_EPILOG = """\
control API (JSON bodies; BASE is http://127.0.0.1:18400):
  POST BASE/_emulator/tokens         add or replace a token: {"token": "t1", "subject": "alice",
                                     "client_id": 1001, "scopes": ["read"], "lifetime": 3600}
  POST BASE/_emulator/tokens/bulk    add count tokens named prefix0.. : {"prefix": "bench-",
                                     "count": 100000, "scopes": ["read"]}
  POST BASE/_emulator/revoke         forget a token: {"token": "t1"}
  GET  BASE/_emulator/stats          call counters (?token=t1 adds that token's calls)
  POST BASE/_emulator/reset          zero the counters
  POST BASE/_emulator/config         change latency, rate_limit, reset_form, known_scopes
  POST BASE/_emulator/override       answer the next calls differently: {"status": 500,
                                     "count": 3}; an empty body or null clears it
The README's "Authlete emulator" section has every field and curl examples.
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        default=os.environ.get("GATEWAY_CONFIG"),
        help="config file (env GATEWAY_CONFIG)",
    )


def _loop_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop (default: uvloop when installed)",
    )


def _load(path: str | None) -> Config | None:
    if not path:
        print("config: no config file given (use --config PATH or GATEWAY_CONFIG)", file=sys.stderr)
        return None
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def _cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return EXIT_CONFIG
    from gateway.lint import warnings

    print(f"{args.config}: OK")
    for line in summary(cfg):
        print(line)
    for line in warnings(cfg):
        print(f"warning: {line}", file=sys.stderr)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return EXIT_CONFIG
    from gateway.runner import serve

    _setup_logging(cfg.log.level, cfg.log.format)
    from gateway.lint import warnings

    for line in warnings(cfg):
        # Once per start, in the supervisor only: the same lines check-config prints.
        logging.getLogger("gateway").warning("config: %s", line)
    path = str(args.config)
    if args.workers == 1:
        return run_loop(
            serve(
                cfg,
                path,
                reuse_port=args.reuse_port,
                admin_socket=args.admin_socket,
                budget_share=args.budget_share,
            ),
            args.loop,
        )
    from gateway.workers import supervise

    limit = share_budget(cfg, args.workers).authlete.rate_limit
    logging.getLogger("gateway").info(
        "--workers %d share one Authlete access token: each gets authlete.rate_limit "
        "rate %g/s, burst %d",
        args.workers,
        limit.rate,
        limit.burst,
    )

    return supervise(cfg, path, args.workers, args.loop)


def _cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    if args.config:
        path = Path(args.config)
    else:
        path = Path(str(resources.files("gateway") / "data" / "demo.yaml"))
    cfg = _load(str(path))
    if cfg is None:
        return EXIT_CONFIG
    tokens = args.tokens or str(resources.files("gateway") / "data" / "demo-tokens.yaml")
    _setup_logging(cfg.log.level, cfg.log.format)
    return run_loop(run_demo(cfg, tokens), args.loop)


def _cmd_emulator(args: argparse.Namespace) -> int:
    from gateway.demo import run_emulator

    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        print("--listen: must be host:port", file=sys.stderr)
        return EXIT_CONFIG
    host = host.strip("[]")
    if not _loopback(host):
        if not args.allow_remote:
            print(
                f"--listen: {host} is not a loopback address; the emulator's control API "
                "(/_emulator/) has no authentication (pass --allow-remote to bind it anyway)",
                file=sys.stderr,
            )
            return EXIT_CONFIG
        print(
            f"warning: listening on {host}: anyone who can reach port {port} can add and "
            "revoke tokens through the control API (/_emulator/), which has no authentication",
            file=sys.stderr,
        )
    rate = (args.rate, args.burst) if args.rate else None
    _setup_logging()
    return run_loop(
        run_emulator(
            host,
            int(port),
            service_id=args.service_id,
            access_token=args.access_token,
            tokens=args.tokens,
            latency=args.latency,
            rate_limit=rate,
            reset_form=args.reset_form,
        ),
        args.loop,
    )


def run_loop(main: Coroutine[Any, Any, int | None], loop: str) -> int:
    factory = None
    if loop in ("auto", "uvloop"):
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            if loop == "uvloop":
                print("--loop uvloop: uvloop is not installed", file=sys.stderr)
                main.close()
                return EXIT_CONFIG
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            result = runner.run(main)
    except KeyboardInterrupt:
        return 0
    except SystemExit as exc:
        if isinstance(exc.code, str):
            from gateway.logs import logs_json

            if logs_json():  # `log.format: json`: this line too is one the pipeline reads
                logging.getLogger("gateway").error("%s", exc.code)
            else:
                print(exc.code, file=sys.stderr)
            return 1
        raise
    return result or 0


def _loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (also IPv4-mapped) or the name localhost; no name is resolved."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _setup_logging(level: str = "info", fmt: str = "text") -> None:
    from gateway.logs import setup_logging

    setup_logging(level, fmt=fmt)
