"""The controller's DNS transport: UDP and TCP listeners (asyncio), nothing about meaning.

Each query goes to ``handler(wire, client_address)``, which returns the response bytes,
None (drop: malformed or not for us), a coroutine producing either (a new binding waits
for its access router), or :class:`Forward` (relay the query to the upstream resolver).
Protections, each counted in ``counters``:

* a token bucket of ``rate`` queries per second over both transports: beyond it queries
  are dropped (``rate_limited``), so a flood cannot starve the controller;
* UDP answers larger than the client's EDNS payload size (512 without EDNS) are sent
  truncated (TC), the client retries over TCP;
* TCP: 2-byte length framing (RFC 1035 4.2.2), at most MAX_TCP_QUERIES per connection,
  IDLE_TIMEOUT seconds between queries, MAX_TCP_CLIENTS at once (beyond: closed);
* the handler raising is a bug, not a crash: counted (``errors``), logged, no answer.
"""
from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import time
from collections import Counter
from typing import Awaitable, Callable, Optional, Union

import dns.message

from ..ratelimit import RateLimitedLogger

log = logging.getLogger("srv6pipes.controller.dns")

__all__ = ["DnsFrontEnd", "Forward"]

IDLE_TIMEOUT = 10.0
MAX_TCP_QUERIES = 1000
MAX_TCP_CLIENTS = 256
UPSTREAM_TIMEOUT = 2.0


class Forward:
    """Handler's answer: relay the query to the upstream resolver as it is."""


Result = Union[bytes, None, Forward, Awaitable[Union[bytes, None]]]
Handler = Callable[[bytes, ipaddress.IPv6Address], Result]


class TokenBucket:
    def __init__(self, rate: float, clock=time.monotonic):
        self.rate = rate
        self.tokens = rate
        self.clock = clock
        self.last = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def _udp_limit(wire: bytes) -> int:
    """The response size the client accepts over UDP (its EDNS payload, else 512)."""
    try:
        query = dns.message.from_wire(wire, question_only=True)
    except Exception:  # noqa: BLE001 - already answered, best effort
        return 512
    return max(512, query.payload) if query.edns >= 0 else 512


def _truncate(wire: bytes, response: bytes) -> bytes:
    """A TC response holding only the question (RFC 2181 9)."""
    try:
        query = dns.message.from_wire(wire, question_only=True)
        truncated = dns.message.make_response(query)
        truncated.flags |= dns.flags.TC
        return truncated.to_wire()
    except Exception:  # noqa: BLE001
        return response[:12]


class DnsFrontEnd:
    def __init__(self, handler: Handler, rate: int, upstream: Optional[tuple[str, int]] = None):
        self.handler = handler
        self.bucket = TokenBucket(rate)
        self.upstream = upstream
        self.counters: Counter = Counter()
        self.rlog = RateLimitedLogger(log)
        self.servers: list = []
        self.tcp_clients = 0

    async def start(self, endpoints) -> None:
        loop = asyncio.get_running_loop()
        for host, port in endpoints:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(host, port), reuse_port=False)
            self.servers.append(transport)
            self.servers.append(await asyncio.start_server(self._tcp_client, host, port,
                                                           reuse_address=True))
            log.info("DNS on [%s]:%d (UDP and TCP)", host, port)

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
            if hasattr(server, "wait_closed"):
                await server.wait_closed()
        self.servers.clear()

    # -- one query --------------------------------------------------------------------
    async def _finish(self, wire: bytes, client: ipaddress.IPv6Address,
                      result: Result) -> Optional[bytes]:
        """The response bytes for what the handler returned (awaited, or forwarded)."""
        if inspect.isawaitable(result):
            try:
                result = await result
            except Exception as exc:  # noqa: BLE001
                self.counters["errors"] += 1
                self.rlog.error("handler", "query from %s failed: %r", client, exc)
                return None
        if isinstance(result, Forward):
            return await self._forward(wire)
        return result

    def _call(self, wire: bytes, client: ipaddress.IPv6Address) -> Result:
        try:
            return self.handler(wire, client)
        except Exception as exc:  # noqa: BLE001 - never let a query kill the server
            self.counters["errors"] += 1
            self.rlog.error("handler", "query from %s failed: %r", client, exc)
            return None

    async def _forward(self, wire: bytes) -> Optional[bytes]:
        if self.upstream is None:
            return None
        loop = asyncio.get_running_loop()
        answered: asyncio.Future = loop.create_future()

        class Relay(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                if not answered.done() and data[:2] == wire[:2]:
                    answered.set_result(data)

            def error_received(self, exc):
                if not answered.done():
                    answered.set_exception(exc)

        transport, _ = await loop.create_datagram_endpoint(Relay, remote_addr=self.upstream)
        try:
            transport.sendto(wire)
            response = await asyncio.wait_for(answered, UPSTREAM_TIMEOUT)
            self.counters["forwarded"] += 1
            return response
        except (asyncio.TimeoutError, OSError) as exc:
            self.counters["upstream_failures"] += 1
            self.rlog.warning("upstream", "upstream [%s]:%d failed: %r", *self.upstream, exc)
            return None
        finally:
            transport.close()

    def admit(self) -> bool:
        self.counters["received"] += 1
        if self.bucket.take():
            return True
        self.counters["rate_limited"] += 1
        return False

    # -- TCP ------------------------------------------------------------------------------
    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self.tcp_clients >= MAX_TCP_CLIENTS:
            self.counters["tcp_refused"] += 1
            writer.close()
            return
        self.tcp_clients += 1
        try:
            client = ipaddress.IPv6Address(peer[0])
            for _ in range(MAX_TCP_QUERIES):
                try:
                    header = await asyncio.wait_for(reader.readexactly(2), IDLE_TIMEOUT)
                    wire = await asyncio.wait_for(
                        reader.readexactly(int.from_bytes(header, "big")), IDLE_TIMEOUT)
                except (asyncio.IncompleteReadError, asyncio.TimeoutError):
                    return
                self.counters["tcp_queries"] += 1
                if not self.admit():
                    continue
                response = await self._finish(wire, client, self._call(wire, client))
                if response is not None:
                    writer.write(len(response).to_bytes(2, "big") + response)
                    await writer.drain()
        except (ConnectionError, ValueError):
            self.counters["tcp_errors"] += 1
        finally:
            self.tcp_clients -= 1
            writer.close()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, front: DnsFrontEnd):
        self.front = front
        self.transport: Optional[asyncio.DatagramTransport] = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, wire: bytes, addr) -> None:
        front = self.front
        front.counters["udp_queries"] += 1
        if not front.admit():
            return
        try:
            client = ipaddress.IPv6Address(addr[0])
        except ValueError:
            return
        result = front._call(wire, client)
        if isinstance(result, (bytes, type(None))):
            self._send(wire, result, addr)
        else:  # a new binding being installed, or a forward: answer when it is done
            asyncio.ensure_future(self._later(wire, client, result, addr))

    async def _later(self, wire: bytes, client, result, addr) -> None:
        self._send(wire, await self.front._finish(wire, client, result), addr)

    def _send(self, wire: bytes, response: Optional[bytes], addr) -> None:
        if response is None or self.transport is None:
            return
        if len(response) > _udp_limit(wire):
            self.front.counters["truncated"] += 1
            response = _truncate(wire, response)
        self.transport.sendto(response, addr)
