# cython: language_level=3
"""sock_diag requests of pipes/timewait.py, in C: one per SYN, so their cost counts.

`ask(fd, kind, ...)` sends one inet_diag_req_v2 naming exactly the TCP socket
local:port <-> remote:port and reads the kernel's answer on the same netlink socket. It
does in C what the Python version did with struct packing, a socket timeout (a poll()
before every recv) and per-message unpacking; pipes/timewait.py keeps the logic (look up,
and destroy only a TIME_WAIT socket). The netlink socket must be blocking with
SO_RCVTIMEO set: the kernel answers inside send(), the timeout only guards against a
kernel that does not.

    struct nlmsghdr { __u32 len; __u16 type, flags; __u32 seq, pid; };
    struct inet_diag_req_v2 { __u8 family, protocol, ext, pad; __u32 states;
        struct inet_diag_sockid { __be16 sport, dport; __be32 src[4], dst[4]; __u32 if;
                                  __u32 cookie[2]; } id; };
    answer: SOCK_DIAG_BY_FAMILY messages (struct inet_diag_msg { __u8 family, state, timer,
            retrans; struct inet_diag_sockid id; ...}: the socket's cookie at offset 44)
            then NLMSG_ERROR (__s32 error: 0 = done, -ENOENT = no such socket)

SOCK_DESTROY ignores the request's state mask (tcp_diag_destroy destroys whatever socket has
the tuple), so a destroy names the cookie the lookup returned: it then destroys exactly the
socket that was seen in TIME_WAIT, or answers ENOENT.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t
from libc.string cimport memcpy, memset
from libc.errno cimport errno, EINTR, ENOENT
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

import os

from csystem cimport send, recv, htons, AF_INET6, IPPROTO_TCP

SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21

cdef enum:
    NLMSG_HEADER = 16
    REQUEST_LENGTH = NLMSG_HEADER + 56   # inet_diag_req_v2 is 56 bytes
    NLM_F_REQUEST = 0x1
    NLM_F_ACK = 0x4
    NLMSG_ERROR = 2
    MSG_SOCK_DIAG_BY_FAMILY = 20
    TCP_TIME_WAIT_STATE = 6
    REPLY_BUFFER = 8192

NO_SOCKET = -1   # ask(): the kernel has no socket with that tuple
ANY_SOCKET = 0xFFFFFFFFFFFFFFFF   # INET_DIAG_NOCOOKIE: a request not tied to one socket


cdef inline void _put_u32(uint8_t *p, uint32_t v) noexcept nogil:
    memcpy(p, &v, 4)   # host order, as netlink wants


cdef inline void _put_u16(uint8_t *p, uint16_t v) noexcept nogil:
    memcpy(p, &v, 2)


def ask(int fd, int kind, bytes local, int local_port, bytes remote, int remote_port,
        uint32_t seq, uint64_t cookie=ANY_SOCKET):
    """Sends one request (kind SOCK_DIAG_BY_FAMILY or SOCK_DESTROY) for the TCP socket
    local:local_port <-> remote:remote_port (16-byte addresses), or only the one with that
    cookie, and reads the answer.

    Returns (TCP state, cookie) of the socket for a lookup, (0, cookie) after a destroy,
    or (NO_SOCKET, ANY_SOCKET). Raises OSError for any other kernel answer or a failed
    send/recv."""
    cdef uint8_t request[REQUEST_LENGTH]
    cdef uint8_t reply[REPLY_BUFFER]
    cdef uint8_t *body = request + NLMSG_HEADER
    cdef ssize_t n
    cdef size_t offset
    cdef uint32_t length, msg_seq
    cdef uint16_t msg_kind
    cdef int32_t code
    cdef int state = 0
    cdef uint64_t found_cookie = cookie
    cdef uint32_t half
    if PyBytes_GET_SIZE(local) != 16 or PyBytes_GET_SIZE(remote) != 16:
        raise ValueError("addresses are 16 bytes")
    if not (0 <= local_port <= 65535 and 0 <= remote_port <= 65535):
        raise ValueError("ports are 0-65535")
    memset(request, 0, REQUEST_LENGTH)
    _put_u32(request, REQUEST_LENGTH)
    _put_u16(request + 4, <uint16_t>kind)
    _put_u16(request + 6, NLM_F_REQUEST | NLM_F_ACK)
    _put_u32(request + 8, seq)
    body[0] = AF_INET6
    body[1] = IPPROTO_TCP
    _put_u32(body + 4, 1u << TCP_TIME_WAIT_STATE)
    _put_u16(body + 8, htons(<uint16_t>local_port))     # ports in network order
    _put_u16(body + 10, htons(<uint16_t>remote_port))
    memcpy(body + 12, PyBytes_AS_STRING(local), 16)
    memcpy(body + 28, PyBytes_AS_STRING(remote), 16)
    _put_u32(body + 48, <uint32_t>(cookie & 0xFFFFFFFF))   # cookie[0], cookie[1]: as
    _put_u32(body + 52, <uint32_t>(cookie >> 32))          # the kernel wrote them
    while True:
        n = send(fd, request, REQUEST_LENGTH, 0)
        if n >= 0:
            break
        if errno != EINTR:
            raise OSError(errno, "sock_diag send: " + os.strerror(errno))
    while True:
        n = recv(fd, reply, REPLY_BUFFER, 0)
        if n < 0:
            if errno == EINTR:
                continue
            raise OSError(errno, "sock_diag recv: " + os.strerror(errno))
        offset = 0
        while offset + NLMSG_HEADER <= <size_t>n:
            memcpy(&length, reply + offset, 4)
            memcpy(&msg_kind, reply + offset + 4, 2)
            memcpy(&msg_seq, reply + offset + 8, 4)
            if msg_seq == seq:
                if msg_kind == NLMSG_ERROR and offset + NLMSG_HEADER + 4 <= <size_t>n:
                    memcpy(&code, reply + offset + NLMSG_HEADER, 4)
                    if code == 0:
                        return state, found_cookie
                    if code == -ENOENT:
                        return NO_SOCKET, ANY_SOCKET
                    raise OSError(-code, "sock_diag: " + os.strerror(-code))
                if msg_kind == MSG_SOCK_DIAG_BY_FAMILY and offset + NLMSG_HEADER + 52 <= <size_t>n:
                    state = reply[offset + NLMSG_HEADER + 1]
                    memcpy(&half, reply + offset + NLMSG_HEADER + 44, 4)
                    found_cookie = half
                    memcpy(&half, reply + offset + NLMSG_HEADER + 48, 4)
                    found_cookie |= (<uint64_t>half) << 32
            if length < NLMSG_HEADER:
                break
            offset += (length + 3) & ~(<uint32_t>3)
