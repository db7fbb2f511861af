"""The client side of SRv6Pipes: ask the controller, then connect through the chain.

For programs that can change one line: ::

    from srv6pipes import client
    sock = client.connect(("www.campus.lab", 80), functions=["encrypt", "decrypt"])

resolves ``encrypt.decrypt._pipes.www.campus.lab`` at the controller (DNS, TXT), puts the
answer's SRH ``[BSID, server]`` on the socket with IPV6_RTHDR (an unprivileged option:
no root, no route) and connects to the server. The access router expands the BSID into
the proxies' function addresses. The MSS is lowered by the bytes the access router's SRH
adds (``overhead`` in the answer): the kernel only accounts for the socket's own SRH, and
TCP ignores Packet Too Big messages about SRH packets on this kernel.

Answers are cached until their DNS TTL runs out (:func:`resolve` again refreshes the
binding at the controller). The controller is ``controller=("addr", port)``, else
$SRV6PIPES_CONTROLLER (``[addr]:port``), else the first nameserver of /etc/resolv.conf.
Errors: :class:`ResolveError` carries the controller's rcode and reason (REFUSED by
policy, NXDOMAIN for an unknown function or name, SERVFAIL for no healthy proxy).
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import threading
import time
from typing import Optional, Sequence

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rdatatype

from .controller import dnsquery
from .system import IPV6_RTHDR
from .controller.dnsquery import Answer, AnswerError

__all__ = ["Resolution", "ResolveError", "connect", "controller_address", "resolve"]

IPV6_HEADER = 40
TCP_HEADER = 20
DEFAULT_PATH_MTU = 1500
DEFAULT_TIMEOUT = 2.0


class ResolveError(Exception):
    """The controller refused or could not be asked. ``rcode`` is the DNS rcode (None
    when there was no usable answer)."""

    def __init__(self, message: str, rcode: Optional[int] = None):
        super().__init__(message)
        self.rcode = rcode


@dataclasses.dataclass(frozen=True)
class Resolution:
    """A controller's answer: where to connect and which SRH to send."""

    answer: Answer
    ttl: int
    expires_at: float  # time.monotonic() after which it must be asked again

    @property
    def server(self) -> ipaddress.IPv6Address:
        return self.answer.server

    @property
    def bsid(self) -> ipaddress.IPv6Address:
        return self.answer.bsid

    def srh_bytes(self) -> bytes:
        return self.answer.srh().to_bytes()

    def mss(self, path_mtu: int = DEFAULT_PATH_MTU) -> int:
        """The MSS that fits the path once both SRHs are on the packet."""
        return path_mtu - IPV6_HEADER - TCP_HEADER - len(self.srh_bytes()) - self.answer.overhead


def parse_endpoint(text: str, what: str = "controller") -> tuple[str, int]:
    """``[address]:port`` -> (address, port); raises ResolveError naming ``what``."""
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})", text.strip())
    if not match or not 1 <= int(match.group(2)) <= 65535:
        raise ResolveError(f"{what} {text!r}: expected [IPv6 address]:port")
    return match.group(1), int(match.group(2))


def controller_address(controller: Optional[tuple[str, int]] = None) -> tuple[str, int]:
    """Where to send queries (see the module docstring). Raises ResolveError."""
    if controller is not None:
        return controller
    configured = os.environ.get("SRV6PIPES_CONTROLLER")
    if configured:
        return parse_endpoint(configured, "SRV6PIPES_CONTROLLER")
    try:
        with open("/etc/resolv.conf") as handle:
            for line in handle:
                words = line.split()
                if len(words) >= 2 and words[0] == "nameserver":
                    return words[1], 53
    except OSError:
        pass
    raise ResolveError("no controller: pass controller=, set SRV6PIPES_CONTROLLER or "
                       "/etc/resolv.conf")


_cache: dict[tuple, Resolution] = {}
_cache_lock = threading.Lock()


def resolve(name: str, functions: Sequence[str], controller: Optional[tuple[str, int]] = None,
            timeout: float = DEFAULT_TIMEOUT, use_cache: bool = True) -> Resolution:
    """Asks the controller for ``name`` through ``functions`` (TXT query over UDP, TCP if
    truncated). Raises ResolveError (also for an invalid function name)."""
    where = controller_address(controller)
    key = (where, name.rstrip(".").lower(), tuple(functions))
    now = time.monotonic()
    if use_cache:
        with _cache_lock:
            cached = _cache.get(key)
        if cached is not None and cached.expires_at > now:
            return cached
    try:
        query = dnsquery.make_query(name, list(functions), dns.rdatatype.TXT)
    except ValueError as exc:
        raise ResolveError(str(exc)) from None
    try:
        response = dns.query.udp(query, where[0], port=where[1], timeout=timeout)
        if response.flags & dns.flags.TC:
            response = dns.query.tcp(query, where[0], port=where[1], timeout=timeout)
    except (dns.exception.DNSException, OSError) as exc:
        raise ResolveError(f"controller [{where[0]}]:{where[1]} did not answer: "
                           f"{exc or exc.__class__.__name__}") from None
    try:
        answer, ttl = dnsquery.parse_answer(response)
    except AnswerError as exc:
        raise ResolveError(f"{'.'.join(functions)}._pipes.{name}: {exc.reason}", exc.rcode) from None
    resolution = Resolution(answer, ttl, now + ttl)
    with _cache_lock:
        _cache[key] = resolution
    return resolution


def connect(address: tuple[str, int], functions: Sequence[str],
            controller: Optional[tuple[str, int]] = None, timeout: Optional[float] = None,
            path_mtu: int = DEFAULT_PATH_MTU, source_address=None) -> socket.socket:
    """A TCP socket connected to ``address`` = (name, port) through ``functions``.

    Like socket.create_connection: ``timeout`` applies to the connect and stays on the
    socket; ``source_address`` is bound first. Raises ResolveError, or OSError from the
    connection itself.
    """
    name, port = address
    resolution = resolve(name, functions, controller)
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RTHDR, resolution.srh_bytes())
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, resolution.mss(path_mtu))
        if timeout is not None:
            sock.settimeout(timeout)
        if source_address is not None:
            sock.bind(source_address)
        sock.connect((str(resolution.server), port))
    except BaseException:
        sock.close()
        raise
    return sock


def main(argv=None) -> int:
    """``python -m srv6pipes.client NAME FUNCTION[,FUNCTION...]``: print the answer."""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(prog="python -m srv6pipes.client",
                                     description="Ask the SRv6Pipes controller for a binding.")
    parser.add_argument("name")
    parser.add_argument("functions", help="comma-separated, in travel order")
    parser.add_argument("--controller", metavar="[ADDR]:PORT")
    args = parser.parse_args(argv)
    try:
        controller = parse_endpoint(args.controller) if args.controller else None
        result = resolve(args.name, args.functions.split(","), controller)
    except ResolveError as exc:
        print(f"srv6pipes.client: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"server": str(result.server), "bsid": str(result.bsid),
                      "chain": list(result.answer.chain), "ttl": result.ttl,
                      "overhead": result.answer.overhead, "mss": result.mss()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
