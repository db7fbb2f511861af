"""The worker's raw-descriptor socket calls (cext/sockops.pyx) over real loopback sockets.

Every descriptor a test gets from _sockops is closed by the test (directly or through a
socket object made from it); `open_descriptors` checks that failing calls leave none open.
"""
import errno
import fcntl
import os
import select
import socket
import struct
from contextlib import closing

import pytest

from srv6pipes import _sockops
from srv6pipes.srh import SRH
from srv6pipes.system import IPV6_RTHDR, TCP_SAVE_SYN

from tests.support.loopback import free_port, open_descriptors

LOOPBACK = socket.inet_pton(socket.AF_INET6, "::1")
TIMEOUT = 5.0

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="IPV6_TRANSPARENT needs CAP_NET_ADMIN or CAP_NET_RAW")


def listener(host="::1", save_syn=False, nodelay=False) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    if save_syn:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_SAVE_SYN, 1)
    if nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, 0))
    sock.listen(8)
    sock.setblocking(False)
    return sock


def accept_when_ready(listen: socket.socket):
    """accept_connection once the listener is readable (the handshake has completed)."""
    readable, _, _ = select.select([listen], [], [], TIMEOUT)
    assert readable, "no connection arrived"
    accepted = _sockops.accept_connection(listen.fileno())
    assert accepted is not None
    return accepted




