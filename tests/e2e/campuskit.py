"""Helpers for the control-plane end-to-end tests on the ``campus`` testbed:

    c1 (staff) - a1 -+          +- p1, p2 (off-path)
    c2 (students) - a2 -+- r ---+- ctl
                                +- p3 - s

pipesd runs on p1, p2 (on-path return: they are always a chain's first proxy) and p3
(``--return-mode reverse``: its replies go back through p1 or p2), all with the access
routers' HMAC keys and ``--require-hmac``. An echo server on s reports the peer it saw.
Sockets are created inside a host's namespace and carry the SRH given (IPV6_RTHDR)."""
from __future__ import annotations

import ipaddress
import os
import socket

from srv6pipes.addressplan import AddressPlan
from srv6pipes.lab.apps import Pipesd
from srv6pipes.srh import SRH
from srv6pipes.system import IPV6_RTHDR

from tests.e2e.e2ekit import ECHO_PORT, FUNCTIONS, PEER_HEADER, EchoServer

# Access routers' SRH HMAC keys: a1 signs with 101, a2 with 102 (KEYID SECRET lines).
HMAC_KEYS = {"a1": (101, b"staff-router-secret"), "a2": (102, b"students-router-secret")}
HMAC_KEYRING = "".join(f"{key_id} {secret.decode()}\n" for key_id, secret in HMAC_KEYS.values())
BLOCKS = {"a1": ipaddress.IPv6Network("fd00:a1::b:0/112"),
          "a2": ipaddress.IPv6Network("fd00:a2::b:0/112")}
CLIENT_PREFIXES = {"a1": ipaddress.IPv6Network("fd00:c1::/64"),
                   "a2": ipaddress.IPv6Network("fd00:c2::/64")}
CLIENT_OF = {"a1": "c1", "a2": "c2"}
CLIENT_MSS = 1200


def write_secret(path, text: str) -> str:
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
        handle.write(text)
    return str(path)


class Campus:
    """The campus testbed with pipesd on the three proxies and an echo server on s."""

    def __init__(self, tb, workdir, name: str, proxies=("p1", "p2", "p3"), extra=()):
        self.tb = tb
        self.keyring = write_secret(os.path.join(workdir, "hmac-keys"), HMAC_KEYRING)
        self.server = EchoServer(tb.hosts["s"])
        self.proxies: dict[str, Pipesd] = {}
        try:
            for proxy in proxies:
                self.start_proxy(proxy, f"{name}{proxy}", extra)
        except BaseException:
            self.close()
            raise

    def start_proxy(self, proxy: str, instance: str, extra=()) -> Pipesd:
        args = ["--hmac-keyring", self.keyring, "--require-hmac", *extra]
        if proxy == "p3":
            args += ["--return-mode", "reverse"]
        self.proxies[proxy] = Pipesd(self.tb.hosts[proxy], self.tb.locator(proxy), instance,
                                     extra=tuple(args))
        return self.proxies[proxy]

    def address(self, proxy: str, function: str, params: int = 0) -> ipaddress.IPv6Address:
        return AddressPlan(self.tb.locator(proxy)).encode(FUNCTIONS[function], params)

    def socket(self, host: str, srh: SRH | None) -> socket.socket:
        with self.tb.hosts[host].enter():
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        if srh is not None:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RTHDR, srh.to_bytes())
            # The kernel shrinks the MSS by our own SRH, not by the one the access router
            # inserts (and TCP ignores Packet Too Big for SRH packets): leave room.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, CLIENT_MSS)
        return sock

    def echo(self, host: str, srh: SRH | None, payload: bytes = b"hello through the pipes",
             timeout: float = 10.0) -> tuple[str, bytes]:
        """Connects from ``host`` to the echo server with ``srh``; returns (the peer the
        server saw, the bytes echoed)."""
        sock = self.socket(host, srh)
        sock.settimeout(timeout)
        try:
            sock.connect((str(self.tb.hosts["s"].addr), ECHO_PORT))
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            received = bytearray()
            while chunk := sock.recv(65536):
                received += chunk
        finally:
            sock.close()
        peer = bytes(received[:PEER_HEADER]).decode().split()[0]
        return peer, bytes(received[PEER_HEADER:])

    def table_counters(self, proxy: str) -> dict:
        return self.proxies[proxy].stats()["srh_table"]

    def close(self) -> None:
        self.server.close()
        for proxy in self.proxies.values():
            proxy.stop()
        self.proxies.clear()
