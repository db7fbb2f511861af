"""Rate-limited logging for per-packet and per-connection events.

A flood of bad SYNs or failing connections must not turn into a flood of log lines. Each
call names a key (one kind of event); per key at most `burst` lines are written per
`interval` seconds. Lines beyond that are counted, and the next line written for the key
says how many were suppressed::

    rlog = RateLimitedLogger(logging.getLogger("srv6pipes.capture"))
    rlog.warning("malformed", "malformed SRH from %s: %s", src, exc)
    ...
    rlog.flush()   # at exit: reports keys with suppressed lines still pending

Not thread-safe (each process of pipesd is single-threaded).
"""
from __future__ import annotations

import logging
import time
from typing import Callable


class RateLimitedLogger:
    """Wraps a logging.Logger; called once per event, costs a dict lookup when suppressed."""

    def __init__(self, logger: logging.Logger, burst: int = 5, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        if burst < 1 or interval <= 0:
            raise ValueError(f"burst must be >= 1 and interval > 0, got {burst}, {interval}")
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self.clock = clock
        # key -> [window start, lines written in the window, lines suppressed since last line]
        self._state: dict[str, list] = {}

    def log(self, level: int, key: str, msg: str, *args) -> bool:
        """Logs msg % args at level unless key is over its budget; returns True if written."""
        now = self.clock()
        state = self._state.get(key)
        if state is None:
            state = self._state[key] = [now, 0, 0]
        elif now - state[0] >= self.interval:
            state[0] = now
            state[1] = 0
        if state[1] >= self.burst:
            state[2] += 1
            return False
        state[1] += 1
        if not self.logger.isEnabledFor(level):
            return False
        suppressed = state[2]
        state[2] = 0
        if suppressed:
            self.logger.log(level, msg + " (%d similar messages suppressed)", *args, suppressed)
        else:
            self.logger.log(level, msg, *args)
        return True

    def debug(self, key: str, msg: str, *args) -> bool:
        return self.log(logging.DEBUG, key, msg, *args)

    def info(self, key: str, msg: str, *args) -> bool:
        return self.log(logging.INFO, key, msg, *args)

    def warning(self, key: str, msg: str, *args) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def error(self, key: str, msg: str, *args) -> bool:
        return self.log(logging.ERROR, key, msg, *args)

    def suppressed(self, key: str) -> int:
        """Lines of key suppressed and not yet reported."""
        state = self._state.get(key)
        return state[2] if state else 0

    def flush(self, level: int = logging.INFO) -> None:
        """Reports every key with suppressed lines still pending (call before exiting)."""
        for key, state in self._state.items():
            if state[2]:
                self.logger.log(level, "%d more %r messages suppressed", state[2], key)
                state[2] = 0
