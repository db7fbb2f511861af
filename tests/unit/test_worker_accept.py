"""Worker.accept_burst and Worker.open_flow over loopback sockets, with a fake SRH table
and a fake relay: which counters move, what the relay is handed, and that a refused
connection is reset with no descriptor left open. (tests/e2e runs the same code through
TPROXY and SRv6.)"""
from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
from contextlib import closing

import pytest

from srv6pipes import _sockops
from srv6pipes.config import build_config
from srv6pipes.srh import SRH
from srv6pipes.worker import Worker, make_listener

from tests.support.loopback import free_port, open_descriptors

LOCATOR = "fc00:1::/80"
LOOPBACK = socket.inet_pton(socket.AF_INET6, "::1")
SERVER = "fd00:5::1"
XOR = 1
TIMEOUT = 5.0

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="onward sockets set IPV6_TRANSPARENT (CAP_NET_ADMIN)")


class Counters:
    def __init__(self):
        self.values = {}

    def add(self, name, amount=1):
        self.values[name] = self.values.get(name, 0) + amount


class Table:
    """The SRH table's lookup(), answering one entry for any key; records the keys."""

    def __init__(self, entry):
        self.entry = entry
        self.keys = []

    def lookup(self, *key):
        self.keys.append(key)
        return self.entry


class Relay:
    """Records add_flow calls; the test closes the descriptors it was given."""

    def __init__(self):
        self.flows = []

    def add_flow(self, client_fd, server_fd, *function):
        self.flows.append((client_fd, server_fd, function))


def make_worker(entry) -> Worker:
    worker = Worker(0, build_config({"locator": LOCATOR}), None, Table(entry), Counters())
    worker.relay = Relay()
    return worker


def table_entry(function_id: int):
    srh = SRH.from_path([make_worker(None).plan.encode(function_id, 42), SERVER])
    return (1, srh.to_bytes())


def listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.bind(("::1", 0))
    sock.listen(8)
    sock.setblocking(False)
    return sock


def connect(listen: socket.socket) -> socket.socket:
    """A client connection to listen, once it is in the accept queue."""
    client = socket.create_connection(("::1", listen.getsockname()[1]), timeout=TIMEOUT)
    assert select.select([listen], [], [], TIMEOUT)[0]
    return client




def assert_reset(client: socket.socket) -> None:
    with pytest.raises(ConnectionResetError):
        client.recv(16)


def test_a_refused_connection_is_counted_logged_with_its_address_and_reset(caplog):
    worker = make_worker(None)  # table miss, and the listener keeps no SYN: no_srh
    with closing(listener()) as listen:
        worker.listener = listen
        with closing(connect(listen)) as client:
            client_port, listen_port = client.getsockname()[1], listen.getsockname()[1]
            before = open_descriptors()
            with caplog.at_level(logging.WARNING, "srv6pipes.worker"):
                worker.accept_burst()
            assert open_descriptors() == before
            assert_reset(client)
    assert worker.stats.values == {"accepted": 1, "table_misses": 1, "no_srh": 1}
    assert f"reset ::1:{client_port} -> no_srh" in caplog.text
    assert worker.relay.flows == []
    (key,) = worker.srh_table.keys
    assert key == (LOOPBACK, client_port, LOOPBACK, listen_port)


def test_accepted_sockets_take_the_worker_listeners_options():
    """accept_connection sets no option: TCP_NODELAY, SO_LINGER {1, 0} and keepalive of a
    connection the worker accepts come from its listener (make_listener), which the kernel
    copies into every accepted socket."""
    with closing(make_listener(free_port(), (60, 10, 6))) as listen:
        with closing(connect(listen)):
            fd = _sockops.accept_connection(listen.fileno())[0]
            with closing(socket.socket(fileno=fd)) as accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
                assert struct.unpack("ii", accepted.getsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, 8)) == (1, 0)
                assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert [accepted.getsockopt(socket.IPPROTO_TCP, option) for option in (
                    socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT)] == [60, 10, 6]


def test_a_failed_onward_connection_is_counted_and_both_sides_closed(caplog):
    # On loopback the client's own socket holds the address the onward socket binds.
    worker = make_worker(table_entry(XOR))
    with closing(listener()) as listen:
        worker.listener = listen
        with closing(connect(listen)) as client:
            before = open_descriptors()
            with caplog.at_level(logging.WARNING, "srv6pipes.worker"):
                worker.accept_burst()
            assert open_descriptors() == before
            assert_reset(client)
    assert worker.stats.values == {"accepted": 1, "table_hits": 1, "onward_failed": 1}
    assert f"onward connection failed: [Errno {errno.EADDRINUSE}]" in caplog.text


