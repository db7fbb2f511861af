"""Queued-SYN packets and a scratch SRH table, for the capture's tests (its Python path in
tests/e2e/test_capture.py, its C fast path in tests/unit/test_synparse.py)."""
import ipaddress
import os
import struct
import uuid
from contextlib import contextmanager

from srv6pipes import _srhtable

A = ipaddress.IPv6Address
CLIENT = A("fc00:c::1")


@contextmanager
def scratch_table(prefix, nslots=256):
    """A fresh writable SRH table under a unique name, unlinked afterwards."""
    name = f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    writer = _srhtable.SrhTable.create(name, nslots=nslots)
    try:
        yield writer
    finally:
        writer.close()
        _srhtable.unlink(name)


def tcp_header(sport=40000, dport=80, flags=0x02):
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)


def ipv6_packet(src, dst, next_header, payload):
    return (struct.pack("!IHBB", 6 << 28, len(payload), next_header, 64)
            + A(src).packed + A(dst).packed + payload)


def extension(next_header, units=0):
    """A generic extension header (hop-by-hop or destination options) with PadN only."""
    return bytes([next_header, units]) + bytes(6 + 8 * units)


def syn_with_srh(srh, sport=40000, dport=80, flags=0x02, src=CLIENT):
    """What the queue hands the capture: the SYN as the client sent it, addressed to the
    SRH's active segment."""
    return ipv6_packet(src, srh.active_segment, 43,
                       srh.to_bytes() + tcp_header(sport, dport, flags))


def table_counts(table):
    """The table's nonzero counters."""
    return {k: v for k, v in table.counters().items() if k in _srhtable.COUNTERS and v}
