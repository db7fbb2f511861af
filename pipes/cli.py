"""Command-line entry points: `pipesd` (the daemon) and `pipesctl` (talks to it)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import __version__, logsetup, system
from .config import ConfigError, add_arguments, build_config


def pipesd_parser() -> argparse.ArgumentParser:
    """pipesd's command line (docs/cli.md is generated from it: tests/unit/test_config.py)."""
    parser = argparse.ArgumentParser(
        prog="pipesd",
        description="Transparent SR-aware TCP proxy: intercepts TCP connections whose SRH "
                    "names a function address inside --locator, runs the function over the "
                    "bytestream and re-originates the connection to the next segment with "
                    "the client's address. Runs in the foreground in the current network "
                    "namespace; SIGTERM/SIGINT drain and exit, SIGHUP reloads --config.")
    add_arguments(parser)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def pipesd_main(argv: list[str] | None = None) -> int:
    parser = pipesd_parser()
    args = parser.parse_args(argv)
    cli_values = vars(args)
    try:
        config = build_config(cli_values)
    except ConfigError as exc:
        parser.error(str(exc))

    if config.check or config.dry_run:
        return print_plan(config)
    logsetup.setup("pipesd", config.log_level)
    if os.geteuid() != 0:
        print("pipesd: must run as root (it installs routes, rules and nftables)", file=sys.stderr)
        return system.EXIT_USAGE
    from .master import Master

    return Master(config, cli_values).run()


def print_plan(config) -> int:
    """--dry-run: the files are checked and the kernel plan printed; --check also runs
    every other check of preflight.py and decides the exit status with them."""
    from . import kernelsetup, preflight, returnpath
    from .master import kernel_config

    plan = [f"# kernel configuration for locator {config.locator}"]
    kernel = kernel_config(config)
    plan += kernelsetup.plan(kernel)
    if config.return_mode != "on-path":
        plan.append(f"# return traffic ({config.return_mode}): marks and seg6 route tables")
        plan += returnpath.plan(config.fwmark, kernel.rule_priority)
    checks = preflight.CHECKS if config.check else (preflight.check_files,)
    findings = [f for check in checks for f in preflight.run_one(check, config)]
    text, code = preflight.report(config, findings, plan)
    print(text)
    return code


def pipesctl_parser() -> argparse.ArgumentParser:
    """pipesctl's command line (docs/cli.md is generated from it)."""
    from . import healthserver, routehelper

    parser = argparse.ArgumentParser(prog="pipesctl", description="Talk to a running pipesd, "
                                     "and the client and module helpers that go with it.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--name", default="pipesd", metavar="NAME",
                        help="instance name, as given to pipesd --name [default: %(default)s]")
    parser.add_argument("--control", default=None, metavar="PATH",
                        help="control socket path [default: from --name, "
                             f"{system.control_socket('NAME')}]")
    parser.add_argument("-j", "--json", action="store_true",
                        help="print the daemon's replies as JSON (default: tables)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("stats", help="counters: connections, flows and bytes per function, SRH "
                                 "table, workers, the functions' own statistics")
    sub.add_parser("functions", help="functions: id, name, module, workers, active flows")
    sub.add_parser("metrics", help="the counters in Prometheus text format")
    serve = sub.add_parser("serve-metrics", help="serve the Prometheus text over HTTP "
                                                 "(GET /metrics) for Prometheus to scrape")
    serve.add_argument("--listen", required=True, metavar="[ADDR]:PORT",
                       help="where to listen, e.g. [::1]:9469")
    load = sub.add_parser("load", help="load a VF module (.so or .py) into every worker")
    load.add_argument("path", metavar="PATH")
    unload = sub.add_parser("unload", help="unload a module: no new flows, existing ones "
                                           "drain, then it is let go")
    unload.add_argument("module", metavar="NAME")
    sub.add_parser("ping", help="is the daemon alive?")
    sub.add_parser("reload", help="re-read the configuration, as SIGHUP does; says why if "
                                  "it is refused")
    address = sub.add_parser("address", help="print the function address for LOCATOR")
    address.add_argument("locator", metavar="LOCATOR")
    address.add_argument("function", metavar="FUNCTION", help="function name or id")
    address.add_argument("params", metavar="PARAMS", nargs="?", default="0",
                         help="parameter bits (decimal or 0x hex) [default: 0]")
    address.add_argument("--function-bits", type=int, default=16)
    address.add_argument("--param-bits", type=int, default=32)
    sub.add_parser("module-cflags", help="compiler flags for a C VF module (-I of "
                                         "srv6pipes_vf.h, -fPIC -shared)")
    # Client and proxy-side helpers that do not talk to the daemon (routehelper.py,
    # healthserver.py).
    route = sub.add_parser("route", help="print or install the seg6 route steering a server "
                                         "through proxies (static or via the controller)")
    routehelper.add_arguments(route)
    health = sub.add_parser("serve-health", help="serve this pipesd's health over HTTP for "
                                                 "the controller's probes")
    healthserver.add_arguments(health)
    return parser


