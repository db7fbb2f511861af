"""The master's event loop: descriptors with callbacks, and deadlines. One thread, no asyncio.

The master forks workers, the capture and module probes; a forked child must not inherit a
running loop, threads or half-held locks. A plain selector and a heap of timers keep that
simple: a child calls `close()` on the inherited loop and forgets it.

Callbacks run one at a time from `run_once`; a callback that raises is logged and the loop
goes on (a bug in one control client's handling must not stop supervision).
"""
from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import time
from typing import Callable, Optional

log = logging.getLogger("srv6pipes.master")

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE


class Timer:
    """A pending call_at; `cancel()` makes it a no-op."""

    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None]):
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()

    # -- descriptors ------------------------------------------------------------------
    def watch(self, fd: int, events: int, callback: Callable[[int], None]) -> None:
        """Calls callback(ready events) whenever fd is ready for events (READ/WRITE);
        watching an fd again replaces its events and callback."""
        try:
            self.selector.modify(fd, events, callback)
        except KeyError:
            self.selector.register(fd, events, callback)

    def unwatch(self, fd: int) -> None:
        try:
            self.selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    # -- time -------------------------------------------------------------------------
    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        """Calls callback() once time.monotonic() >= when."""
        timer = Timer(when, callback)
        heapq.heappush(self._timers, (when, next(self._order), timer))
        return timer

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self.call_at(time.monotonic() + delay, callback)

    # -- running ----------------------------------------------------------------------
    def run_once(self, max_wait: float) -> None:
        """Waits at most max_wait seconds (less if a timer is due sooner), then runs the
        callbacks of ready descriptors and due timers."""
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        wait = max_wait
        if self._timers:
            wait = max(0.0, min(wait, self._timers[0][0] - time.monotonic()))
        try:
            ready = self.selector.select(wait)
        except InterruptedError:
            ready = []
        for key, events in ready:
            self._safely(key.data, events)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                self._safely(timer.callback)

    @staticmethod
    def _safely(callback: Callable, *args) -> None:
        try:
            callback(*args)
        except Exception:  # noqa: BLE001 - one broken handler must not stop the master
            log.exception("internal error in the master's event loop (carrying on)")

    def close(self) -> None:
        """Frees the selector; also what a forked child does with its inherited copy."""
        self.selector.close()
        self._timers.clear()

    def next_timer(self) -> Optional[float]:
        return self._timers[0][0] if self._timers else None
