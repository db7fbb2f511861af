"""Clearing a proxy-side TIME_WAIT socket that would swallow a new SYN.

Why: a proxy stands in for the server S toward the client C. When S closes first, the
proxy closes first toward C too, so the proxy holds the TIME_WAIT socket (S:port <- C:sport)
that S holds without a proxy. When C reuses its port, the new SYN reaches the listener
(TPROXY), but later packets of the handshake, whose destination becomes S only after the SRH
loop, meet that TIME_WAIT socket first and the connection stalls (SYN retransmissions).
Plain TPROXY deployments do not see this because nft's tproxy looks TIME_WAIT sockets up
by the packet's destination and retires them; ours carry the function address there.

So the capture process, which sees every SYN before the kernel does, looks that exact
tuple up (sock_diag) and, only if the socket there is in TIME_WAIT, asks the kernel to
retire it (SOCK_DESTROY, CONFIG_INET_DIAG_DESTROY). The state check matters: SOCK_DESTROY
kills whatever socket has the tuple, and a retransmitted SYN may belong to a live
connection. One netlink round trip per SYN; ENOENT (no socket) is the common answer. The
messages are built and parsed in cext/timewait.pyx.
"""
from __future__ import annotations

import logging
import socket
import struct

from . import _timewait

log = logging.getLogger("srv6pipes.timewait")

NETLINK_SOCK_DIAG = 4
TCP_FIN_WAIT2 = 5
TCP_TIME_WAIT = 6
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
AF_INET6_VALUE, IPPROTO_TCP_VALUE = 10, 6
# How long a sock_diag answer may take. The kernel answers inside send(); this only keeps a
# kernel that does not from stalling the capture (and every SYN behind it).
ANSWER_TIMEOUT = struct.pack("ll", 1, 0)  # struct timeval: 1 s


class TimeWaitReaper:
    """One netlink socket, used by the capture process (needs CAP_NET_ADMIN). The requests
    themselves are built and read in C (cext/timewait.pyx): one per SYN."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  NETLINK_SOCK_DIAG)
        self.sock.bind((0, 0))
        # Blocking with SO_RCVTIMEO rather than settimeout(): no poll() before each recv.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, ANSWER_TIMEOUT)
        self.fd = self.sock.fileno()
        self.seq = 0

    def retire(self, local: bytes, local_port: int, remote: bytes, remote_port: int) -> bool:
        """Called per SYN before its verdict, addresses as 16 bytes; True if a TIME_WAIT
        socket was retired. Raises OSError for kernel answers other than success and 'no
        such socket'."""
        state, cookie = self._ask(_timewait.SOCK_DIAG_BY_FAMILY, local, local_port, remote,
                                  remote_port)
        if state != TCP_TIME_WAIT:
            return False
        # By cookie: SOCK_DESTROY ignores states, so only this exact socket may go.
        state, _ = self._ask(_timewait.SOCK_DESTROY, local, local_port, remote, remote_port,
                             cookie)
        return state != _timewait.NO_SOCKET

    def _ask(self, kind: int, local: bytes, local_port: int, remote: bytes,
             remote_port: int, cookie: int = _timewait.ANY_SOCKET) -> tuple[int, int]:
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        return _timewait.ask(self.fd, kind, local, local_port, remote, remote_port, self.seq,
                             cookie)

    def close(self) -> None:
        self.sock.close()


def retire_leftovers() -> int:
    """Called by the master once its workers are gone: retires the TIME_WAIT (and FIN_WAIT2:
    everything sent and acknowledged) sockets they left, which are recognisable by their
    local address: a client's (onward sockets) or a final destination's (accepted ones),
    never one of this host's. Left alone they would swallow routed traffic from the same
    client ports for up to a minute: early demux attaches them to forwarded packets, which
    the kernel then drops. Returns how many were retired; never raises."""
    try:
        ours = _local_addresses()
        reaper = TimeWaitReaper()
    except OSError as exc:
        log.warning("cannot retire leftover TIME_WAIT sockets: %s", exc)
        return 0
    retired = 0
    try:
        for local, local_port, remote, remote_port, cookie in _dump(
                (1 << TCP_TIME_WAIT) | (1 << TCP_FIN_WAIT2)):
            if local in ours or local == bytes(16):
                continue
            try:
                state, _ = reaper._ask(_timewait.SOCK_DESTROY, local, local_port, remote,
                                       remote_port, cookie)
            except OSError as exc:
                log.debug("retiring [%s]:%d: %s", socket.inet_ntop(socket.AF_INET6, local),
                          local_port, exc)
                continue
            retired += state != _timewait.NO_SOCKET
    except OSError as exc:
        log.warning("listing leftover TIME_WAIT sockets failed: %s", exc)
    finally:
        reaper.close()
    return retired


def _local_addresses() -> set[bytes]:
    """This network namespace's IPv6 addresses (/proc/net/if_inet6 is per namespace)."""
    with open("/proc/net/if_inet6") as handle:
        return {bytes.fromhex(line.split()[0]) for line in handle if line.strip()}


def _dump(states: int) -> list[tuple[bytes, int, bytes, int, int]]:
    """Every IPv6 TCP socket in one of `states` (a bit mask): (local, local_port, remote,
    remote_port, cookie) each, read to the end before anything is done with them (on a
    socket of its own). One sock_diag dump request:

        struct inet_diag_req_v2 { u8 family, protocol, ext, pad; u32 states;
                                  struct inet_diag_sockid id; }   (56 bytes, id zeroed)
        answers: struct inet_diag_msg { u8 family, state, timer, retrans;
                 struct inet_diag_sockid { be16 sport, dport; be32 src[4], dst[4]; u32 if;
                 u32 cookie[2]; } id; ... }"""
    request = struct.pack("=IHHII", 16 + 56, _timewait.SOCK_DIAG_BY_FAMILY,
                          NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    request += struct.pack("=BBBBI", AF_INET6_VALUE, IPPROTO_TCP_VALUE, 0, 0, states) + bytes(48)
    found = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(5)
        sock.send(request)
        while True:
            data = sock.recv(1 << 16)
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    code = struct.unpack_from("=i", data, offset + 16)[0]
                    raise OSError(-code, "sock_diag dump failed")
                body = offset + 16
                if kind == _timewait.SOCK_DIAG_BY_FAMILY and length >= 16 + 52:
                    sport, dport = struct.unpack_from("!HH", data, body + 4)
                    src, dst = data[body + 8:body + 24], data[body + 24:body + 40]
                    low, high = struct.unpack_from("=II", data, body + 44)
                    found.append((src, sport, dst, dport, low | (high << 32)))
                if length < 16:
                    return found
                offset += (length + 3) & ~3
