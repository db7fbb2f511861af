"""Running a function in a forked child and getting its result back (tests only).

Used where a test needs another process: a second mapping of shared memory, or a
process that joined another network namespace.
"""
from __future__ import annotations

import multiprocessing


def run_in_child(target, *args, timeout=20.0):
    """Runs target(*args) in a forked process; returns what it returned (or raises)."""
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe(duplex=False)

    def body():
        try:
            child_end.send(("ok", target(*args)))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            child_end.send(("error", repr(exc)))

    process = ctx.Process(target=body)
    process.start()
    try:
        if not parent_end.poll(timeout):
            raise AssertionError(f"child did not answer within {timeout}s")
        status, value = parent_end.recv()
    finally:
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
    assert status == "ok", value
    return value
