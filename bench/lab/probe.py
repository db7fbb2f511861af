"""Measure what a path does to packets: one-way delay, loss and order, with UDP probes.

Used to calibrate the link emulator (linkemu.py): its tests, and ``run_paper.py --figure
emulator``, which records its accuracy and its ceiling (the packet rate it carries without
adding loss). The sender and the receiver are in two namespaces of the same machine, so
they share CLOCK_MONOTONIC: each probe carries its send time and the receiver computes the
one-way delay directly.

:func:`send_probes` does the I/O; :func:`summarize` is pure (unit tested).
"""
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time

HEADER = struct.Struct("!QQ")      # sequence number, send time (CLOCK_MONOTONIC ns)
PORT = 47011


def summarize(sent, arrivals, loss_pct_set=None, delay_ms_set=None):
    """What the probes saw.

    ``arrivals`` lists (sequence, one-way delay in ns) in the order received. Returns
    ``sent``, ``received``, ``loss_pct``, ``reordered`` (arrivals whose sequence is lower
    than one received before), ``duplicates``, and the delay in ms: ``delay_ms`` (median),
    ``delay_min_ms``, ``delay_p99_ms``, ``delay_max_ms`` (None without arrivals); with the
    settings given, ``loss_error`` (relative: seen / set - 1) and ``delay_error_ms``
    (median - set).
    """
    seqs = [seq for seq, _ in arrivals]
    unique = set(seqs)
    reordered, highest = 0, -1
    for seq in seqs:
        if seq < highest:
            reordered += 1
        highest = max(highest, seq)
    out = {"sent": sent, "received": len(unique),
           "loss_pct": 100.0 * (sent - len(unique)) / sent if sent else None,
           "reordered": reordered, "duplicates": len(seqs) - len(unique)}
    delays = sorted(d / 1e6 for _, d in arrivals)
    if delays:
        out.update(delay_ms=statistics.median(delays), delay_min_ms=delays[0],
                   delay_p99_ms=delays[min(len(delays) - 1, int(0.99 * len(delays)))],
                   delay_max_ms=delays[-1])
    else:
        out.update(delay_ms=None, delay_min_ms=None, delay_p99_ms=None, delay_max_ms=None)
    if loss_pct_set and out["loss_pct"] is not None:
        out["loss_error"] = out["loss_pct"] / loss_pct_set - 1
    if delay_ms_set is not None and out["delay_ms"] is not None:
        out["delay_error_ms"] = out["delay_ms"] - delay_ms_set
    return out


def within_spec(row, delay_tolerance_ms=1.0, loss_tolerance=0.1):
    """Whether one probe run meets the emulator's accuracy bar: median delay within
    ``delay_tolerance_ms`` of the setting, nothing reordered, and loss within
    ``loss_tolerance`` (relative) of the setting, none when none is set.

    ``row``: a :func:`summarize` result with ``delay_ms_set`` and ``loss_pct_set`` added.
    A few thousand probes cannot resolve 10% of a 1% loss rate (the binomial's own spread
    is about that), so a run also passes when its loss is within 3 standard deviations of
    the setting; pool several runs to check the rate more finely.
    """
    if row["delay_ms"] is None or row["reordered"]:
        return False
    if abs(row["delay_ms"] - row["delay_ms_set"]) > delay_tolerance_ms:
        return False
    p, n = row["loss_pct_set"] / 100, row["sent"]
    if not p:
        return row["loss_pct"] == 0
    sigma = (p * (1 - p) / n) ** 0.5 * 100
    return abs(row["loss_pct"] - row["loss_pct_set"]) <= max(
        loss_tolerance * row["loss_pct_set"], 3 * sigma)


def receive(port, count, linger, ready=None, hard_limit=30.0):
    """Receive probes on ``port`` until ``count`` came, or nothing came for ``linger``
    seconds after the first one, or ``hard_limit`` seconds passed; returns the arrivals
    [(sequence, one-way delay ns)]. ``ready`` (a callable) is called once bound."""
    rx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    arrivals = []
    with rx:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        rx.bind(("::", port))
        rx.settimeout(0.05)
        if ready:
            ready()
        hard_stop = time.monotonic() + hard_limit
        last = None
        while len(arrivals) < count and time.monotonic() < hard_stop:
            try:
                data = rx.recv(65536)
            except TimeoutError:
                if last is not None and time.monotonic() - last > linger:
                    break
                continue
            now = time.monotonic_ns()
            last = now / 1e9
            seq, sent_ns = HEADER.unpack_from(data)
            arrivals.append((seq, now - sent_ns))
    return arrivals


def send_probes(src, dst, count, rate_pps, size=200, port=PORT, linger=1.0):
    """Send ``count`` UDP probes of ``size`` bytes from host ``src`` to host ``dst``'s main
    address at ``rate_pps``; return ``(sent, arrivals, seconds)`` for :func:`summarize`
    (``seconds``: how long sending took).

    The receiver is a process of its own in ``dst`` (this module run as a script), so that
    it is not slowed by the sender's GIL; it stops when every probe came, or ``linger``
    seconds after the last one. Bounded: sending takes count / rate_pps, the receiver at
    most 30 s.
    """
    if count < 1 or rate_pps <= 0 or size < HEADER.size:
        raise ValueError("count >= 1, rate_pps > 0, size >= 16")
    receiver = dst.popen([sys.executable, os.path.abspath(__file__), str(port), str(count),
                          str(linger)], stdout=subprocess.PIPE, text=True)
    try:
        if receiver.stdout.readline().strip() != "ready":
            raise RuntimeError("probe receiver did not start")
        with src.enter():
            tx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        with tx:
            padding = bytes(size - HEADER.size)
            target = (str(dst.addr), port)
            started = time.monotonic()
            for seq in range(count):
                # Pace by schedule, not by a fixed gap: a late wake-up is made up for.
                ahead = started + seq / rate_pps - time.monotonic()
                if ahead > 0.0005:
                    time.sleep(ahead)
                tx.sendto(HEADER.pack(seq, time.monotonic_ns()) + padding, target)
            seconds = time.monotonic() - started
        out, _ = receiver.communicate(timeout=40)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.communicate()
    arrivals = [tuple(a) for a in json.loads(out.strip().splitlines()[-1])]
    return count, arrivals, seconds


if __name__ == "__main__":      # the receiving end of send_probes: PORT COUNT LINGER
    port, count, linger = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    got = receive(port, count, linger, ready=lambda: print("ready", flush=True))
    print(json.dumps(got))