def test_an_empty_queue_ends_the_burst_without_counting():
    worker = make_worker(None)
    with closing(listener()) as listen:
        worker.listener = listen
        worker.accept_burst()
    assert worker.stats.values == {}


@pytest.mark.parametrize("function_id", [0, XOR], ids=["identity", "xor"])
def test_open_flow_hands_both_descriptors_and_the_binary_flow_to_the_relay(function_id):
    worker = make_worker(table_entry(function_id))
    function = worker.registry.by_id(function_id)
    with closing(listener()) as front, closing(listener()) as backend:
        with closing(connect(front)):
            fd = _sockops.accept_connection(front.fileno())[0]
            # As if a client at ::1:source_port had connected to the backend.
            source_port, backend_port = free_port(), backend.getsockname()[1]
            worker.open_flow(fd, LOOPBACK, source_port, LOOPBACK, backend_port)
            (client_fd, server_fd, args), = worker.relay.flows
            try:
                assert client_fd == fd
                if function_id == XOR:  # spawn gets the addresses as 16 bytes
                    flow = (LOOPBACK, source_port, LOOPBACK, backend_port,
                            worker.plan.encode(XOR, 42).packed)
                    assert args == (function.slot, function.address, None, 42, flow)
                else:
                    assert args == (function.slot,)
                # The onward socket looks like the client.
                assert select.select([backend], [], [], TIMEOUT)[0]
                onward, peer_addr, peer_port, _, _ = _sockops.accept_connection(
                    backend.fileno())
                _sockops.close_fd(onward)
                assert (peer_addr, peer_port) == (LOOPBACK, source_port)
            finally:
                _sockops.close_fd(client_fd)
                _sockops.close_fd(server_fd)
    assert worker.stats.values == {"table_hits": 1}


def _exhausted_descriptors_play():
    """In a child: the process out of descriptors (RLIMIT_NOFILE lowered, the rest filled),
    a connection waiting; accept_burst must spend the spare on it, reset it, take the spare
    back. Returns what happened."""
    import resource

    worker = make_worker(None)
    worker.spare_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    listen = listener()
    worker.listener = listen
    client = connect(listen)
    client.settimeout(TIMEOUT)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    filler = []
    try:
        while True:
            filler.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as exc:
        assert exc.errno == errno.EMFILE
    worker.accept_burst()
    try:
        client.recv(16)
        outcome = "no reset"
    except ConnectionResetError:
        outcome = "reset"
    except socket.timeout:
        outcome = "timeout"
    spare_back = worker.spare_fd is not None
    for fd in filler:
        os.close(fd)
    return outcome, dict(worker.stats.values), spare_back, worker.relay.flows


def test_out_of_descriptors_resets_the_waiting_connection_and_keeps_the_spare():
    """A real EMFILE from accept(): the spare descriptor is spent on accepting the
    connection, which is reset (not left hanging in the queue), and taken back."""
    from tests.support.childrun import run_in_child

    outcome, stats, spare_back, flows = run_in_child(_exhausted_descriptors_play)
    assert outcome == "reset"
    assert stats == {"fd_exhausted": 1}
    assert spare_back and flows == []


def test_a_parked_flow_whose_onward_connect_then_fails_counts_as_failed(monkeypatch):
    """The onward tuple is busy (the flow parks), then the connect fails outright: the
    client is reset and counted once, as onward_failed, not as onward_waited too."""
    from srv6pipes import onward
    from srv6pipes.onward import TupleBusy

    answers = [TupleBusy(errno.EADDRNOTAVAIL, "busy"), OSError(errno.ECONNREFUSED, "refused")]

    def fake_connect(*args):
        raise answers.pop(0)
    monkeypatch.setattr(onward, "connect", fake_connect)
    worker = make_worker(table_entry(XOR))
    with closing(listener()) as listen:
        worker.listener = listen
        with closing(connect(listen)) as client:
            worker.accept_burst()
            assert len(worker.parked) == 1
            worker.retry_parked()
            assert worker.parked == [] and answers == []
            assert_reset(client)
    assert worker.stats.values == {"accepted": 1, "table_hits": 1, "onward_failed": 1}

