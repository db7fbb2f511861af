"""The TIME_WAIT reaper (pipes/timewait.py + cext/timewait.pyx) on real loopback sockets:
it retires exactly a TIME_WAIT socket and never touches a live connection. Needs
CAP_NET_ADMIN (sock_diag destroy)."""
import os
import socket
import time

import pytest

from srv6pipes import _timewait
from srv6pipes.timewait import TCP_TIME_WAIT, TimeWaitReaper

LOOPBACK = socket.inet_pton(socket.AF_INET6, "::1")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sock_diag destroy needs root")


@pytest.fixture
def reaper():
    reaper = TimeWaitReaper()
    yield reaper
    reaper.close()


def connected_pair():
    """(listener, client, server side): a live loopback connection."""
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.bind(("::1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname()[:2], timeout=5)
    server, _ = listener.accept()
    return listener, client, server


def tuple_of(server):
    """(local, local port, remote, remote port) of the server side, as retire() takes it."""
    local, remote = server.getsockname(), server.getpeername()
    return LOOPBACK, local[1], LOOPBACK, remote[1]


def test_a_time_wait_socket_is_retired_once(reaper):
    listener, client, server = connected_pair()
    with listener, client:
        key = tuple_of(server)
        server.close()                        # the server side closes first ...
        assert client.recv(1) == b""
        client.close()                        # ... so it ends in TIME_WAIT
        deadline = time.monotonic() + 5
        while reaper._ask(_timewait.SOCK_DIAG_BY_FAMILY, *key)[0] != TCP_TIME_WAIT:
            assert time.monotonic() < deadline, "no TIME_WAIT socket appeared"
            time.sleep(0.01)
        assert reaper.retire(*key) is True
        # Gone: the lookup now finds only the listener on that port (inet6_lookup falls
        # back to listeners), which retire() leaves alone.
        assert reaper._ask(_timewait.SOCK_DIAG_BY_FAMILY, *key)[0] == 10   # TCP_LISTEN
        assert reaper.retire(*key) is False


def test_a_live_connection_is_never_destroyed(reaper):
    listener, client, server = connected_pair()
    with listener, client, server:
        key = tuple_of(server)
        state, cookie = reaper._ask(_timewait.SOCK_DIAG_BY_FAMILY, *key)
        assert state == 1                     # TCP_ESTABLISHED
        assert reaper.retire(*key) is False
        # A destroy naming another socket's cookie finds nothing and kills nothing.
        assert reaper._ask(_timewait.SOCK_DESTROY, *key, cookie ^ 1) == (
            _timewait.NO_SOCKET, _timewait.ANY_SOCKET)
        client.sendall(b"still alive")
        assert server.recv(64) == b"still alive"
