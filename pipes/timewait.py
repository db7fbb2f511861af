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

import socket
import struct

from . import _timewait

NETLINK_SOCK_DIAG = 4
TCP_TIME_WAIT = 6
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
