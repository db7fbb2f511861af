"""Helpers for pipesd end-to-end tests: a line testbed C - P1 - P2 - S with pipesd on the
proxies, an echo server on S that reports the peer it saw, and a client that talks through
real sockets created inside C's namespace with an SRH (IPV6_RTHDR) naming the functions."""
from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import struct
import threading
import time

from srv6pipes import kernelsetup
from srv6pipes.addressplan import AddressPlan
from srv6pipes.lab.apps import Pipesd, connection_failure
from srv6pipes.srh import SRH
from srv6pipes.system import IPV6_RTHDR

ECHO_PORT = 9000        # echoes, then half-closes after the client's FIN
RESET_PORT = 9001       # reads a little, then resets
CLOSE_PORT = 9002       # sends the peer header and closes first (HTTP with Connection: close)
DOWNLOAD_PORT = 9003    # reads "SIZE\n", sends SIZE bytes of download_block() repeated, closes
DOWNLOAD_BLOCK = 1 << 20
PEER_HEADER = 64        # the server's first bytes: "address port", space padded
FUNCTIONS = {"identity": 0, "xor": 1, "xor-passes": 2, "compress": 3, "decompress": 4,
             "encrypt": 5, "decrypt": 6, "dpi": 7, "count": 8,
             "caesar": 0x100, "uncaesar": 0x101, "chaos-py": 0x7F00, "chaos-c": 0x7F01,
             "faulty": 0x7F02}
KEYRING = "7 " + "ab" * 32 + "\n"      # key id 7, the lab proxies' shared key
DPI_PATTERNS = "# the lab's blocked patterns\nFORBIDDEN-PATTERN\n\\xde\\xad\\xbe\\xef\n"


def xor_bytes(data: bytes, key: int) -> bytes:
    if key == 0 or not data:
        return data
    pattern = bytes([key]) * len(data)
    return (int.from_bytes(data, "big") ^ int.from_bytes(pattern, "big")).to_bytes(len(data), "big")


class EchoServer:
    """Listens on S in its namespace; threads serve connections. Records what it saw."""

    def __init__(self, host):
        self.host = host
        self.peers: list[tuple[str, int]] = []
        self.listeners = []
        self.stop = threading.Event()
        with host.enter():
            for port, serve in ((ECHO_PORT, self.echo), (RESET_PORT, self.reset),
                                (CLOSE_PORT, self.greet_and_close),
                                (DOWNLOAD_PORT, self.download)):
                listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((str(host.addr), port))
                listener.listen(2048)
                listener.settimeout(0.2)
                self.listeners.append(listener)
                threading.Thread(target=self.accept_loop, args=(listener, serve), daemon=True).start()

    def accept_loop(self, listener, serve):
        while not self.stop.is_set():
            try:
                conn, peer = listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            self.peers.append(peer[:2])
            threading.Thread(target=serve, args=(conn, peer), daemon=True).start()

    @staticmethod
    def echo(conn, peer):
        conn.settimeout(60)
        try:
            conn.sendall(f"{peer[0]} {peer[1]}".encode().ljust(PEER_HEADER))
            while True:
                data = conn.recv(262144)
                if not data:
                    break
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            conn.close()

    @staticmethod
    def download(conn, peer):
        conn.settimeout(60)
        try:
            request = b""
            while not request.endswith(b"\n") and len(request) < 32:
                chunk = conn.recv(32)
                if not chunk:
                    return
                request += chunk
            left = int(request)
            block = memoryview(download_block())
            offset = 0
            while left > 0:
                sent = conn.send(block[offset:offset + left])
                left -= sent
                offset = (offset + sent) % len(block)
        except (OSError, ValueError):
            pass
        finally:
            conn.close()

    @staticmethod
    def greet_and_close(conn, peer):
        try:
            conn.sendall(f"{peer[0]} {peer[1]}".encode().ljust(PEER_HEADER))
        except OSError:
            pass
        conn.close()

    @staticmethod
    def reset(conn, peer):
        conn.settimeout(10)
        try:
            conn.recv(16)
        except OSError:
            pass
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    def close(self):
        self.stop.set()
        for listener in self.listeners:
            listener.close()