def wait_connected(fd: int) -> int:
    """SO_ERROR of a non-blocking connect once it has finished (0: connected)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    assert poller.poll(TIMEOUT * 1000), "the connect did not finish"
    with closing(socket.socket(fileno=os.dup(fd))) as view:
        return view.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


def test_accept_on_an_empty_listener_returns_none():
    with closing(listener()) as listen:
        assert _sockops.accept_connection(listen.fileno()) is None


def test_accept_raises_oserror_for_a_descriptor_that_does_not_listen():
    with closing(socket.socket(socket.AF_INET6, socket.SOCK_STREAM)) as sock:
        with pytest.raises(OSError) as raised:
            _sockops.accept_connection(sock.fileno())
    assert raised.value.errno == errno.EINVAL


def test_accept_gives_binary_addresses_host_order_ports_and_a_ready_descriptor():
    with closing(listener(nodelay=True)) as listen, closing(socket.create_connection(
            ("::1", listen.getsockname()[1]))) as client:
        fd, client_addr, client_port, dest_addr, dest_port = accept_when_ready(listen)
        with closing(socket.socket(fileno=fd)) as accepted:
            assert (client_addr, client_port) == (LOOPBACK, client.getsockname()[1])
            assert (dest_addr, dest_port) == (LOOPBACK, listen.getsockname()[1])
            assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            # Not set per connection: inherited from the listener (the worker's sets it,
            # tests/unit/test_worker_accept.py).
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            client.sendall(b"ping")
            assert select.select([fd], [], [], TIMEOUT)[0]
            assert accepted.recv(16) == b"ping"


def test_accept_sets_no_option_of_its_own():
    """TCP_NODELAY and SO_LINGER come from the listener only (one setsockopt less per
    connection): from a plain listener, the accepted socket has neither."""
    with closing(listener()) as listen, closing(socket.create_connection(
            ("::1", listen.getsockname()[1]))):
        fd = accept_when_ready(listen)[0]
        with closing(socket.socket(fileno=fd)) as accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
            assert struct.unpack("ii", accepted.getsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, 8)) == (0, 0)


def test_accept_of_an_ipv4_client_gives_its_mapped_address():
    # pipesd's listener is dual-stack: IPv4 clients arrive as ::ffff:a.b.c.d.
    with closing(listener("::")) as listen, closing(socket.create_connection(
            ("127.0.0.1", listen.getsockname()[1]))) as client:
        fd, client_addr, client_port, dest_addr, _ = accept_when_ready(listen)
        _sockops.close_fd(fd)
        assert client_port == client.getsockname()[1]
    mapped = socket.inet_pton(socket.AF_INET6, "::ffff:127.0.0.1")
    assert client_addr == dest_addr == mapped


def test_reset_and_close_resets_the_peer():
    with closing(listener()) as listen, closing(socket.create_connection(
            ("::1", listen.getsockname()[1]))) as client:
        fd = accept_when_ready(listen)[0]
        _sockops.reset_and_close(fd)
        client.settimeout(TIMEOUT)
        with pytest.raises(ConnectionResetError):
            client.recv(16)


def test_close_fd_sends_a_fin_and_refuses_a_closed_descriptor():
    with closing(listener()) as listen, closing(socket.create_connection(
            ("::1", listen.getsockname()[1]))) as client:
        fd = accept_when_ready(listen)[0]
        _sockops.close_fd(fd)
        client.settimeout(TIMEOUT)
        assert client.recv(16) == b""
    fd = os.open("/dev/null", os.O_RDONLY)
    _sockops.close_fd(fd)
    with pytest.raises(OSError) as raised:
        _sockops.reset_and_close(fd)
    assert raised.value.errno == errno.EBADF


def test_saved_syn_returns_the_syn_headers_once():
    with closing(listener(save_syn=True)) as listen, closing(socket.create_connection(
            ("::1", listen.getsockname()[1]))) as client:
        fd = accept_when_ready(listen)[0]
        try:
            syn = _sockops.saved_syn(fd)
            assert syn[0] >> 4 == 6 and syn[6] == socket.IPPROTO_TCP
            assert syn[8:24] == LOOPBACK and syn[24:40] == LOOPBACK
            sport, dport = struct.unpack("!HH", syn[40:44])
            assert (sport, dport) == (client.getsockname()[1], listen.getsockname()[1])
            assert syn[40 + 13] & 0x12 == 0x02  # SYN without ACK
            assert len(syn) == 40 + (syn[40 + 12] >> 4) * 4
            assert _sockops.saved_syn(fd) == b""  # the kernel frees it once read
        finally:
            _sockops.close_fd(fd)


def test_saved_syn_is_empty_without_tcp_save_syn_and_refuses_a_short_buffer():
    with closing(listener()) as plain, closing(socket.create_connection(
            ("::1", plain.getsockname()[1]))):
        fd = accept_when_ready(plain)[0]
        assert _sockops.saved_syn(fd) == b""
        _sockops.close_fd(fd)
    with closing(listener(save_syn=True)) as saving, closing(socket.create_connection(
            ("::1", saving.getsockname()[1]))):
        fd = accept_when_ready(saving)[0]
        with pytest.raises(OSError) as raised:
            _sockops.saved_syn(fd, 20)
        _sockops.close_fd(fd)
    assert raised.value.errno == errno.EINVAL  # the kernel's answer to a short buffer


@needs_root
def test_connect_onward_binds_the_client_address_and_connects():
    client_port = free_port()
    with closing(listener()) as server:
        fd = _sockops.connect_onward(LOOPBACK, client_port, LOOPBACK,
                                     server.getsockname()[1], None)
        try:
            assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert wait_connected(fd) == 0
            accepted = accept_when_ready(server)
            _sockops.close_fd(accepted[0])
            assert accepted[1:3] == (LOOPBACK, client_port)
            with closing(socket.socket(fileno=os.dup(fd))) as view:
                assert view.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
                # Only for a client port the worker's listeners hold (test below).
                assert view.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
                # A worker that dies resets this connection instead of closing it.
                assert struct.unpack("ii", view.getsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, 8)) == (1, 0)
        finally:
            _sockops.close_fd(fd)


@needs_root
def test_connect_onward_binds_a_client_port_equal_to_the_listeners_port():
    """The worker's listeners hold [::]:port with SO_REUSEPORT; a client whose own port is
    that port still gets its onward socket: it joins their SO_REUSEPORT group."""
    with closing(socket.socket(socket.AF_INET6, socket.SOCK_STREAM)) as proxy, \
            closing(listener()) as server:
        proxy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        proxy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        proxy.bind(("::", 0))
        proxy.listen(8)
        port = proxy.getsockname()[1]
        fd = _sockops.connect_onward(LOOPBACK, port, LOOPBACK, server.getsockname()[1], None)
        try:
            assert wait_connected(fd) == 0
            accepted = accept_when_ready(server)
            _sockops.close_fd(accepted[0])
            assert accepted[1:3] == (LOOPBACK, port)
            with closing(socket.socket(fileno=os.dup(fd))) as view:
                assert view.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        finally:
            _sockops.close_fd(fd)


@needs_root
def test_connect_onward_sets_the_routing_header():
    rthdr = SRH.from_path(["::1", "::1"]).to_bytes()
    with closing(listener()) as server:
        fd = _sockops.connect_onward(LOOPBACK, free_port(), LOOPBACK,
                                     server.getsockname()[1], rthdr)
        try:
            with closing(socket.socket(fileno=os.dup(fd))) as view:
                assert view.getsockopt(socket.IPPROTO_IPV6, IPV6_RTHDR, 256) == rthdr
        finally:
            _sockops.close_fd(fd)


@needs_root
def test_connect_onward_to_a_closed_port_fails():
    # Non-blocking: the refusal may come back from connect() itself or later in SO_ERROR.
    try:
        fd = _sockops.connect_onward(LOOPBACK, free_port(), LOOPBACK, free_port(), None)
    except ConnectionRefusedError:
        return
    try:
        assert wait_connected(fd) == errno.ECONNREFUSED
    finally:
        _sockops.close_fd(fd)


@needs_root
@pytest.mark.parametrize("rthdr, expected", [
    (b"\x00\x00\x00", errno.EINVAL),  # not a routing header: setsockopt refuses it
    (None, errno.EADDRINUSE),         # the client's port is taken (by a plain listener)
])
def test_connect_onward_closes_its_socket_when_a_step_fails(rthdr, expected):
    with closing(listener()) as taken:
        before = open_descriptors()
        with pytest.raises(OSError) as raised:
            _sockops.connect_onward(LOOPBACK, taken.getsockname()[1] if rthdr is None
                                    else free_port(), LOOPBACK, free_port(), rthdr)
        assert raised.value.errno == expected
        assert open_descriptors() == before


def test_connect_onward_checks_its_arguments():
    with pytest.raises(ValueError):
        _sockops.connect_onward(b"\x00" * 4, 1, LOOPBACK, 2, None)
    with pytest.raises(OverflowError):
        _sockops.connect_onward(LOOPBACK, 65536, LOOPBACK, 2, None)
    with pytest.raises(TypeError):
        _sockops.connect_onward(None, 1, LOOPBACK, 2, None)


@needs_root
def test_connect_onward_sets_no_keepalive():
    """The relay arms it once the flow lasts (test_relay.py
    test_the_server_sockets_keepalive_is_armed_once_the_flow_lasts)."""
    with closing(listener()) as server:
        fd = _sockops.connect_onward(LOOPBACK, free_port(), LOOPBACK, server.getsockname()[1],
                                     None)
        try:
            with closing(socket.socket(fileno=os.dup(fd))) as view:
                assert view.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        finally:
            _sockops.close_fd(fd)
