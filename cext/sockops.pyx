# cython: language_level=3, boundscheck=False, wraparound=False
"""The worker's per-connection socket calls, on raw descriptors.

Why this exists: for short connections the accept path was a visible share of the
middlebox CPU. Through Python's socket module each connection cost two socket objects,
address strings (built by getsockname/accept, parsed again by bind/connect and inet_pton),
an ioctl per socket for setblocking(False) and an interpreter round trip per setsockopt.
Here every call is one C function over plain file descriptors: the accepted and the onward
socket are created non-blocking (SOCK_NONBLOCK), and addresses stay as the 16 bytes the
kernel gives, which is what the SRH table and the relay's flow tuple want anyway.

The worker (pipes/worker.py) owns each descriptor until it hands both to the relay loop
(`RelayLoop.add_flow`); every function here that fails closes what it created. Errors are
raised as OSError with the errno (so BlockingIOError, ConnectionAbortedError, ... as
Python's own socket calls would). The GIL is kept: each call is a few syscalls that never
block.

Addresses are IPv6 only (the transparent listener is AF_INET6; IPv4 clients arrive as
IPv4-mapped addresses). Flow label and scope id are left 0, as the worker always did.
"""
from libc.errno cimport errno, EAGAIN, EINTR, EINPROGRESS, EBADF, EADDRINUSE
from libc.stdint cimport uint8_t, uint16_t
from libc.string cimport memcpy, memset
from posix.unistd cimport close
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE

import os

from csystem cimport (socklen_t, sockaddr, linger, AF_INET6, SOCK_STREAM,
                      SOCK_NONBLOCK, SOCK_CLOEXEC, SOL_SOCKET, SO_REUSEADDR, SO_REUSEPORT,
                      SO_LINGER, socket, accept4, getsockname, setsockopt, getsockopt, bind,
                      connect, sockaddr_in6, IPPROTO_IPV6, IPPROTO_TCP, htons,
                      ntohs, TCP_NODELAY, IPV6_RTHDR, IPV6_TRANSPARENT, TCP_SAVE_SYN,
                      TCP_SAVED_SYN, SO_NETNS_COOKIE)

# The Linux option numbers (cext/csystem.pxd) for Python: pipes/system.py exports them.
SOCKET_OPTIONS = {"IPV6_RTHDR": IPV6_RTHDR, "IPV6_TRANSPARENT": IPV6_TRANSPARENT,
                  "TCP_SAVE_SYN": TCP_SAVE_SYN, "TCP_SAVED_SYN": TCP_SAVED_SYN,
                  "SO_NETNS_COOKIE": SO_NETNS_COOKIE}

cdef int ON = 1


cdef int raise_errno(int err) except -1:
    raise OSError(err, os.strerror(err))


cdef int set_flag(int fd, int level, int name) noexcept nogil:
    """setsockopt(level, name, 1); returns 0 or the errno."""
    if setsockopt(fd, level, name, &ON, sizeof(ON)) < 0:
        return errno
    return 0


cdef int close_checked(int fd) except -1:
    # On Linux the descriptor is released even when close() fails (EINTR included), so it
    # is never retried; only EBADF is worth raising: a caller closing twice could close a
    # descriptor that has since been reused.
    if close(fd) < 0 and errno == EBADF:
        raise_errno(EBADF)
    return 0


cdef int close_with_reset(int fd) except -1:
    cdef linger lg
    lg.l_onoff = 1
    lg.l_linger = 0
    # Best effort: if it fails the peer gets a FIN instead, which is still an answer.
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg))
    return close_checked(fd)


cdef int fill_address(sockaddr_in6 *sa, bytes address, uint16_t port) except -1:
    if PyBytes_GET_SIZE(address) != 16:
        raise ValueError(f"an IPv6 address is 16 bytes, got {PyBytes_GET_SIZE(address)}")
    memset(sa, 0, sizeof(sockaddr_in6))
    sa.sin6_family = AF_INET6
    sa.sin6_port = htons(port)
    memcpy(&sa.sin6_addr, PyBytes_AS_STRING(address), 16)
    return 0


def accept_connection(int listen_fd):
    """Takes one connection from a non-blocking listener. Called per connection in the
    worker's accept burst.

    Returns None when the accept queue is empty, else
    (fd, client address, client port, destination address, destination port): the
    addresses as 16 bytes, the ports in host order. With TPROXY the local address of the
    accepted socket is the client's final destination. The new descriptor is non-blocking
    and close-on-exec; its other options come from the listener, whose copy it is (on Linux
    an accepted socket inherits TCP_NODELAY, SO_LINGER and keepalive: the worker's listener,
    make_listener, sets them once instead of a setsockopt per connection). Raises OSError
    for any other accept error; if getsockname fails the connection is reset.
    """
    cdef sockaddr_in6 peer, local
    cdef socklen_t peer_len = sizeof(peer), local_len = sizeof(local)
    cdef int fd = -1, err
    while True:
        fd = accept4(listen_fd, <sockaddr *>&peer, &peer_len, SOCK_NONBLOCK | SOCK_CLOEXEC)
        if fd >= 0:
            break
        err = errno
        if err == EAGAIN:  # (EWOULDBLOCK on Linux)
            return None
        if err != EINTR:
            raise_errno(err)
    if peer.sin6_family != AF_INET6:
        close(fd)
        raise ValueError(f"descriptor {listen_fd} is not an IPv6 listener")
    if getsockname(fd, <sockaddr *>&local, &local_len) < 0:
        err = errno
        close_with_reset(fd)
        raise_errno(err)
    return (fd, PyBytes_FromStringAndSize(<char *>&peer.sin6_addr, 16), ntohs(peer.sin6_port),
            PyBytes_FromStringAndSize(<char *>&local.sin6_addr, 16), ntohs(local.sin6_port))


