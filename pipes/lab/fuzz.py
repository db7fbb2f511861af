"""Bad input for pipesd, made at random: control messages and SYNs with malformed SRHs.

Used by the chaos suite (tests/e2e/test_chaos.py, 100k control messages) and by the
benchmark bench/run_fuzz.py (millions of messages, hundreds of thousands of SYNs, with
the daemon's memory watched). Deterministic for a given random.Random seed.
"""
from __future__ import annotations

import json
import os
import random
import socket
import struct
import time
from ipaddress import IPv6Address

from ..srh import IPPROTO_ROUTING

# Requests the control socket knows, and two it must refuse (a list as command, an id).
# No reload: one byte off it would really reload.
VALID_REQUESTS = [b'{"cmd":"ping"}', b'{"cmd":"functions"}', b'{"cmd":"unload","module":"none"}',
                  b'{"cmd":"load","path":"/nonexistent/x.so"}', b'{"cmd":"stats"}',
                  b'{"cmd":[1]}', b'{"cmd":"ping","id":7}']


def control_message(rng: random.Random) -> bytes:
    """A valid request, a mutation of one (flipped, cut, repeated or inserted bytes), random
    JSON, or random bytes; never a newline (one message per line)."""
    kind = rng.random()
    if kind < 0.05:
        return VALID_REQUESTS[rng.randrange(len(VALID_REQUESTS))]
    if kind < 0.55:
        data = bytearray(VALID_REQUESTS[rng.randrange(len(VALID_REQUESTS))])
        for _ in range(rng.randint(1, 4)):
            where = rng.randrange(len(data))
            action = rng.randrange(4)
            if action == 0:
                data[where] = rng.randrange(256)
            elif action == 1:
                del data[where:where + rng.randint(1, 5)]
            elif action == 2:
                data[where:where] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            else:
                data[where:where] = data[:rng.randint(1, 20)]
            if not data:
                data = bytearray(b"{")
    elif kind < 0.8:
        value = rng.choice([None, True, 1, -1, 2**70, 1.5, "x" * rng.randint(0, 300), [], {},
                            {"cmd": rng.choice(["ping", "load", "", 5, None])},
                            {"cmd": "load", "path": rng.choice([5, "", "a" * 5000, ["x"]])},
                            {"cmd": "unload", "module": {"a": 1}},
                            [[[[[]]]]], {"cmd": "stats", "id": rng.choice([-1, 2**60, "1"])}])
        data = bytearray(json.dumps(value).encode())
    else:
        data = bytearray(rng.randrange(256) for _ in range(rng.randint(0, 200)))
    return bytes(data).replace(b"\n", b" ")


def control_batch(host, control_path: str, messages: list[bytes], timeout: float = 20) -> list:
    """Sends `messages` on one control connection from `host`'s namespace (pipelined, one
    per line) and returns the decoded replies, in order."""
    with host.enter():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        sock.connect(control_path)
        sock.sendall(b"\n".join(messages) + b"\n")
        sock.shutdown(socket.SHUT_WR)
        data = bytearray()
        while chunk := sock.recv(1 << 20):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


# -- SYNs with malformed SRHs -----------------------------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_syn(src: IPv6Address, dest: IPv6Address, sport: int, dport: int, seq: int) -> bytes:
    """A TCP SYN (with an MSS option) whose checksum covers the final destination."""
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 6 << 4, 0x02, 65535, 0, 0)
    header += struct.pack("!BBH", 2, 4, 1400)
    pseudo = src.packed + dest.packed + struct.pack("!I3xB", len(header), 6)
    checksum = _checksum(pseudo + header)
    return header[:16] + struct.pack("!H", checksum) + header[18:]


def malformed_srh(rng: random.Random, valid: bytes) -> bytes:
    """`valid` (an SRH) damaged the ways a broken or hostile sender would: any field set
    to a random value, bytes flipped, cut short, random TLVs with or without a matching
    header length. Its length stays a multiple of 8 about half the time."""
    data = bytearray(valid)
    for _ in range(rng.randint(1, 3)):
        action = rng.randrange(6)
        if action == 0:      # one of the fixed fields: hdrlen, type, SL, last entry, flags, tag
            where = rng.choice([1, 2, 3, 4, 5, 6, 7])
            if where < len(data):
                data[where] = rng.randrange(256)
        elif action == 1:    # bytes anywhere
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif action == 2:    # cut short (header length left as it was)
            if len(data) > 2:
                del data[rng.randrange(2, len(data)):]
        elif action == 3:    # TLVs of random type and length, header length adjusted
            tlv = bytes([rng.randrange(256), rng.randrange(256)])
            tlv += bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
            data += tlv + bytes(-len(tlv) % 8)
            data[1] = (len(data) - 8) // 8 & 0xFF
        elif action == 4:    # a padding or HMAC TLV whose length runs past the end
            data += bytes([rng.choice([0, 4, 5]), 200, 0, 0, 0, 0, 0, 0])
            data[1] = (len(data) - 8) // 8 & 0xFF
        else:                # a header length that disagrees with the bytes
            data[1] = rng.randrange(256)
        if len(data) < 2:
            data = bytearray(valid[:2])
    return bytes(data)


def malformed_syn(rng: random.Random, src: IPv6Address, first: IPv6Address,
                  dest: IPv6Address, dport: int, valid_srh: bytes) -> bytes:
    """An IPv6 packet to `first` (the function address) carrying a malformed SRH and a SYN
    to `dest`. The routing header's own length field may lie; the IPv6 payload length
    is always the bytes sent, so the packet reaches the proxy's SRH and SYN parsing."""
    srh = malformed_srh(rng, valid_srh)
    if len(srh) >= 1:
        srh = bytes([6]) + srh[1:]                    # next header TCP, as a client's
    syn = tcp_syn(src, dest, rng.randrange(1024, 65536), dport, rng.getrandbits(32))
    payload = srh + syn
    return (struct.pack("!IHBB", 6 << 28, len(payload), IPPROTO_ROUTING, 64)
            + src.packed + first.packed + payload)


class RawSender:
    """Whole IPv6 packets from `host`'s namespace (IPPROTO_RAW: header included)."""

    def __init__(self, host):
        with host.enter():
            self.sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)

    def send(self, packet: bytes, to: IPv6Address) -> bool:
        try:
            self.sock.sendto(packet, (str(to), 0))
        except OSError:       # the local stack refused it (EINVAL, ENOBUFS): counted by caller
            return False
        return True

    def close(self) -> None:
        self.sock.close()


def paced(count: int, rate: float):
    """Yields 0..count-1 at `rate` per second (in bursts of 1 ms)."""
    start = time.monotonic()
    for i in range(count):
        if i % max(1, int(rate / 1000)) == 0:
            ahead = start + i / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        yield i


def process_tree_rss(pid: int) -> int:
    """Resident memory (bytes) of `pid` and all its descendants."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    stack.extend(int(child) for child in handle.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total
