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
connection. One netlink round trip per SYN; ENOENT (no socket) is the common answer.

    struct inet_diag_sockid { __be16 sport, dport; __be32 src[4], dst[4]; __u32 if; __u32 cookie[2]; };
    struct inet_diag_req_v2 { __u8 family, protocol, ext, pad; __u32 states; struct inet_diag_sockid id; };
"""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 2
TCP_TIME_WAIT = 6
INET_DIAG_NOCOOKIE = 0xFFFFFFFF

_NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2 mixes host order (family..states, if, cookie) and network order (ports).
_REQ_HEAD = struct.Struct("=BBBBI")
_PORTS = struct.Struct("!HH")
_TAIL = struct.Struct("=III")


def _packed(address) -> bytes:
    """16 bytes from bytes, IPv6Address or text (bytes on the per-SYN path: no parsing)."""
    if isinstance(address, bytes):
        return address
    if isinstance(address, ipaddress.IPv6Address):
        return address.packed
    return ipaddress.IPv6Address(address).packed


def diag_request(kind: int, local, local_port: int, remote, remote_port: int, seq: int) -> bytes:
    """A sock_diag message (kind: SOCK_DIAG_BY_FAMILY or SOCK_DESTROY) naming exactly the
    TCP socket local:port <-> remote:port."""
    body = (_REQ_HEAD.pack(socket.AF_INET6, socket.IPPROTO_TCP, 0, 0, 1 << TCP_TIME_WAIT)
            + _PORTS.pack(local_port, remote_port)
            + _packed(local) + _packed(remote)
            + _TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE))
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind,
                          NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


class TimeWaitReaper:
    """One netlink socket, used by the capture process (needs CAP_NET_ADMIN)."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  NETLINK_SOCK_DIAG)
        self.sock.bind((0, 0))
        self.sock.settimeout(1.0)
        self.seq = 0
        self.retired = 0

    def retire(self, local, local_port: int, remote, remote_port: int) -> bool:
        """Called per SYN before its verdict; True if a TIME_WAIT socket was retired.
        Raises OSError for kernel answers other than success and 'no such socket'."""
        state = self._ask(SOCK_DIAG_BY_FAMILY, local, local_port, remote, remote_port)
        if state != TCP_TIME_WAIT:
            return False
        if self._ask(SOCK_DESTROY, local, local_port, remote, remote_port) is None:
            return False
        self.retired += 1
        return True

    def _ask(self, kind: int, local, local_port: int, remote, remote_port: int) -> int | None:
        """Sends one request; returns the socket state (lookups), 0 (destroy done) or None
        (no such socket)."""
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        self.sock.send(diag_request(kind, local, local_port, remote, remote_port, self.seq))
        state = 0
        while True:
            reply = self.sock.recv(8192)
            offset = 0
            while offset + _NLMSGHDR.size <= len(reply):
                length, msg_kind, _, seq, _ = _NLMSGHDR.unpack_from(reply, offset)
                if seq == self.seq:
                    if msg_kind == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", reply, offset + _NLMSGHDR.size)[0]
                        if code == 0:
                            return state
                        if code == errno.ENOENT:
                            return None
                        raise OSError(code, f"sock_diag: {os.strerror(code)}")
                    if msg_kind == SOCK_DIAG_BY_FAMILY:
                        # struct inet_diag_msg { __u8 family, state, ...}
                        state = reply[offset + _NLMSGHDR.size + 1]
                offset += (length + 3) & ~3 if length else len(reply)

    def close(self) -> None:
        self.sock.close()
