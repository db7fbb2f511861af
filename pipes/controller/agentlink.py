"""The controller's side of the agent channel (asyncio): one :class:`AgentLink` per access
router keeps that router's agent in sync with the binding table.

A sync sends every binding of the router (messages.py: level-triggered), so a lost
message, a restarted agent or a controller restart is repaired by the next one. Syncs go
out when something changed (:meth:`AgentLink.changed`) and every ``sync_interval``
seconds anyway (that is also what refreshes the bindings' lifetimes at the agent). A
caller that needs its change installed before it answers (a new binding: the client will
use it at once) awaits :meth:`AgentLink.installed`, which returns once a sync that
includes the change was acknowledged, or raises :class:`AgentError`.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Callable, Optional

from . import messages
from .messages import ChannelError

log = logging.getLogger("srv6pipes.controller.agents")

__all__ = ["AgentError", "AgentLink", "request"]

RETRY_MIN = 0.1
RETRY_MAX = 2.0


class AgentError(Exception):
    """The agent could not be reached, refused the request, or failed bindings."""


async def request(host: str, port: int, key: bytes, body: dict, timeout: float) -> dict:
    """One authenticated request; returns the agent's reply body. Raises AgentError."""
    sent_nonce = os.urandom(16).hex()
    frame = messages.seal(body, key, nonce=sent_nonce)

    async def exchange() -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(frame)
            await writer.drain()
            length = messages.frame_length(await reader.readexactly(4))
            return await reader.readexactly(length)
        finally:
            writer.close()

    try:
        data = await asyncio.wait_for(exchange(), timeout)
        reply, _ = messages.open_frame(data, key, None)
    except asyncio.TimeoutError:
        raise AgentError(f"agent [{host}]:{port} did not answer within {timeout}s") from None
    except asyncio.IncompleteReadError:
        raise AgentError(f"agent [{host}]:{port} closed the connection without a reply "
                         "(wrong key?)") from None
    except (OSError, ChannelError) as exc:
        raise AgentError(f"agent [{host}]:{port}: {exc}") from None
    if reply.get("re") != sent_nonce:
        raise AgentError(f"agent [{host}]:{port} answered another request")
    if reply.get("type") == "error":
        raise AgentError(f"agent [{host}]:{port} refused: {reply.get('error')}")
    return reply


class AgentLink:
    """Keeps one router's agent in sync. ``snapshot()`` returns the sync's binding list."""

    def __init__(self, router: str, endpoint: tuple[str, int], key: bytes,
                 snapshot: Callable[[], list], interval: float, timeout: float,
                 adopt: Optional[Callable[[list], None]] = None):
        self.router = router
        # Called once with the agent's bindings before the first sync: a restarted
        # controller takes back what its agents still hold instead of wiping it (a sync
        # lists everything, so the first sync of an empty table would remove it all).
        self.adopt = adopt
        self.adopted = adopt is None
        self.endpoint = endpoint
        self.key = key
        self.snapshot = snapshot
        self.interval = interval
        self.timeout = timeout
        self.changes = 0          # bumped by changed()
        self.acked = 0            # the highest change count a successful sync included
        self.wake = asyncio.Event()
        self.waiters: list[tuple[int, asyncio.Future]] = []
        self.task: Optional[asyncio.Task] = None
        self.syncs = self.failures = 0
        self.last_ok: Optional[float] = None
        self.last_error = ""
        self.last_reply: dict = {}

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name=f"agent-{self.router}")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        for _, future in self.waiters:
            if not future.done():
                future.set_exception(AgentError("controller stopping"))
        self.waiters.clear()

    def changed(self) -> int:
        """Something in this router's bindings changed: sync soon. Returns the change
        number to pass to installed()."""
        self.changes += 1
        self.wake.set()
        return self.changes

    async def installed(self, change: int) -> None:
        """Returns once a sync including ``change`` was acknowledged; raises AgentError
        when the first sync that includes it fails, or after the timeout."""
        if self.acked >= change:
            return
        future = asyncio.get_running_loop().create_future()
        self.waiters.append((change, future))
        await asyncio.wait_for(future, self.timeout * 2)

    async def run(self) -> None:
        delay = RETRY_MIN
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            self.wake.clear()
            change = self.changes
            try:
                if not self.adopted:
                    status = await request(*self.endpoint, self.key,
                                           {"type": "status", "router": self.router},
                                           self.timeout)
                    self.adopt(status.get("bindings") or [])
                    self.adopted = True
                await self.sync(change)
                delay = RETRY_MIN
            except AgentError as exc:
                self.failures += 1
                self.last_error = str(exc)
                log.warning("sync of %s failed: %s", self.router, exc)
                self._settle(change, exc)
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)
                self.wake.set()  # retry soon, not after a whole interval

    async def sync(self, change: int) -> dict:
        items = [{"binding": binding.to_json(), "lifetime": lifetime}
                 for binding, lifetime in self.snapshot()]
        body = {"type": "sync", "router": self.router, "generation": change, "bindings": items}
        reply = await request(*self.endpoint, self.key, body, self.timeout)
        self.syncs += 1
        self.last_ok = time.monotonic()
        self.last_reply = {k: reply.get(k) for k in ("installed", "refreshed", "removed", "failed")}
        failed = reply.get("failed") or []
        if failed:
            error = AgentError(f"agent {self.router} failed {len(failed)} bindings: "
                               f"{failed[0].get('error')}")
            self.last_error = str(error)
            self._settle(change, error)
        else:
            self.acked = max(self.acked, change)
            self._settle(change, None)
        return reply

    def _settle(self, change: int, error: Optional[Exception]) -> None:
        """Wakes the waiters whose change this sync included."""
        keep = []
        for wanted, future in self.waiters:
            if wanted <= change and not future.done():
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)
            elif not future.done():
                keep.append((wanted, future))
        self.waiters = keep

    def to_json(self, now: float) -> dict:
        return {"agent": f"[{self.endpoint[0]}]:{self.endpoint[1]}", "syncs": self.syncs,
                "failures": self.failures, "changes": self.changes, "acked": self.acked,
                "last_ok_s_ago": None if self.last_ok is None else round(now - self.last_ok, 2),
                "last_error": self.last_error, "last_reply": self.last_reply}