def pipesctl_main(argv: list[str] | None = None) -> int:
    parser = pipesctl_parser()
    args = parser.parse_args(argv)
    if args.command == "address":
        return print_address(args)
    if args.command == "module-cflags":
        return print_module_cflags()
    if args.command == "route":
        args.json = args.json or args.route_json
        from . import routehelper

        return routehelper.run(args)
    if args.command == "serve-health":
        from . import healthserver

        return healthserver.run(args)
    if args.command == "serve-metrics":
        return serve_metrics(args)
    from . import ctlformat
    from .control import ControlError, request

    fields = {}
    if args.command == "load":
        fields["path"] = os.path.abspath(args.path)
    elif args.command == "unload":
        fields["module"] = args.module
    command = "stats" if args.command == "metrics" else args.command
    try:
        reply = request(args.control or system.control_socket(args.name), command,
                        timeout=30.0, **fields)
    except ControlError as exc:
        print(f"pipesctl: {exc}", file=sys.stderr)
        return 1
    reply.pop("ok", None)
    payload = reply.get(command, reply)
    if args.command == "metrics":
        from . import metrics

        sys.stdout.write(metrics.exposition(payload).decode())
    elif args.json:
        print(json.dumps(payload, indent=2, sort_keys=True))
    else:
        print(ctlformat.format_reply(command, payload))
    return 0


def serve_metrics(args) -> int:
    """`pipesctl serve-metrics`: each GET asks the daemon's control socket for `stats`
    (shared-memory counters: a scrape costs the workers nothing)."""
    from . import metrics
    from .client import ResolveError, parse_endpoint

    try:
        host, port = parse_endpoint(args.listen, "--listen")
        server = metrics.make_server(host, port, args.control or system.control_socket(args.name))
    except ResolveError as exc:
        print(f"pipesctl serve-metrics: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"pipesctl serve-metrics: --listen {args.listen}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def print_module_cflags() -> int:
    from .vfapi import include_dir

    try:
        print(f"-I{include_dir()} -O2 -fPIC -shared")
    except FileNotFoundError as exc:
        print(f"pipesctl: {exc}", file=sys.stderr)
        return 1
    return 0


def print_address(args) -> int:
    from .addressplan import AddressError, AddressPlan
    from .functions import FunctionRegistry, UnknownFunction

    registry = FunctionRegistry()
    try:
        plan = AddressPlan(args.locator, args.function_bits, args.param_bits)
        try:
            function_id = registry.resolve(args.function).function_id
        except UnknownFunction:
            # Not a built-in: a number is still fine (a loaded module's function id).
            try:
                function_id = int(args.function, 0)
            except ValueError:
                known = ", ".join(f.name for f in registry)
                raise UnknownFunction(f"no built-in function named {args.function!r} (built-in: "
                                      f"{known}; give a loaded module's function by its id, "
                                      "see pipesctl functions)") from None
        try:
            params = int(args.params, 0)
        except ValueError:
            raise AddressError(f"PARAMS {args.params!r}: not a number (decimal, or hex "
                               "with 0x)") from None
        print(plan.encode(function_id, params))
    except (AddressError, UnknownFunction, ValueError) as exc:
        print(f"pipesctl: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(pipesd_main())
