"""``pipesctl route``: the seg6 route that steers an unmodified program's connections.

Two ways to name the path:

* static: ``pipesctl route S --via LOCATOR:FUNCTION[:PARAMS] ... --dev DEV`` where each
  ``--via`` is a proxy's locator (``fc00:1::/80``), a function (name or id) and its
  parameters, or a function address as it is (``fc00:1::1:0:2a``);
* through the controller: ``pipesctl route NAME --chain f1,f2 --controller [ADDR]:PORT
  --dev DEV`` asks the controller (the DNS convention of controller/dnsquery.py) and
  steers the server's address through the binding segment it answers.

It prints (default) or installs (``--apply``, pyroute2; ``--delete`` removes it)::

    ip -6 route replace S/128 encap seg6 mode inline segs SEG1,SEG2 dev DEV mtu lock M

Why ``mtu lock M``: the kernel takes the route's own SRH off the MTU for TCP's MSS, but
not an SRH an access router inserts on the way (the controller's answer says how many
bytes: ``overhead``), and TCP on this kernel ignores Packet Too Big messages about SRH
packets, so path MTU discovery cannot repair it later. M is the link MTU (or
``--path-mtu``) minus that overhead, locked so nothing raises it. The route's ``via`` is
not needed: after inserting the SRH the kernel routes the packet again toward its first
segment.
"""
from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import re
import socket
import sys
from typing import Optional

from .addressplan import AddressError, AddressPlan

__all__ = ["RouteError", "SteeringRoute", "add_arguments", "parse_via", "run"]

VIA_RE = re.compile(r"^(?P<locator>[0-9a-fA-F:.]+/\d{1,3}):(?P<function>[A-Za-z0-9_-]+)"
                    r"(?::(?P<params>0[xX][0-9a-fA-F]+|\d+))?$")


class RouteError(ValueError):
    """Bad input or a failed kernel change; the message names the argument."""


@dataclasses.dataclass(frozen=True)
class SteeringRoute:
    destination: ipaddress.IPv6Address
    segments: tuple[ipaddress.IPv6Address, ...]   # travel order, before the destination
    dev: str
    mtu: int
    src: Optional[ipaddress.IPv6Address] = None   # the source address to keep using

    def command(self) -> str:
        segs = ",".join(str(s) for s in self.segments)
        src = f" src {self.src}" if self.src is not None else ""
        return (f"ip -6 route replace {self.destination}/128 encap seg6 mode inline segs "
                f"{segs} dev {self.dev}{src} mtu lock {self.mtu}")

    def to_json(self) -> dict:
        return {"destination": str(self.destination), "segments": [str(s) for s in self.segments],
                "dev": self.dev, "mtu": self.mtu, "src": self.src and str(self.src),
                "command": self.command()}


def current_source(destination: ipaddress.IPv6Address) -> Optional[ipaddress.IPv6Address]:
    """The source address the host uses toward ``destination`` now (``ip route get``),
    kept on the steering route: an access router only lets the client's own prefix
    through, and a route without ``src`` could pick another of the host's addresses."""
    from pyroute2 import IPRoute

    try:
        with IPRoute() as ipr:
            found = ipr.route("get", dst=str(destination), family=socket.AF_INET6)[0]
    except Exception:  # noqa: BLE001 - no route: let the kernel choose later
        return None
    src = found.get_attr("RTA_PREFSRC")
    return ipaddress.IPv6Address(src) if src else None


def parse_via(text: str, function_bits: int = 16, param_bits: int = 32) -> ipaddress.IPv6Address:
    """``LOCATOR:FUNCTION[:PARAMS]`` or a function address -> the function address."""
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        pass
    match = VIA_RE.match(text)
    if not match:
        raise RouteError(f"--via {text!r}: expected LOCATOR:FUNCTION[:PARAMS] (e.g. "
                         "fc00:1::/80:xor:42) or a function address")
    from .functions import FunctionRegistry, UnknownFunction

    function = match.group("function")
    try:
        function_id = FunctionRegistry().resolve(function).function_id
    except UnknownFunction:
        if not function.isdigit():
            raise RouteError(f"--via {text!r}: {function!r} is no built-in function; give a "
                             "loaded module's function by its id") from None
        function_id = int(function)
    params = int(match.group("params"), 0) if match.group("params") else 0
    try:
        return AddressPlan(match.group("locator"), function_bits, param_bits).encode(
            function_id, params)
    except AddressError as exc:
        raise RouteError(f"--via {text!r}: {exc}") from None


def link_mtu(dev: str) -> int:
    """The MTU of ``dev`` in the current network namespace. Raises RouteError."""
    try:
        with open(f"/sys/class/net/{dev}/mtu") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        raise RouteError(f"--dev {dev!r}: no such interface here") from None


def _ifindex(dev: str) -> int:
    try:
        return socket.if_nametoindex(dev)
    except OSError:
        raise RouteError(f"--dev {dev!r}: no such interface here") from None


