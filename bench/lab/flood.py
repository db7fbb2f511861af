"""SYN floods in the lab: spoofed SYNs from c (synflood.c) while a legitimate client measures
how many of its connections still succeed.

Used by bench/run_flood.py (the benchmark: 20k SYN/s, pipesd against HAProxy and the plain
router) and by the chaos test (a small flood). Spoofed sources come from FLOOD_PREFIX, a /64
that every host routes back toward the flooding host, which black-holes it
(`spoofed_routes`): the SYN-ACKs leave the middlebox as on a real network with a default
route and then vanish, as in a real spoofed flood, and every SYN takes a new place in a
SYN queue. (Without a route back the kernel drops the SYN before it takes a place: no
SYN-ACK can be routed, so neither queues nor cookies would be exercised.)
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import statistics
import subprocess
import threading
import time

from srv6pipes.lab.apps import connection_failure
from srv6pipes.system import IPV6_RTHDR

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "synflood.c")
BUILD_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build")
FLOOD_PREFIX = "fd00:bad::"


class FloodError(RuntimeError):
    pass


def build_synflood(build_dir: str = BUILD_DIR) -> str:
    """Compiles synflood.c unless an up-to-date binary exists; returns its path."""
    target = os.path.join(build_dir, "synflood")
    if os.path.exists(target) and os.path.getmtime(target) >= os.path.getmtime(SOURCE):
        return target
    os.makedirs(build_dir, exist_ok=True)
    cc = os.environ.get("CC") or shutil.which("cc") or "gcc"
    tmp = f"{target}.{os.getpid()}.tmp"
    res = subprocess.run([cc, "-O2", "-Wall", "-o", tmp, SOURCE], capture_output=True,
                         text=True, timeout=120)
    if res.returncode != 0:
        raise FloodError(f"cannot build synflood: {res.stderr.strip()[-1000:]}")
    os.replace(tmp, target)
    return target


class spoofed_routes:
    """Context manager: every host of `tb` but `origin` routes FLOOD_PREFIX/64 the way it
    routes to `origin`'s address; `origin` black-holes it. Removed on exit."""

    def __init__(self, tb, origin: str = "c"):
        self.tb, self.origin = tb, origin
        self.installed: list = []

    def __enter__(self):
        origin = self.tb.hosts[self.origin]
        prefix = f"{FLOOD_PREFIX}/64"
        for name, host in self.tb.hosts.items():
            if name == self.origin:
                continue
            route = host.run(["ip", "-6", "route", "get", str(origin.addr)]).stdout.split()
            via = ["via", route[route.index("via") + 1]] if "via" in route else []
            dev = ["dev", route[route.index("dev") + 1]]
            host.run(["ip", "-6", "route", "replace", prefix, *via, *dev])
            self.installed.append(host)
        origin.run(["ip", "-6", "route", "replace", "blackhole", prefix])
        self.installed.append(origin)
        return self

    def __exit__(self, *exc):
        for host in self.installed:
            host.run(["ip", "-6", "route", "del", f"{FLOOD_PREFIX}/64"], check=False)
        self.installed.clear()
        return False


class Flood:
    """`rate` spoofed SYN/s for `seconds` from `host` to [dest]:port, through `segments`
    (function addresses) when given. `wait()` returns how many were sent."""

    def __init__(self, host, dest, port: int, rate: int, seconds: float, segments=()):
        self.proc = host.popen([build_synflood(), str(dest), str(port), str(rate), str(seconds),
                                FLOOD_PREFIX, *map(str, segments)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait(self, timeout: float = 120) -> int:
        output, _ = self.proc.communicate(timeout=timeout)
        match = re.search(r"sent (\d+)", output or "")
        if self.proc.returncode != 0 or match is None:
            raise FloodError(f"synflood failed ({self.proc.returncode}): {output[-500:]}")
        return int(match[1])


@dataclasses.dataclass
class ProbeResult:
    attempts: int
    successes: int
    failures: dict           # kind -> count
    latencies_ms: list       # of the successes

    @property
    def success_ratio(self) -> float:
        return self.successes / self.attempts if self.attempts else 0.0

    def summary(self) -> dict:
        lat = sorted(self.latencies_ms)
        return {"attempts": self.attempts, "successes": self.successes,
                "success_ratio": round(self.success_ratio, 4), "failures": self.failures,
                "latency_ms_p50": round(statistics.median(lat), 1) if lat else None,
                "latency_ms_p99": round(lat[int(0.99 * (len(lat) - 1))], 1) if lat else None}


def http_get(host, server, port: int, path: str, srh: bytes | None, timeout: float) -> str:
    """One HTTP/1.0 GET from `host`'s namespace; returns 'ok' or what went wrong."""
    with host.enter():
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        if srh is not None:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RTHDR, srh)
        sock.connect((str(server), port))
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: lab\r\n\r\n".encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return "ok" if data.startswith(b"HTTP/1.0 200") or data.startswith(b"HTTP/1.1 200") \
            else "bad reply"
    except OSError as exc:
        return connection_failure(exc)
    finally:
        sock.close()


def probe(host, server, port: int, path: str, attempts: int, interval: float,
          srh: bytes | None = None, timeout: float = 5.0, parallel: int = 8) -> ProbeResult:
    """`attempts` GETs started every `interval` seconds (at most `parallel` at once, so
    slow ones do not hold the next back); counts how each ended."""
    results: list[tuple[str, float]] = []
    lock = threading.Lock()
    slots = threading.Semaphore(parallel)

    def one():
        started = time.monotonic()
        try:
            outcome = http_get(host, server, port, path, srh, timeout)
        finally:
            slots.release()
        with lock:
            results.append((outcome, (time.monotonic() - started) * 1000))

    threads = []
    next_start = time.monotonic()
    for _ in range(attempts):
        next_start += interval
        slots.acquire()
        thread = threading.Thread(target=one, daemon=True)
        thread.start()
        threads.append(thread)
        pause = next_start - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    for thread in threads:
        thread.join(timeout + 5)
    failures: dict[str, int] = {}
    for outcome, _ in results:
        if outcome != "ok":
            failures[outcome] = failures.get(outcome, 0) + 1
    failures["unfinished"] = attempts - len(results)
    if not failures["unfinished"]:
        del failures["unfinished"]
    ok = [ms for outcome, ms in results if outcome == "ok"]
    return ProbeResult(attempts, len(ok), failures, ok)