class Lab:
    def __init__(self, tb, proxies: dict[str, Pipesd], server: EchoServer):
        self.tb = tb
        self.proxies = proxies
        self.server = server
        self.c = tb.hosts["c"]
        self.s = tb.hosts["s"]

    def address(self, proxy: str, function: str | int, params: int = 0):
        function_id = FUNCTIONS.get(function, function)
        return AddressPlan(self.tb.locator(proxy)).encode(function_id, params)

    def client_socket(self, segments, srh: SRH | None = None) -> socket.socket:
        """An unconnected socket in C's namespace whose SYN will carry [segments..., S]
        (or srh), e.g. for connection_outcome()."""
        with self.c.enter():
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        if segments or srh is not None:
            header = srh if srh is not None else SRH.from_path([*segments, self.s.addr])
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RTHDR, header.to_bytes())
        return sock

    def connect(self, segments, port=ECHO_PORT, timeout=20.0, srh: SRH | None = None,
                source_port: int = 0) -> socket.socket:
        """A client socket in C's namespace whose SYN carries SRH [segments..., S]."""
        sock = self.client_socket(segments, srh)
        sock.settimeout(timeout)
        try:
            if source_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((str(self.c.addr), source_port))
            sock.connect((str(self.s.addr), port))
        except BaseException:
            sock.close()
            raise
        return sock

    def echo_roundtrip(self, segments, payload: bytes, key: int = 0, timeout=60.0):
        """Sends payload (while reading), half-closes, reads the echo to EOF.
        Returns (peer the server saw, echoed bytes after the peer header, client address)."""
        sock = self.connect(segments, timeout=timeout)
        received = bytearray()
        errors = []

        def send():
            try:
                view = memoryview(payload)
                for start in range(0, len(view), 1 << 20):
                    sock.sendall(view[start:start + (1 << 20)])
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                errors.append(exc)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            while True:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                received += chunk
        finally:
            local = sock.getsockname()[:2]
            sender.join(timeout)
            sock.close()
        assert not errors, errors
        header = xor_bytes(bytes(received[:PEER_HEADER]), key)
        address, port = header.decode().split()
        return (address, int(port)), bytes(received[PEER_HEADER:]), local


def download_block() -> bytes:
    """What DOWNLOAD_PORT sends, repeated: 1 MiB fixed pseudo-random bytes."""
    global _DOWNLOAD
    if _DOWNLOAD is None:
        _DOWNLOAD = random.Random(1729).randbytes(DOWNLOAD_BLOCK)
    return _DOWNLOAD


_DOWNLOAD = None


def read_to_eof(sock: socket.socket, chunk_size: int = 1 << 20) -> bytes:
    """Everything the peer sends until its FIN; closes the socket."""
    received = bytearray()
    try:
        while True:
            chunk = sock.recv(chunk_size)
            if not chunk:
                return bytes(received)
            received += chunk
    finally:
        sock.close()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_for(predicate, timeout=10.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def connection_outcome(make_socket, target, timeout=5.0) -> str:
    """Connects (socket from make_socket()), waits for the first reply byte; returns what
    happened: 'eof', 'data' or connection_failure()'s word ('reset', 'refused', 'timeout',
    'error N'). Always closes the socket."""
    sock = make_socket()
    sock.settimeout(timeout)
    try:
        sock.connect(target)
        return "data" if sock.recv(10) else "eof"
    except OSError as exc:
        return connection_failure(exc)
    finally:
        sock.close()


def kernel_snapshot(host) -> dict[str, str]:
    """Everything the recipe may touch in a namespace, as text, without counters."""
    def out(cmd):
        return host.run(cmd, check=False).stdout

    state = {
        "nft": out(["nft", "list", "ruleset"]),
        "ip6tables": "\n".join(re.sub(r"\[\d+:\d+\]", "", line)
                               for line in out(["ip6tables-legacy-save", "-t",
                                                kernelsetup.IP6TABLES_TABLE]).splitlines()
                               if not line.startswith("#")),
        "rules": out(["ip", "-6", "rule"]),
        "routes": out(["ip", "-6", "route", "show", "table", "all"]),
        "fwmark_accept": out(["cat", "/proc/sys/net/ipv4/tcp_fwmark_accept"]),
    }
    for key in ("seg6_enabled", "forwarding"):
        state[key] = out(["sh", "-c", f"grep -H . /proc/sys/net/ipv6/conf/*/{key}"])
    state["tcp_migrate_req"] = out(["cat", "/proc/sys/net/ipv4/tcp_migrate_req"])
    # tc: qdiscs and ingress filters of every interface (the cookie program's filters).
    # (A reloaded program gets a new id: not part of the state.)
    state["tc"] = re.sub(r" id \d+", "", out(
        ["sh", "-c", "for dev in $(ls /sys/class/net); do tc qdisc show dev $dev; "
                     "tc filter show dev $dev ingress 2>/dev/null; done"]))
    return state


def kernel_state(host, name: str) -> dict:
    """kernel_snapshot plus what one pipesd instance named `name` owns outside the kernel
    tables: its shared memory segments and control socket."""
    return {
        **kernel_snapshot(host),
        "shm": sorted(f for f in os.listdir("/dev/shm") if name in f),
        "control": os.path.exists(f"/run/srv6pipes/{name}.sock"),
    }


# -- the one-proxy line (fixture `line` in conftest.py): c - p1 - s ---------------------------
def identity_address(tb):
    """p1's identity function address."""
    return AddressPlan(tb.locator("p1")).encode(0)


def name_for(test: str) -> str:
    """A pipesd instance name unique to this test run."""
    return f"{test}{os.getpid()}"


def roundtrip_ok(lab, tb, size=50_000) -> bool:
    """`size` random bytes echoed intact through p1's identity function."""
    payload = os.urandom(size)
    return lab.echo_roundtrip([identity_address(tb)], payload)[1] == payload

