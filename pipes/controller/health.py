"""Health probes of the proxies, as the controller sees them (asyncio).

Every ``probe_interval`` the controller sends ``GET /health`` to each proxy's health
endpoint (``pipesctl serve-health`` next to pipesd, see pipes/healthserver.py), all at
once, each bounded by ``probe_timeout``. A proxy is *down* after ``probe_failures``
failed probes in a row and *up* again after one good probe; the active flows it reports
are its load for path computation (pathcomp.py). :meth:`Prober.round` returns the names
whose state changed, so the controller reroutes the bindings of a proxy that went down.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Iterable, Optional

from .model import Proxy
from .pathcomp import ProxyLoad

__all__ = ["ProbeError", "Prober", "ProxyHealth", "probe"]

MAX_RESPONSE = 64 * 1024


class ProbeError(Exception):
    """A probe that failed; the message says how."""


async def probe(host: str, port: int, timeout: float) -> int:
    """One ``GET /health``; returns the active flows reported. Raises ProbeError."""
    async def exchange() -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(b"GET /health HTTP/1.0\r\nHost: pipes\r\n\r\n")
            await writer.drain()
            data = b""  # HTTP/1.0: the response ends when the server closes
            while len(data) <= MAX_RESPONSE and (chunk := await reader.read(MAX_RESPONSE)):
                data += chunk
            return data
        finally:
            writer.close()

    try:
        data = await asyncio.wait_for(exchange(), timeout)
    except asyncio.TimeoutError:
        raise ProbeError(f"no answer within {timeout}s") from None
    except OSError as exc:
        raise ProbeError(f"{exc.strerror or exc}") from None
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    try:
        report = json.loads(body)
    except ValueError:
        report = None
    if len(status) < 2 or status[1] != b"200" or not isinstance(report, dict) \
            or report.get("ok") is not True:
        detail = report.get("error") if isinstance(report, dict) else head[:80]
        raise ProbeError(f"unhealthy: {detail!r}")
    flows = report.get("active_flows", 0)
    if isinstance(flows, bool) or not isinstance(flows, int) or flows < 0:
        raise ProbeError(f"active_flows {flows!r} is not a count")
    return flows


@dataclasses.dataclass
class ProxyHealth:
    """What the prober knows of one proxy. Starts down: unknown is not healthy."""

    healthy: bool = False
    failures: int = 0
    active_flows: int = 0
    last_ok: Optional[float] = None
    last_error: str = ""
    changed_at: Optional[float] = None
    probes: int = 0

    def to_json(self, now: float) -> dict:
        return {"healthy": self.healthy, "failures": self.failures,
                "active_flows": self.active_flows, "probes": self.probes,
                "last_ok_s_ago": None if self.last_ok is None else round(now - self.last_ok, 2),
                "last_error": self.last_error,
                "state_since_s": None if self.changed_at is None else round(now - self.changed_at, 2)}


class Prober:
    def __init__(self, proxies: Iterable[Proxy], timeout: float, failures: int):
        self.proxies = {proxy.name: proxy for proxy in proxies}
        self.timeout = timeout
        self.failures = failures
        self.health = {name: ProxyHealth() for name in self.proxies}

    def update_topology(self, proxies: Iterable[Proxy], timeout: float, failures: int) -> None:
        """After a reload: keep the state of proxies that are still there."""
        self.proxies = {proxy.name: proxy for proxy in proxies}
        self.timeout, self.failures = timeout, failures
        self.health = {name: self.health.get(name, ProxyHealth()) for name in self.proxies}

    async def round(self) -> list[tuple[str, bool]]:
        """Probes every proxy once; returns [(name, healthy now)] for those that changed."""
        names = list(self.proxies)
        results = await asyncio.gather(*(probe(*self.proxies[n].health, self.timeout)
                                         for n in names), return_exceptions=True)
        now = time.monotonic()
        changed = []
        for name, result in zip(names, results):
            state = self.health[name]
            state.probes += 1
            if isinstance(result, BaseException):
                if not isinstance(result, ProbeError):
                    result = ProbeError(repr(result))
                state.failures += 1
                state.last_error = str(result)
                if state.healthy and state.failures >= self.failures:
                    state.healthy, state.changed_at = False, now
                    changed.append((name, False))
                elif state.changed_at is None:
                    state.changed_at = now
            else:
                state.failures = 0
                state.active_flows = result
                state.last_ok = now
                if not state.healthy:
                    state.healthy, state.changed_at = True, now
                    changed.append((name, True))
        return changed

    def loads(self, bindings_per_proxy) -> dict[str, ProxyLoad]:
        return {name: ProxyLoad(state.healthy, state.active_flows, bindings_per_proxy.get(name, 0))
                for name, state in self.health.items()}

    def down(self) -> set[str]:
        return {name for name, state in self.health.items() if not state.healthy}