def apply(route: SteeringRoute) -> None:
    """Installs (replaces) the route through pyroute2."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        try:
            extra = {"prefsrc": str(route.src)} if route.src is not None else {}
            ipr.route("replace", dst=f"{route.destination}/128", family=socket.AF_INET6,
                      oif=_ifindex(route.dev), **extra,
                      # pyroute2 takes inline segments in wire order (last hop first).
                      encap={"type": "seg6", "mode": "inline",
                             "segs": [str(s) for s in reversed(route.segments)]},
                      # lock = 1 << RTAX_MTU: path MTU discovery may not raise it
                      metrics={"mtu": route.mtu, "lock": 1 << 2})
        except Exception as exc:  # noqa: BLE001 - NetlinkError
            raise RouteError(f"installing the route failed: {exc}") from None


def delete(destination: ipaddress.IPv6Address) -> bool:
    """Removes the steering route of ``destination``; False when there was none."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        try:
            ipr.route("del", dst=f"{destination}/128", family=socket.AF_INET6)
        except Exception as exc:  # noqa: BLE001
            if getattr(exc, "code", None) in (2, 3):  # ENOENT, ESRCH
                return False
            raise RouteError(f"removing the route failed: {exc}") from None
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``pipesctl route`` flags (cli.py adds the subparser)."""
    parser.add_argument("target", metavar="S|NAME",
                        help="the server's address (static) or name (with --chain)")
    parser.add_argument("--via", action="append", default=[], metavar="LOCATOR:FUNCTION[:PARAMS]",
                        help="a proxy's function, in travel order (repeat)")
    parser.add_argument("--chain", metavar="F1,F2", help="ask the controller for this chain")
    parser.add_argument("--controller", metavar="[ADDR]:PORT",
                        help="the controller (default $SRV6PIPES_CONTROLLER, resolv.conf)")
    parser.add_argument("--dev", required=True, help="the interface toward the network")
    parser.add_argument("--src", metavar="ADDR",
                        help="source address of the steered packets (default: the one the "
                             "host uses toward the server now)")
    parser.add_argument("--path-mtu", type=int, metavar="BYTES",
                        help="the path MTU (default: the MTU of --dev)")
    parser.add_argument("--function-bits", type=int, default=16)
    parser.add_argument("--param-bits", type=int, default=32)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--apply", action="store_true", help="install it (pyroute2, root)")
    action.add_argument("--delete", action="store_true", help="remove it")
    parser.add_argument("-j", "--json", dest="route_json", action="store_true",
                        help="print JSON (as pipesctl -j)")


def build(args) -> tuple[SteeringRoute, Optional[dict]]:
    """The route the arguments describe, and the controller's answer (if asked)."""
    if bool(args.via) == bool(args.chain):
        raise RouteError("give either --via (static path) or --chain (ask the controller)")
    path_mtu = args.path_mtu if args.path_mtu is not None else link_mtu(args.dev)
    if not 1280 <= path_mtu <= 65535:
        raise RouteError(f"--path-mtu {path_mtu}: IPv6 needs 1280..65535")
    if args.via:
        try:
            destination = ipaddress.IPv6Address(args.target)
        except ValueError:
            raise RouteError(f"S {args.target!r}: with --via, give the server's IPv6 "
                             "address") from None
        segments = tuple(parse_via(v, args.function_bits, args.param_bits) for v in args.via)
        return SteeringRoute(destination, segments, args.dev, path_mtu,
                             _source(args, destination)), None
    from .client import ResolveError, parse_endpoint, resolve

    try:
        controller = parse_endpoint(args.controller, "--controller") if args.controller else None
        resolution = resolve(args.target, [f for f in args.chain.split(",") if f], controller,
                             use_cache=False)
    except ResolveError as exc:
        raise RouteError(str(exc)) from None
    mtu = path_mtu - resolution.answer.overhead
    if mtu < 1280:
        raise RouteError(f"path MTU {path_mtu} minus the binding's {resolution.answer.overhead} "
                         "bytes is below IPv6's 1280")
    answer = {"bsid": str(resolution.bsid), "server": str(resolution.server),
              "overhead": resolution.answer.overhead, "ttl": resolution.ttl,
              "lifetime": resolution.answer.lifetime}
    return SteeringRoute(resolution.server, (resolution.bsid,), args.dev, mtu,
                         _source(args, resolution.server)), answer


def _source(args, destination: ipaddress.IPv6Address) -> Optional[ipaddress.IPv6Address]:
    if args.src is None:
        return current_source(destination)
    try:
        return ipaddress.IPv6Address(args.src)
    except ValueError:
        raise RouteError(f"--src {args.src!r}: not an IPv6 address") from None


def run(args) -> int:
    """``pipesctl route``: print, install or remove. Returns the exit code."""
    try:
        route, answer = build(args)
        if args.delete:
            done = delete(route.destination)
        elif args.apply:
            apply(route)
            done = True
    except RouteError as exc:
        print(f"pipesctl route: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**route.to_json(), "controller": answer,
                          "applied": bool(args.apply), "deleted": bool(args.delete) and done},
                         indent=2))
        return 0
    if answer is not None:
        print(f"# controller: binding {answer['bsid']} for {answer['server']} "
              f"({answer['overhead']} bytes added by the access router); it lives "
              f"{answer['lifetime']} s after the last lookup: run this again before then")
    if args.delete:
        print(f"# removed the route to {route.destination}" if done else
              f"# no steering route to {route.destination}")
    else:
        print(route.command() if not args.apply else f"# installed: {route.command()}")
    return 0