cdef int bind_source(int fd, sockaddr_in6 *source) noexcept nogil:
    """bind() the onward socket to the client's address; returns 0 or the errno.

    The client's port may equal our listeners' port: they listen on [::] with SO_REUSEPORT,
    and SO_REUSEADDR does not share a port with a listening socket, so the bind fails with
    EADDRINUSE; joining their SO_REUSEPORT group (same owner) is what lets it succeed then.
    That is rare, so the option is set only after such a failure (a failed bind leaves the
    socket unbound), not on every onward socket."""
    if bind(fd, <sockaddr *>source, sizeof(sockaddr_in6)) == 0:
        return 0
    if errno != EADDRINUSE:
        return errno
    cdef int err = set_flag(fd, SOL_SOCKET, SO_REUSEPORT)
    if err:
        return err
    if bind(fd, <sockaddr *>source, sizeof(sockaddr_in6)) < 0:
        return errno
    return 0


def connect_onward(bytes client_addr not None, uint16_t client_port,
                   bytes dest_addr not None, uint16_t dest_port, bytes rthdr):
    """Step 4 of a flow: a socket that looks like the client, starting a non-blocking
    connect to the destination. rthdr is the routing header (SRH) to send with, or None.

    Returns the descriptor (non-blocking, close-on-exec); the connect completes later (the
    relay checks SO_ERROR). On any failure the socket is closed and OSError raised.
    Keepalive is not set here: the relay arms it on flows that last (RelayLoop.set_keepalive).
    """
    cdef sockaddr_in6 source, dest
    cdef linger lg
    cdef int fd, err = 0
    fill_address(&source, client_addr, client_port)
    fill_address(&dest, dest_addr, dest_port)
    fd = socket(AF_INET6, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if fd < 0:
        raise_errno(errno)
    # Binding a foreign address (the client's) needs IPV6_TRANSPARENT.
    err = set_flag(fd, IPPROTO_IPV6, IPV6_TRANSPARENT)
    if not err:
        err = set_flag(fd, SOL_SOCKET, SO_REUSEADDR)
    if not err:
        err = set_flag(fd, IPPROTO_TCP, TCP_NODELAY)
    if not err:
        # As on the listener (accepted sockets inherit it): if the worker dies mid-flow,
        # the kernel resets this connection rather than closing it with a FIN the server
        # would take for the client's end. The relay turns it off for a graceful close.
        lg.l_onoff = 1
        lg.l_linger = 0
        if setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg)) < 0:
            err = errno
    if not err:
        err = bind_source(fd, &source)
    # The remaining segments: the kernel puts this SRH on every packet of the connection.
    if not err and rthdr is not None and setsockopt(
            fd, IPPROTO_IPV6, IPV6_RTHDR, PyBytes_AS_STRING(rthdr),
            <socklen_t>PyBytes_GET_SIZE(rthdr)) < 0:
        err = errno
    if not err and connect(fd, <sockaddr *>&dest, sizeof(dest)) < 0 and errno != EINPROGRESS:
        err = errno
    if err:
        close(fd)
        raise_errno(err)
    return fd


def saved_syn(int fd, size_t maxlen=1024):
    """The kernel's copy of the SYN's network and TCP headers (listener with TCP_SAVE_SYN),
    read once: b"" when there is none (SYN cookies, or already read). Raises OSError
    (EINVAL, the kernel's answer) when they are longer than maxlen. Called on an SRH table
    miss."""
    cdef bytes buffer = PyBytes_FromStringAndSize(NULL, maxlen)
    cdef socklen_t length = <socklen_t>maxlen
    if getsockopt(fd, IPPROTO_TCP, TCP_SAVED_SYN, PyBytes_AS_STRING(buffer), &length) < 0:
        raise_errno(errno)
    if length == maxlen:
        return buffer
    return PyBytes_FromStringAndSize(PyBytes_AS_STRING(buffer), length)


def reset_and_close(int fd):
    """Closes fd so that the peer gets an RST at once (SO_LINGER {1, 0}), not a FIN: for
    connections the worker refuses. Raises OSError only for EBADF."""
    close_with_reset(fd)


def close_fd(int fd):
    """Closes fd normally. Raises OSError only for EBADF."""
    close_checked(fd)
