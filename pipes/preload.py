"""``pipes-run``: run an unmodified program through SRv6Pipes functions, without root.

::

    pipes-run --via encrypt,decrypt -- curl http://www.campus.lab/
    pipes-run --via compress,decompress --to www.campus.lab -- wget -O- www.campus.lab/x

asks the controller for every server name (``--to``, by default the host of every URL on
the command line) through the chain, writes the answers to a private file and runs the
program with ``srv6pipes_preload.so`` in LD_PRELOAD (cext/preload/srv6pipes_preload.c).
In the program, a lookup of a listed name answers the controller's address for it, and a
TCP connect() to that address first puts the binding's SRH on the socket (IPV6_RTHDR,
an unprivileged option) and lowers the MSS by the access router's SRH. Steering goes by
address: every TCP connection to an answered address goes through the chain, whether the
program looked the name up or was given the address; other connections are untouched. A connection meant
for the chain that cannot get its SRH fails instead of leaving without it.

While the program runs, pipes-run asks again before half of the answer's TTL has passed
(the binding's lifetime at the access router is tied to it) and replaces the file; the
library picks the new answer up at the next lookup or connect. pipes-run exits with the
program's exit status (128 + N if a signal N ended it); SIGINT, SIGTERM and SIGHUP are
passed on to the program. Statically linked programs and programs with their own
resolver and raw system calls (Go binaries) are not steered: use ``pipesctl route``.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

from . import __version__, client

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "srv6pipes_preload.so")
URL_HOST = re.compile(r"^[a-z][a-z0-9+.-]*://(?:[^@/]*@)?([^/:?#\[\]]+)", re.IGNORECASE)
MIN_REFRESH = 1.0  # seconds between two questions to the controller, whatever the TTL


def hosts_in(command: Sequence[str]) -> list[str]:
    """The host names of the URLs among `command`'s arguments (not IP literals), in order."""
    names: list[str] = []
    for arg in command:
        match = URL_HOST.match(arg)
        if match and match[1] not in names and not _is_address(match[1]):
            names.append(match[1])
    return names


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def routes_text(answers: dict[str, client.Resolution], path_mtu: int) -> str:
    """The file the library reads: ``NAME ADDRESS SRH_HEX MSS`` per name."""
    return "".join(f"{name} {res.server} {res.srh_bytes().hex()} {res.mss(path_mtu)}\n"
                   for name, res in answers.items())


def resolve_all(names: Sequence[str], functions: Sequence[str],
                controller: Optional[tuple[str, int]]) -> dict[str, client.Resolution]:
    return {name: client.resolve(name, functions, controller, use_cache=False)
            for name in names}


def write_routes(path: str, text: str) -> None:
    """Replaces `path` at once (rename), so the library never reads half a file."""
    tmp = f"{path}.new"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pipes-run",
        description="Run a program with its TCP connections steered through SRv6Pipes "
                    "functions (LD_PRELOAD; no root, no route).",
        epilog="Example: pipes-run --via encrypt,decrypt -- curl http://www.campus.lab/")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--via", required=True, metavar="F1[,F2...]",
                        help="the functions, comma-separated, in travel order")
    parser.add_argument("--to", action="append", default=[], metavar="NAME",
                        help="a server name to steer (repeatable; default: the host of every "
                             "URL in the command)")
    parser.add_argument("--controller", metavar="[ADDR]:PORT",
                        help="default: $SRV6PIPES_CONTROLLER, else the first nameserver")
    parser.add_argument("--path-mtu", type=int, default=client.DEFAULT_PATH_MTU,
                        help="the client's path MTU, for the MSS (default %(default)s)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="-- PROGRAM [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the program to run after --")
    names = args.to or hosts_in(command)
    if not names:
        parser.error("no server name: give --to NAME (the command has no URL with a host name)")
    if not os.path.exists(LIBRARY):
        print(f"pipes-run: {LIBRARY} is missing: reinstall srv6pipes", file=sys.stderr)
        return 2
    functions = [f for f in args.via.split(",") if f]
    try:
        controller = client.parse_endpoint(args.controller) if args.controller else None
        answers = resolve_all(names, functions, controller)
    except (client.ResolveError, ValueError) as exc:
        print(f"pipes-run: {exc}", file=sys.stderr)
        return 2
    private = tempfile.mkdtemp(prefix="pipes-run-")      # mode 0700: ours alone
    routes = os.path.join(private, "routes")
    try:
        write_routes(routes, routes_text(answers, args.path_mtu))
        env = dict(os.environ, SRV6PIPES_ROUTES=routes,
                   LD_PRELOAD=" ".join(filter(None, [LIBRARY, os.environ.get("LD_PRELOAD")])))
        try:
            child = subprocess.Popen(command, env=env)
        except OSError as exc:
            print(f"pipes-run: {command[0]}: {exc.strerror}", file=sys.stderr)
            return 127
        return _supervise(child, routes, names, functions, controller, answers, args.path_mtu)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _supervise(child, routes, names, functions, controller, answers, path_mtu) -> int:
    """Passes signals on, refreshes the answers before they expire, returns the exit code."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda num, _frame: child.send_signal(num))
    refresh_at = time.monotonic() + max(MIN_REFRESH, min(a.ttl for a in answers.values()) / 2)
    while True:
        try:
            code = child.wait(timeout=max(0.0, refresh_at - time.monotonic()))
            break
        except subprocess.TimeoutExpired:
            pass
        try:
            answers = resolve_all(names, functions, controller)
            write_routes(routes, routes_text(answers, path_mtu))
            wait = max(MIN_REFRESH, min(a.ttl for a in answers.values()) / 2)
        except client.ResolveError as exc:
            # Keep the last answer: the binding may still be live; try again soon.
            print(f"pipes-run: refresh failed: {exc}", file=sys.stderr)
            wait = MIN_REFRESH
        refresh_at = time.monotonic() + wait
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    raise SystemExit(main())
