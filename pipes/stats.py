"""Counters shared by the workers and read by the master (and so by `pipesctl stats`).

One POSIX shared memory segment per pipesd instance, one region per worker. A region is
a flat array of uint64:

    [ WORKER_COUNTERS ... ][ slot 0: FUNCTION_COUNTERS ... ][ slot 1 ... ] ... [ slot 63 ]

Worker counters are written by the worker's Python code (once per connection); function
counters by the Cython relay loop (per chunk, no Python). Each region has exactly one
writer, so plain increments are safe; the master only reads.
"""
from __future__ import annotations

import mmap

import posix_ipc

from . import _relay
from .functions import MAX_FUNCTION_SLOTS

WORKER_COUNTERS = (
    "pid",
    "heartbeat_ms",        # CLOCK_MONOTONIC ms of the worker's last loop turn
    "accepted",
    "table_hits",          # SRH found in the shared table (normal path)
    "table_misses",        # not in the table (queue bypassed, capture restarting, expired)
    "saved_syn_fallbacks", # of the misses, recovered from TCP_SAVED_SYN
    "no_srh",              # no SRH anywhere (SYN cookies, or a SYN sent without one)
    "malformed_srh",
    "too_many_segments",
    "not_our_segment",     # the active segment is outside our locator
    "unknown_function",
    "onward_failed",       # could not create/bind/connect the onward socket
    "onward_waited",       # connected after waiting for the previous connection to close
    "accept_errors",
    "fd_exhausted",        # EMFILE/ENFILE on accept or on the onward socket
    "hmac_refused",        # saved-SYN fallback: SRH HMAC missing (--require-hmac) or wrong
)
WORKER_INDEX = {name: index for index, name in enumerate(WORKER_COUNTERS)}
RESERVED_WORKER_WORDS = 32
FUNCTION_WORDS = len(_relay.FUNCTION_COUNTERS)
REGION_WORDS = RESERVED_WORKER_WORDS + MAX_FUNCTION_SLOTS * FUNCTION_WORDS
_ACTIVE = _relay.FUNCTION_COUNTERS.index("flows_active")
assert len(WORKER_COUNTERS) <= RESERVED_WORKER_WORDS


def segment_name(instance: str) -> str:
    return f"/srv6pipes-{instance}-stats"


class StatsBlock:
    """The mapped segment. `create` (master, before forking) or `attach` (readers)."""

    def __init__(self, shm: posix_ipc.SharedMemory, regions: int):
        self.regions = regions
        self._map = mmap.mmap(shm.fd, regions * REGION_WORDS * 8)
        shm.close_fd()
        self.words = memoryview(self._map).cast("Q")

    @classmethod
    def create(cls, instance: str, regions: int) -> "StatsBlock":
        unlink(instance)  # a crashed predecessor's segment would have the wrong size
        shm = posix_ipc.SharedMemory(segment_name(instance), posix_ipc.O_CREX, mode=0o600,
                                     size=regions * REGION_WORDS * 8)
        return cls(shm, regions)

    def region(self, index: int) -> "WorkerRegion":
        if not 0 <= index < self.regions:
            raise IndexError(f"stats region {index} out of range")
        start = index * REGION_WORDS
        return WorkerRegion(self.words[start:start + REGION_WORDS])

    def close(self) -> None:
        self.words.release()
        self._map.close()


def unlink(instance: str) -> None:
    try:
        posix_ipc.unlink_shared_memory(segment_name(instance))
    except posix_ipc.ExistentialError:
        pass


class WorkerRegion:
    """One worker's counters. The worker writes; the master reads snapshots."""

    def __init__(self, words: memoryview):
        self.words = words

    def add(self, name: str, amount: int = 1) -> None:
        self.words[WORKER_INDEX[name]] += amount

    def set(self, name: str, value: int) -> None:
        self.words[WORKER_INDEX[name]] = value

    def get(self, name: str) -> int:
        return self.words[WORKER_INDEX[name]]

    def flows_died(self) -> None:
        """The worker is gone and its flows with it: they are no longer active."""
        for slot in range(MAX_FUNCTION_SLOTS):
            self.words[RESERVED_WORKER_WORDS + slot * FUNCTION_WORDS + _ACTIVE] = 0

    def flows_active(self, slot: int) -> int:
        """Open flows of the function in slot (the relay keeps this count)."""
        return self.words[RESERVED_WORKER_WORDS + slot * FUNCTION_WORDS + _ACTIVE]

    def function_words(self) -> memoryview:
        """The slice handed to the relay loop (slot-major FUNCTION_COUNTERS)."""
        return self.words[RESERVED_WORKER_WORDS:]

    def snapshot(self, slot_names: dict[int, str]) -> dict:
        worker = {name: self.words[i] for i, name in enumerate(WORKER_COUNTERS)}
        functions = {}
        for slot, name in slot_names.items():
            base = RESERVED_WORKER_WORDS + slot * FUNCTION_WORDS
            values = {counter: self.words[base + i]
                      for i, counter in enumerate(_relay.FUNCTION_COUNTERS)}
            if any(values.values()):
                functions[name] = values
        return {"worker": worker, "functions": functions}


def merge(snapshots: list[dict]) -> dict:
    """Sums worker snapshots into daemon totals (pid/heartbeat are per worker only)."""
    totals: dict = {"worker": {}, "functions": {}}
    for snap in snapshots:
        for name, value in snap["worker"].items():
            if name in ("pid", "heartbeat_ms"):
                continue
            totals["worker"][name] = totals["worker"].get(name, 0) + value
        for function, values in snap["functions"].items():
            into = totals["functions"].setdefault(function, {})
            for name, value in values.items():
                into[name] = into.get(name, 0) + value
    return totals


# Namespace-wide kernel counters an operator needs next to ours: SYN cookies sent, and
# their ACKs validated (received) or not (failed: the connection is reset) by our
# listeners once cookies.py hands them over; listen queue overflows precede cookies.
KERNEL_COUNTERS = {
    "SyncookiesSent": "syncookies_sent",
    "SyncookiesRecv": "syncookies_recv",
    "SyncookiesFailed": "syncookies_failed",
    "ListenOverflows": "listen_overflows",
    "ListenDrops": "listen_drops",
}


def kernel_counters(path: str = "/proc/net/netstat") -> dict:
    """TcpExt counters of the current network namespace (those in KERNEL_COUNTERS)."""
    try:
        with open(path) as handle:
            lines = [line.split() for line in handle if line.startswith("TcpExt:")]
    except OSError:
        return {}
    if len(lines) < 2:
        return {}
    values = dict(zip(lines[0][1:], lines[1][1:]))
    return {ours: int(values[theirs]) for theirs, ours in KERNEL_COUNTERS.items()
            if theirs in values}
