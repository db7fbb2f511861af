"""Command-line entry points: `pipesd` (the daemon) and `pipesctl` (talks to it)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from . import system
from .config import ConfigError, add_arguments, build_config


def pipesd_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pipesd",
        description="Transparent SR-aware TCP proxy: intercepts TCP connections whose SRH "
                    "names a function address inside --locator, runs the function over the "
                    "bytestream and re-originates the connection to the next segment with "
                    "the client's address. Runs in the foreground in the current network "
                    "namespace; SIGTERM/SIGINT drain and exit, SIGHUP reloads --config.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    cli_values = vars(args)
    try:
        config = build_config(cli_values)
    except ConfigError as exc:
        parser.error(str(exc))

    from . import kernelsetup
    from .master import Master, kernel_config

    if config.dry_run:
        print(f"# pipesd {config.name}: kernel configuration for locator {config.locator}")
        kernel = kernel_config(config)
        for line in kernelsetup.plan(kernel):
            print(line)
        if config.return_mode != "on-path":
            from . import returnpath

            print(f"# return traffic ({config.return_mode}): marks and seg6 route tables")
            for line in returnpath.plan(config.fwmark, kernel.rule_priority):
                print(line)
        return 0
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s pipesd[%(process)d] %(levelname)s %(message)s")
    if os.geteuid() != 0:
        print("pipesd: must run as root (it installs routes, rules and nftables)", file=sys.stderr)
        return 2
    return Master(config, cli_values).run()


def pipesctl_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipesctl", description="Talk to a running pipesd.")
    parser.add_argument("--name", default="pipesd", metavar="NAME",
                        help="instance name, as given to pipesd --name [default: %(default)s]")
    parser.add_argument("--control", default=None, metavar="PATH",
                        help="control socket path [default: from --name, "
                             f"{system.control_socket('NAME')}]")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("stats", help="counters: connections, bytes per function, SRH table")
    sub.add_parser("functions", help="functions: id, name, module, workers, active flows")
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
    # Client and proxy-side helpers that do not talk to the daemon (routehelper.py,
    # healthserver.py).
    from . import __version__, healthserver, routehelper

    route = sub.add_parser("route", help="print or install the seg6 route steering a server "
                                         "through proxies (static or via the controller)")
    routehelper.add_arguments(route)
    route.add_argument("--version", action="version", version=f"pipesctl route {__version__}")
    health = sub.add_parser("serve-health", help="serve this pipesd's health over HTTP for "
                                                 "the controller's probes")
    healthserver.add_arguments(health)
    health.add_argument("--version", action="version",
                        version=f"pipesctl serve-health {__version__}")
    args = parser.parse_args(argv)

    if args.command == "address":
        return print_address(args)
    if args.command == "route":
        return routehelper.run(args)
    if args.command == "serve-health":
        return healthserver.run(args)
    from .control import ControlError, request

    fields = {}
    if args.command == "load":
        fields["path"] = os.path.abspath(args.path)
    elif args.command == "unload":
        fields["module"] = args.module
    try:
        reply = request(args.control or system.control_socket(args.name), args.command,
                        timeout=30.0, **fields)
    except ControlError as exc:
        print(f"pipesctl: {exc}", file=sys.stderr)
        return 1
    reply.pop("ok", None)
    payload = reply.get(args.command, reply)
    print(json.dumps(payload, indent=2, sort_keys=True))
    return 0


def print_address(args) -> int:
    from .addressplan import AddressError, AddressPlan
    from .functions import FunctionRegistry, UnknownFunction

    try:
        plan = AddressPlan(args.locator, args.function_bits, args.param_bits)
        try:
            function_id = FunctionRegistry().resolve(args.function).function_id
        except UnknownFunction:
            # Not a built-in: a number is still fine (a loaded module's function id).
            try:
                function_id = int(args.function, 0)
            except ValueError:
                raise UnknownFunction(f"no built-in function named {args.function!r} "
                                      "(give a loaded module's function by its id)") from None
        print(plan.encode(function_id, int(args.params, 0)))
    except (AddressError, UnknownFunction, ValueError) as exc:
        print(f"pipesctl: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(pipesd_main())
