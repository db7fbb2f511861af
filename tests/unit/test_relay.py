"""The relay loop (cext/relay.pyx) over real loopback sockets.

Topology of every test:  client --::1--> [listener, RelayLoop] --127.0.0.1--> backend.
`Proxy` plays the worker: one thread calls `loop.poll(50)` (the GIL is released inside),
accepts when the listener is readable, connects onward without blocking and hands both
descriptors to `add_flow`. Every transfer test runs the three relay paths: splice (identity),
in place (the built-in C xor) and stream (a Python function that consumes random partial
lengths, so the input/output buffer bookkeeping is shaken on every call). `Backend` is a selector-driven server in its own thread whose
connections are `Peer`s; clients are `Peer`s driven by `run_peers` in the test thread, or
plain blocking sockets. Every wait is bounded by a deadline.
"""
import contextlib
import errno
import hashlib
import os
import queue
import random
import resource
import selectors
import socket
import struct
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from srv6pipes import _relay, _vf, vfapi

N = len(_relay.FUNCTION_COUNTERS)
INDEX = {name: i for i, name in enumerate(_relay.FUNCTION_COUNTERS)}
KEY = 0x5A
MODES = ["splice", "xor", "stream"]
MIB = 1 << 20
READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
XOR = next(d["address"] for d in _vf.BUILTIN_FUNCTIONS if d["name"] == "xor")
FLOW = (bytes(16), 1, bytes(16), 2, bytes(16))


def choppy_process(rng, direction, data, eof):
    """Identity that takes a random part of what it is offered (all of it at EOF)."""
    take = len(data) if eof else rng.randint(1, len(data)) if data else 0
    return take, data[:take]


CHOPPY = vfapi.Function(0x7E00, "choppy", choppy_process,
                        spawn=lambda params, flow: random.Random(params))


def function_args(mode, key=KEY):
    """add_flow keyword arguments that select the relay path of mode."""
    if mode == "xor":
        return {"function": XOR, "params": key, "flow": FLOW}
    if mode == "stream":
        return {"pyfunction": CHOPPY, "params": key, "flow": FLOW}
    if isinstance(mode, vfapi.Function):
        return {"pyfunction": mode, "params": key, "flow": FLOW}
    return {}


def transformed(data, mode):
    """What the relay must deliver for `data` (reference xor via a translation table)."""
    if mode == "xor":
        return data.translate(bytes(i ^ KEY for i in range(256)))
    return data


def sha(data):
    return hashlib.sha256(data).hexdigest()


def wait_until(predicate, timeout=10.0, interval=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def reset_close(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def expect_reset(proxy):
    """Connects through a proxy that must reset the connection. The RST can beat connect()
    back to user space (loopback is that fast), so either call may report it."""
    with pytest.raises(ConnectionResetError):
        with proxy.connect(timeout=5) as sock:
            sock.recv(100)


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- endpoints ---------------------------------------------------------------------------------
class Peer:
    """A nonblocking TCP endpoint: sends `payload` then shuts down its write side, reads until
    EOF hashing what arrives, and closes once both are done.

    echo: send back what arrives instead of a payload. send_after_eof: start sending only
    after EOF (request/response). hold: never shut down nor close (the test does).
    rst_after: reset the connection once that many bytes have arrived.
    """

    def __init__(self, sock, payload=b"", *, echo=False, send_after_eof=False, hold=False,
                 rst_after=None):
        sock.setblocking(False)
        self.sock = sock
        self.out = memoryview(payload)
        self.sent = 0
        self.echo = echo
        self.echo_buf = bytearray()
        self.send_after_eof = send_after_eof
        self.hold = hold
        self.rst_after = rst_after
        self.hash = hashlib.sha256()
        self.received = 0
        self.eof = False
        self.shut = False
        self.closed = False
        self.error = None

    def has_output(self):
        if self.echo:
            return bool(self.echo_buf)
        if self.send_after_eof and not self.eof:
            return False
        return self.sent < len(self.out)

    def wanted(self):
        if self.closed:
            return 0
        events = 0 if self.eof else READ
        if self.has_output():
            events |= WRITE
        return events

    @property
    def digest(self):
        return self.hash.hexdigest()

    def handle(self, events, scratch):
        try:
            if events & READ:
                self._read(scratch)
            if not self.closed:
                self._write()
                self._maybe_finish()
        except OSError as exc:
            self.error = exc.errno
            self.close()

    def _read(self, scratch):
        for _ in range(64):  # bounded: a fast sender must not starve the other peers
            try:
                n = self.sock.recv_into(scratch)
            except BlockingIOError:
                return
            if n == 0:
                self.eof = True
                return
            chunk = scratch[:n]
            self.hash.update(chunk)
            self.received += n
            if self.echo:
                self.echo_buf += chunk
            if self.rst_after is not None and self.received >= self.rst_after:
                self.close(rst=True)
                return

    def _write(self):
        for _ in range(64):
            if not self.has_output():
                return
            try:
                if self.echo:
                    n = self.sock.send(self.echo_buf)
                    del self.echo_buf[:n]
                else:
                    n = self.sock.send(self.out[self.sent:self.sent + MIB])
                    self.sent += n
            except BlockingIOError:
                return

    def _maybe_finish(self):
        if self.hold or self.has_output():
            return
        if not self.shut and (self.eof or not (self.echo or self.send_after_eof)):
            self.sock.shutdown(socket.SHUT_WR)
            self.shut = True
        if self.shut and self.eof:
            self.close()

    def close(self, rst=False):
        """Marks the peer finished; its reactor unregisters and closes the socket."""
        if not self.closed:
            self.closed = True
            if rst:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class Reactor:
    """Drives Peers with one selector; only ever touched by one thread at a time."""

    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self.scratch = bytearray(256 * 1024)
        self.registered = {}
        self.peers = []

    def add(self, peer):
        self.peers.append(peer)
        peer.handle(0, self.scratch)  # starts sending (or FINs an empty payload) at once
        events = peer.wanted()
        if events:
            self.selector.register(peer.sock, events, peer)
            self.registered[peer] = events
        elif peer.closed:
            peer.sock.close()

    def update(self, peer):
        events = peer.wanted()
        old = self.registered.get(peer)
        if events != old:
            if events:
                self.selector.modify(peer.sock, events, peer)
                self.registered[peer] = events
            else:  # finished, or holding its socket open with nothing left to do
                self.selector.unregister(peer.sock)
                del self.registered[peer]
        if peer.closed:
            peer.sock.close()

    def turn(self, timeout):
        for key, events in self.selector.select(timeout):
            if isinstance(key.data, Peer):
                key.data.handle(events, self.scratch)
                self.update(key.data)
            else:
                key.data(events)

    def close(self):
        """Closes every socket still open, including holding peers."""
        for peer in self.peers:
            peer.closed = True
            peer.sock.close()
        self.selector.close()


def run_peers(peers, timeout=30.0):
    """Runs client Peers in this thread until each has finished (or holds with EOF seen)."""
    reactor = Reactor()
    for peer in peers:
        reactor.add(peer)
    deadline = time.monotonic() + timeout
    try:
        while reactor.registered:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(reactor.registered)} peers unfinished after {timeout}s")
            reactor.turn(0.1)
    finally:
        reactor.close()


class Backend:
    """The server side: accepts on 127.0.0.1 and serves each connection with make_peer(sock)."""

    def __init__(self, make_peer):
        self.make_peer = make_peer
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4096)
        self.listener.setblocking(False)
        self.address = self.listener.getsockname()
        self.peers = []
        self.failure = None
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="backend", daemon=True)
        self.thread.start()

    def _accept(self, events):
        for _ in range(256):
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            peer = self.make_peer(sock)
            self.peers.append(peer)
            self.reactor.add(peer)

    def _run(self):
        self.reactor = Reactor()
        self.reactor.selector.register(self.listener, READ, self._accept)
        try:
            while not self.stop_event.is_set():
                self.reactor.turn(0.05)
        except BaseException as exc:  # surfaced by close()
            self.failure = exc
        finally:
            self.reactor.close()

    def wait_peers(self, count, timeout=30.0, done=lambda peer: peer.closed):
        assert wait_until(lambda: len(self.peers) >= count
                          and all(done(peer) for peer in list(self.peers)[:count]), timeout), \
            f"backend: {len(self.peers)} peers, not all done"
        return self.peers[:count]

    def close(self):
        self.stop_event.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.listener.close()
        if self.failure is not None:
            raise self.failure


class Proxy:
    """A worker in miniature: a RelayLoop polled by one thread, which also accepts."""

    def __init__(self, target, mode, *, key=None, slot=0, nslots=2, max_flows=4096,
                 buffer_size=65536, pipe_size=1 << 20, connecting=True, server_rcvbuf=None,
                 watch_servers=False):
        self.target = target
        # watch_servers: (time handed over, a dup of the server socket) per flow, to look at
        # the socket the relay owns (the dup keeps it open: the test closes them).
        self.servers = [] if watch_servers else None
        self.mode = mode
        self.key = KEY if key is None else key
        self.slot = slot
        self.connecting = connecting
        self.server_rcvbuf = server_rcvbuf
        self.listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        self.listener.bind(("::1", 0))
        self.listener.listen(4096)
        self.listener.setblocking(False)
        self.address = self.listener.getsockname()[:2]
        self.words = memoryview(bytearray(nslots * N * 8)).cast("Q")
        self.loop = _relay.RelayLoop(self.listener.fileno(), self.words, nslots, max_flows,
                                     buffer_size, pipe_size)
        self.calls = queue.Queue()
        self.failure = None
        self.polls = 0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="relay", daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while not self.stop_event.is_set():
                if self.loop.poll(50) & _relay.LISTENER_READY:
                    self._accept()
                self.polls += 1
                while not self.calls.empty():
                    self.calls.get_nowait()()
        except BaseException as exc:  # surfaced by close()
            self.failure = exc

    def _accept(self):
        for _ in range(256):
            try:
                client, _ = self.listener.accept()
            except BlockingIOError:
                return
            client.setblocking(False)
            server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if self.server_rcvbuf:
                server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.server_rcvbuf)
            if self.connecting:
                server.setblocking(False)
                server.connect_ex(self.target)
            else:
                server.connect(self.target)
                server.setblocking(False)
            if self.servers is not None:
                self.servers.append((time.monotonic(), server.dup()))
            self.loop.add_flow(client.detach(), server.detach(), self.slot,
                               connecting=self.connecting, **function_args(self.mode, self.key))

    def call(self, function, timeout=10.0):
        """Runs function(loop) in the relay thread (the loop is single-threaded)."""
        done = queue.Queue()

        def run():
            try:
                done.put((True, function(self.loop)))
            except BaseException as exc:
                done.put((False, exc))
        self.calls.put(run)
        ok, value = done.get(timeout=timeout)
        if not ok:
            raise value
        return value

    def counter(self, name, slot=None):
        return self.words[(self.slot if slot is None else slot) * N + INDEX[name]]

    def connect(self, timeout=10.0):
        sock = socket.create_connection(self.address, timeout=timeout)
        return sock

    def close(self):
        self.stop_event.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.loop.shutdown(True)
        self.loop.close()
        self.listener.close()
        self.words.release()
        if self.failure is not None:
            raise self.failure


@pytest.fixture
def env():
    """Builds backends and proxies and tears them down (and checks them) after the test."""
    made = []

    class Env:
        def backend(self, make_peer):
            made.append(Backend(make_peer))
            return made[-1]

        def proxy(self, target, mode, **kwargs):
            made.append(Proxy(target, mode, **kwargs))
            return made[-1]

    yield Env()
    for thing in reversed(made):
        thing.close()


def check_counters(proxy, flows, closed=None, reset=0, connect_failed=0):
    assert wait_until(lambda: proxy.loop.active_flows == 0)
    assert proxy.counter("flows_started") == flows
    assert proxy.counter("flows_active") == 0
    assert proxy.counter("flows_closed") == (flows - reset - connect_failed
                                             if closed is None else closed)
    assert proxy.counter("flows_reset") == reset
    assert proxy.counter("connect_failed") == connect_failed


# -- construction ------------------------------------------------------------------------------
def test_counter_names():
    assert _relay.FUNCTION_COUNTERS[:8] == (
        "flows_started", "flows_active", "flows_closed", "flows_reset", "connect_failed",
        "bytes_up", "bytes_down", "splice_fallbacks")
    assert len(set(_relay.FUNCTION_COUNTERS)) == N


def test_constructor_checks_the_counters_buffer():
    with socket.socket(socket.AF_INET6) as listener:
        listener.bind(("::1", 0))
        listener.listen()
        with pytest.raises(ValueError):
            _relay.RelayLoop(listener.fileno(), bytearray(3 * N * 8 - 8), 3)
        with pytest.raises((TypeError, BufferError)):
            _relay.RelayLoop(listener.fileno(), bytes(3 * N * 8), 3)
        words = memoryview(bytearray(3 * N * 8)).cast("Q")
        loop = _relay.RelayLoop(listener.fileno(), words, 3, max_flows=8)
        assert loop.active_flows == 0
        assert loop.poll(0) == 0
        loop.close()
        loop.close()  # idempotent
        with pytest.raises(ValueError):
            loop.poll(0)
        words.release()  # close() gave the buffer back


def test_bad_slot_raises_and_closes_both_descriptors():
    with socket.socket(socket.AF_INET6) as listener:
        listener.bind(("::1", 0))
        listener.listen()
        words = bytearray(N * 8)
        loop = _relay.RelayLoop(listener.fileno(), words, 1, max_flows=8)
        before = open_fds()
        a, b = socket.socketpair()
        with pytest.raises(ValueError):
            loop.add_flow(a.detach(), b.detach(), 1, connecting=False)
        c, d = socket.socketpair()
        with pytest.raises(ValueError):  # a function needs the flow's addresses
            loop.add_flow(c.detach(), d.detach(), 0, function=XOR, connecting=False)
        assert open_fds() == before
        loop.close()


# -- transfers ---------------------------------------------------------------------------------
SIZES = [0, 1, 1000, 65535, MIB]


def transfer_both_ways(env, mode, size, **proxy_kwargs):
    """Client and server each send `size` random bytes at the same time, then FIN."""
    up, down = os.urandom(size), os.urandom(size)
    backend = env.backend(lambda sock: Peer(sock, down))
    proxy = env.proxy(backend.address, mode, **proxy_kwargs)
    client = Peer(proxy.connect(), up)
    run_peers([client], timeout=120)
    (server,) = backend.wait_peers(1)
    assert client.error is None and server.error is None
    assert (server.received, client.received) == (size, size)
    assert server.digest == sha(transformed(up, mode))
    assert client.digest == sha(transformed(down, mode))
    check_counters(proxy, 1)
    assert proxy.counter("bytes_up") == size
    assert proxy.counter("bytes_down") == size
    return proxy


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", MODES)
def test_both_directions_arrive_intact(env, mode, size):
    proxy = transfer_both_ways(env, mode, size)
    assert proxy.counter("splice_fallbacks") == 0
    if mode != "splice" or size <= 1000:
        # Functions never splice; identity keeps small exchanges on the buffer path.
        assert proxy.counter("splice_switches") == 0


def test_identity_moves_bulk_directions_to_splice(env):
    """8 MiB each way is bulk: both directions leave the buffer path for a pipe."""
    proxy = transfer_both_ways(env, "splice", 8 * MIB)
    assert proxy.counter("splice_switches") == 2


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_64_mib_both_directions(env, mode):
    transfer_both_ways(env, mode, 64 * MIB)


@pytest.mark.parametrize("mode", MODES)
def test_tiny_buffers_and_pipes_keep_the_stream_intact(env, mode):
    # 64-byte buffers / one-page pipes: many partial reads and writes per chunk.
    transfer_both_ways(env, mode, 300_000, buffer_size=64, pipe_size=4096)


def test_xor_key_uses_the_low_byte_and_zero_is_identity(env):
    for key, expected_up in ((0, b"ping"), (0x120, bytes(b ^ 0x20 for b in b"ping"))):
        backend = env.backend(lambda sock: Peer(sock, b"pong"))
        proxy = env.proxy(backend.address, "xor", key=key)
        client = Peer(proxy.connect(), b"ping")
        run_peers([client])
        (server,) = backend.wait_peers(1)
        assert server.digest == sha(expected_up)
        assert client.digest == sha(bytes(b ^ (key & 0xFF) for b in b"pong"))


@pytest.mark.parametrize("mode", MODES)
def test_server_socket_already_connected(env, mode):
    transfer_both_ways(env, mode, 100_000, connecting=False)


@pytest.mark.parametrize("mode", MODES)
def test_chaos_writer_with_random_partial_lengths(env, mode):
    """Random chunk sizes and pauses from both ends (HAProxy's 'random forwarding' idea)."""
    rng = random.Random(1234)
    up, down = os.urandom(200_000), os.urandom(200_000)
    received = {}

    def serve(sock):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        got = bytearray()

        def reader():
            while chunk := sock.recv(rng.randint(1, 5000)):
                got.extend(chunk)
        thread = threading.Thread(target=reader)
        thread.start()
        chaos_send(sock, down, random_state=7)
        sock.shutdown(socket.SHUT_WR)
        thread.join(30)
        received["server"] = bytes(got)
        sock.close()

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        proxy = env.proxy(listener.getsockname(), mode)
        client = proxy.connect()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock, _ = listener.accept()
        sock.settimeout(30)
        server_thread = threading.Thread(target=serve, args=(sock,))
        server_thread.start()
        got = bytearray()

        def reader():
            while chunk := client.recv(rng.randint(1, 7000)):
                got.extend(chunk)
        read_thread = threading.Thread(target=reader)
        read_thread.start()
        chaos_send(client, up, random_state=8)
        client.shutdown(socket.SHUT_WR)
        read_thread.join(30)
        server_thread.join(30)
        client.close()
    assert received["server"] == transformed(up, mode)
    assert bytes(got) == transformed(down, mode)
    check_counters(proxy, 1)


def chaos_send(sock, data, random_state):
    rng = random.Random(random_state)
    view = memoryview(data)
    offset = 0
    while offset < len(view):
        n = rng.choice((1, 2, 7, 100, 1500, 4096, 65536))
        sock.sendall(view[offset:offset + n])
        offset += n
        if rng.random() < 0.02:
            time.sleep(0.001)


# -- half-close --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_half_close_client_still_receives_the_whole_reply(env, mode):
    request, reply = os.urandom(5000), os.urandom(3 * MIB)
    backend = env.backend(lambda sock: Peer(sock, reply, send_after_eof=True))
    proxy = env.proxy(backend.address, mode)
    sock = proxy.connect()
    sock.sendall(request)
    sock.shutdown(socket.SHUT_WR)
    client = Peer(sock)  # sends nothing more, reads until EOF
    client.shut = True
    run_peers([client])
    (server,) = backend.wait_peers(1)
    assert server.digest == sha(transformed(request, mode))
    assert client.received == len(reply)
    assert client.digest == sha(transformed(reply, mode))
    check_counters(proxy, 1)


@pytest.mark.parametrize("mode", MODES)
def test_half_close_by_the_server_keeps_the_upstream_flowing(env, mode):
    """The server FINs first (nothing to say); the client keeps sending for a while."""
    backend = env.backend(lambda sock: Peer(sock, b"hello"))
    proxy = env.proxy(backend.address, mode)
    sock = proxy.connect()
    received = b""
    while len(received) < 5:  # the stream path may deliver it in pieces
        received += sock.recv(100)
    assert received == transformed(b"hello", mode)
    assert sock.recv(100) == b""  # the FIN came through
    upload = os.urandom(2 * MIB)
    sock.sendall(upload)
    sock.shutdown(socket.SHUT_WR)
    (server,) = backend.wait_peers(1)
    assert server.digest == sha(transformed(upload, mode))
    sock.close()
    check_counters(proxy, 1)


# -- resets ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_server_rst_reaches_the_client_as_reset(env, mode):
    backend = env.backend(lambda sock: Peer(sock, hold=True, rst_after=4))
    proxy = env.proxy(backend.address, mode)
    with proxy.connect(timeout=5) as sock:
        sock.sendall(b"ping")
        with pytest.raises(ConnectionResetError):
            sock.recv(100)
    check_counters(proxy, 1, reset=1)


@pytest.mark.parametrize("mode", MODES)
def test_server_rst_after_data_still_resets(env, mode):
    """Bytes the server sent before its RST may be lost, but the end must be an RST."""
    def make(sock):
        return Peer(sock, os.urandom(200_000), hold=True, rst_after=1)
    backend = env.backend(make)
    proxy = env.proxy(backend.address, mode)
    with proxy.connect(timeout=5) as sock:
        sock.sendall(b"x")
        with pytest.raises(ConnectionResetError):
            for _ in range(10_000):
                if not sock.recv(65536):
                    break
    check_counters(proxy, 1, reset=1)


@pytest.mark.parametrize("mode", MODES)
def test_client_rst_reaches_the_server_as_reset(env, mode):
    backend = env.backend(lambda sock: Peer(sock, hold=True))
    proxy = env.proxy(backend.address, mode)
    sock = proxy.connect()
    sock.sendall(b"hello")
    (server,) = backend.wait_peers(1, done=lambda peer: peer.received == 5)
    reset_close(sock)
    assert wait_until(lambda: server.error is not None), "the server saw no error"
    assert server.error == errno.ECONNRESET
    assert not server.eof
    check_counters(proxy, 1, reset=1)


@pytest.mark.parametrize("mode", MODES)
def test_client_rst_after_its_fin_still_resets_the_server(env, mode):
    """The upstream is finished (FIN forwarded) and the server is silent: the RST only shows
    up as EPOLLERR, which must still become an RST towards the server."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(5)
        proxy = env.proxy(listener.getsockname(), mode)
        client = proxy.connect()
        client.sendall(b"bye")
        client.shutdown(socket.SHUT_WR)
        server, _ = listener.accept()
    with server:
        server.settimeout(5)
        received = b""
        while len(received) < 3:  # the stream path may deliver it in pieces
            received += server.recv(100)
        assert received == transformed(b"bye", mode)
        assert server.recv(100) == b""
        time.sleep(0.05)
        assert proxy.loop.active_flows == 1
        reset_close(client)
        # The server had seen the FIN (CLOSE_WAIT): the kernel reports that RST as EPIPE.
        assert wait_until(lambda: server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                          in (errno.ECONNRESET, errno.EPIPE)), "the server never got an RST"
    check_counters(proxy, 1, reset=1)


@pytest.mark.parametrize("mode", MODES)
def test_connect_failure_resets_the_client_promptly(env, mode):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed_port:
        closed_port.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
        proxy = env.proxy(closed_port.getsockname(), mode)
        start = time.monotonic()
        expect_reset(proxy)
        assert time.monotonic() - start < 2.0
        check_counters(proxy, 1, closed=0, connect_failed=1)


def test_client_gives_up_while_connecting(env):
    """The onward connect hangs (full backlog); the client resets: the flow must go away."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as stuck:
        stuck.bind(("127.0.0.1", 0))
        stuck.listen(0)
        fillers = []
        for _ in range(4):  # fill the accept queue so later SYNs are dropped
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(stuck.getsockname())
            fillers.append(filler)
        time.sleep(0.1)
        proxy = env.proxy(stuck.getsockname(), "splice")
        sock = proxy.connect()
        assert wait_until(lambda: proxy.loop.active_flows == 1)
        time.sleep(0.1)
        assert proxy.counter("flows_active") == 1, "the connect did not hang"
        reset_close(sock)
        check_counters(proxy, 1, reset=1)
        for filler in fillers:
            filler.close()


# -- timeouts ----------------------------------------------------------------------------------
def full_backlog_listener():
    """A listener whose accept queue is full: a connect to it hangs (SYNs dropped). Returns
    (listener, fillers) to close."""
    stuck = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stuck.bind(("127.0.0.1", 0))
    stuck.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(stuck.getsockname())
        fillers.append(filler)
    time.sleep(0.1)
    return stuck, fillers


def test_connect_timeout_fails_the_flow_and_resets_the_client(env):
    stuck, fillers = full_backlog_listener()
    try:
        proxy = env.proxy(stuck.getsockname(), "splice")
        proxy.call(lambda loop: loop.set_timeouts(connect=1))
        start = time.monotonic()
        expect_reset(proxy)
        assert 0.9 < time.monotonic() - start < 4
        check_counters(proxy, 1, closed=0, connect_failed=1)
        assert proxy.counter("timeouts_connect") == 1
    finally:
        stuck.close()
        for filler in fillers:
            filler.close()


@pytest.mark.parametrize("side", ["client", "server"])
def test_an_idle_side_resets_the_flow_after_its_timeout(env, side):
    backend = env.backend(lambda sock: Peer(sock, hold=True))
    proxy = env.proxy(backend.address, "splice")
    proxy.call(lambda loop: loop.set_timeouts(**{side: 1}))
    with proxy.connect() as sock:
        sock.sendall(b"hello")            # then both ends go quiet
        start = time.monotonic()
        sock.settimeout(5)
        with pytest.raises(ConnectionResetError):
            sock.recv(10)
        assert 0.9 < time.monotonic() - start < 4
    check_counters(proxy, 1, reset=1)
    assert proxy.counter(f"timeouts_{side}") == 1
    other = "server" if side == "client" else "client"
    assert proxy.counter(f"timeouts_{other}") == 0


def test_a_busy_flow_outlives_its_idle_timeouts(env):
    backend = env.backend(lambda sock: Peer(sock, echo=True))
    proxy = env.proxy(backend.address, "splice")
    proxy.call(lambda loop: loop.set_timeouts(client=1, server=1))
    with proxy.connect() as sock:
        for _ in range(12):               # 3 s of traffic every 0.25 s
            sock.sendall(b"tick")
            assert sock.recv(10) == b"tick"
            time.sleep(0.25)
    check_counters(proxy, 1)
    assert proxy.counter("timeouts_client") == proxy.counter("timeouts_server") == 0


def test_half_closed_client_side_uses_the_client_fin_timeout(env):
    """The client sent its request and FIN; the server never answers. The idle timeouts
    are long, client-fin short: the flow is reset by client-fin."""
    backend = env.backend(lambda sock: Peer(sock, hold=True))
    proxy = env.proxy(backend.address, "stream")
    proxy.call(lambda loop: loop.set_timeouts(client=60, server=60, client_fin=1))
    with proxy.connect() as sock:
        sock.sendall(b"request")
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(5)
        with pytest.raises(ConnectionResetError):
            sock.recv(10)
    check_counters(proxy, 1, reset=1)
    assert proxy.counter("timeouts_client") == 1


def keepalive_of(sock):
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE):
        return None
    return [sock.getsockopt(socket.IPPROTO_TCP, option)
            for option in (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT)]


def test_the_server_sockets_keepalive_is_armed_once_the_flow_lasts(env):
    """set_keepalive: a flow's server socket gets SO_KEEPALIVE and the three values once the
    flow is a second old (the walk runs about once a second), not before: a short
    connection never pays for them. Keepalive 0 arms nothing."""
    backend = env.backend(lambda sock: Peer(sock, hold=True))
    proxy = env.proxy(backend.address, "splice", watch_servers=True)
    proxy.call(lambda loop: loop.set_keepalive(42, 7, 3))
    try:
        with proxy.connect() as sock:
            sock.sendall(b"hello")
            assert wait_until(lambda: proxy.servers)
            handed, server = proxy.servers[0]
            assert keepalive_of(server) is None or time.monotonic() - handed >= 1
            assert wait_until(lambda: keepalive_of(server) is not None, timeout=5)
            assert time.monotonic() - handed >= 0.95
            assert keepalive_of(server) == [42, 7, 3]
        proxy.call(lambda loop: loop.set_keepalive(0, 10, 6))
        with proxy.connect() as sock:
            sock.sendall(b"hello")
            assert wait_until(lambda: len(proxy.servers) == 2)
            handed, server = proxy.servers[1]
            time.sleep(max(0.0, handed + 2.5 - time.monotonic()))   # two walks past 1 s
            assert keepalive_of(server) is None
    finally:
        for _, server in proxy.servers:
            server.close()
    with pytest.raises(ValueError):
        proxy.call(lambda loop: loop.set_keepalive(1, 0, 1))


def test_timeouts_must_not_be_negative(env):
    backend = env.backend(lambda sock: Peer(sock, echo=True))
    proxy = env.proxy(backend.address, "splice")
    with pytest.raises(ValueError):
        proxy.call(lambda loop: loop.set_timeouts(client=-1))


def test_shutdown_resets_or_closes_open_flows(env):
    backend = env.backend(lambda sock: Peer(sock, hold=True))
    for reset in (True, False):
        proxy = env.proxy(backend.address, "xor")
        socks = [proxy.connect() for _ in range(3)]
        for sock in socks:
            sock.sendall(b"x")
        assert wait_until(lambda: proxy.counter("bytes_up") == 3)
        proxy.call(lambda loop: loop.shutdown(reset))
        assert proxy.loop.active_flows == 0
        for sock in socks:
            sock.settimeout(5)
            if reset:
                with pytest.raises(ConnectionResetError):
                    sock.recv(10)
            else:
                assert sock.recv(10) == b""
            sock.close()
        check_counters(proxy, 3, closed=0 if reset else 3, reset=3 if reset else 0)


# -- splice fallback and table limits ----------------------------------------------------------
@contextlib.contextmanager
def descriptors_exhausted(spare):
    """This process's descriptor table full but for `spare` free slots (RLIMIT_NOFILE lowered
    to what is open, the rest filled with /dev/null); restored on exit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 64, hard))
    filler = []
    try:
        while True:
            try:
                filler.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                break
        for _ in range(spare):
            os.close(filler.pop())
        yield
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_splice_fallback_uses_the_buffer_path(env):
    """No descriptors left for a pipe (pipe2 fails with EMFILE): the bulk flow stays on the
    buffer path, intact, and the fallback is counted once per flow, not per direction."""
    size = 8 * MIB
    up, down = os.urandom(size), os.urandom(size)
    backend = env.backend(lambda sock: Peer(sock, down, send_after_eof=True))
    proxy = env.proxy(backend.address, "splice")
    client = Peer(proxy.connect(), up)
    assert wait_until(lambda: backend.peers and proxy.loop.active_flows == 1)
    with descriptors_exhausted(spare=1):    # run_peers' selector takes the last one
        run_peers([client], timeout=120)
        (server,) = backend.wait_peers(1)
    assert client.error is None and server.error is None
    assert server.digest == sha(up) and client.digest == sha(down)
    check_counters(proxy, 1)
    assert proxy.counter("splice_fallbacks") == 1
    assert proxy.counter("splice_switches") == 0


def test_full_table_resets_the_client_and_counts_it(env):
    backend = env.backend(lambda sock: Peer(sock))  # FINs at once, closes after the client
    proxy = env.proxy(backend.address, "splice", max_flows=2)
    kept = [proxy.connect() for _ in range(2)]
    assert wait_until(lambda: proxy.loop.active_flows == 2)
    expect_reset(proxy)
    assert proxy.counter("flows_rejected") == 1
    assert proxy.counter("flows_started") == 2
    for sock in kept:
        sock.close()
    backend.wait_peers(2)
    check_counters(proxy, 2)


def test_counters_go_to_the_flow_slot(env):
    backend = env.backend(lambda sock: Peer(sock, b"abc"))
    proxy = env.proxy(backend.address, "xor", slot=1, nslots=2)
    client = Peer(proxy.connect(), b"hello")
    run_peers([client])
    assert wait_until(lambda: proxy.loop.active_flows == 0)
    assert [proxy.counter(name, 0) for name in _relay.FUNCTION_COUNTERS] == [0] * N
    got = {name: proxy.counter(name, 1) for name in _relay.FUNCTION_COUNTERS}
    assert got == dict(dict.fromkeys(_relay.FUNCTION_COUNTERS, 0), flows_started=1,
                       flows_closed=1, bytes_up=5, bytes_down=3)


# -- scale, descriptors, memory ----------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_a_thousand_concurrent_flows(env, mode):
    flows = 1000
    backend = env.backend(lambda sock: Peer(sock, echo=True))
    proxy = env.proxy(backend.address, mode)
    payloads = [os.urandom(8192 + i) for i in range(flows)]
    socks = [proxy.connect() for _ in range(flows)]
    assert wait_until(lambda: proxy.loop.active_flows == flows, 30)
    clients = [Peer(sock, payload) for sock, payload in zip(socks, payloads)]
    run_peers(clients, timeout=120)
    servers = backend.wait_peers(flows, timeout=60)
    # Echo: the client gets its own bytes transformed twice (xor twice = identity).
    for client, payload in zip(clients, payloads):
        assert client.error is None
        assert client.digest == sha(payload)
    assert sorted(s.digest for s in servers) == sorted(sha(transformed(p, mode))
                                                        for p in payloads)
    check_counters(proxy, flows)
    assert proxy.counter("bytes_up") == proxy.counter("bytes_down") == sum(map(len, payloads))


def test_no_descriptor_leak():
    before = open_fds()
    backend = Backend(lambda sock: Peer(sock, os.urandom(20_000)))
    closed_port = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    closed_port.bind(("127.0.0.1", 0))
    try:
        for mode in MODES:
            proxy = Proxy(backend.address, mode)
            refusing = Proxy(closed_port.getsockname(), mode)
            try:
                clients = [Peer(proxy.connect(), os.urandom(30_000)) for _ in range(50)]
                run_peers(clients)
                with proxy.connect() as sock:  # the client resets in the middle
                    sock.sendall(b"x")
                    reset_close(sock)
                for _ in range(10):
                    expect_reset(refusing)
                left_open = [proxy.connect() for _ in range(5)]  # proxy.close() resets them
                assert wait_until(lambda: proxy.loop.active_flows >= 5)
            finally:
                proxy.close()
                refusing.close()
            for sock in left_open:
                sock.close()
        assert wait_until(lambda: all(peer.closed or peer.error for peer in backend.peers))
    finally:
        backend.close()
        closed_port.close()
    assert wait_until(lambda: open_fds() == before, 5), f"{open_fds() - before} fds leaked"


@pytest.mark.parametrize("mode", MODES)
def test_slow_reader_keeps_memory_bounded(env, mode):
    total = 50 * MIB
    payload = os.urandom(total)
    backend = env.backend(lambda sock: Peer(sock, payload))
    # A fixed receive buffer on the proxy's upstream socket: without it, kernel autotuning
    # (tcp_rmem max is 32 MiB here) would absorb most of the 50 MB and hide what we measure.
    proxy = env.proxy(backend.address, mode, server_rcvbuf=256 * 1024)
    sock = proxy.connect()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
    sock.shutdown(socket.SHUT_WR)
    assert wait_until(lambda: backend.peers)
    (server,) = backend.peers
    base_rss = rss_bytes()

    def settled():
        before = server.sent
        time.sleep(0.3)
        return server.sent == before and server.sent > 0
    assert wait_until(settled, 20), "the server never blocked"
    stalled_at = server.sent
    relayed = proxy.counter("bytes_down")
    grown = rss_bytes() - base_rss
    # Kernel socket buffers hold what is in flight; the proxy holds at most one buffer/pipe.
    # Kernel buffers (server send, proxy receive/send, client receive) + one buffer or pipe.
    assert stalled_at < 16 * MIB, f"the server pushed {stalled_at} bytes into a stalled path"
    assert grown < 4 * MIB, f"RSS grew by {grown} bytes while the reader stalled"
    polls = proxy.polls
    time.sleep(0.5)
    assert proxy.counter("bytes_down") == relayed  # nothing moves...
    assert proxy.polls - polls < 40, "...yet the loop spins"  # poll(50): ~10 in 0.5 s
    client = Peer(sock)
    client.shut = True
    run_peers([client], timeout=60)
    assert client.received == total
    assert client.digest == sha(transformed(payload, mode))
    check_counters(proxy, 1)


# -- pipe pool and odd inputs ------------------------------------------------------------------
def test_pipes_of_reset_flows_are_not_reused(env):
    """A flow reset while bytes sit in its pipe must not hand that pipe to the next flow."""
    def make(sock):
        if not hasattr(make, "first"):
            make.first = True
            return Peer(sock, os.urandom(4 * MIB), hold=True)  # fills the pipe, never FINs
        return Peer(sock, b"clean reply")
    backend = env.backend(make)
    proxy = env.proxy(backend.address, "splice")
    stalled = proxy.connect()  # never reads: the down pipe fills up
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    assert wait_until(lambda: backend.peers and backend.peers[0].sent > 2 * MIB)
    time.sleep(0.2)
    reset_close(stalled)
    assert wait_until(lambda: proxy.counter("flows_reset") == 1)
    for _ in range(20):  # the pool hands out pipes from here on
        client = Peer(proxy.connect(), b"hi")
        run_peers([client])
        assert client.digest == sha(b"clean reply")
    check_counters(proxy, 21, reset=1)


def test_sequential_flows_reuse_pipes_without_growing_descriptors(env):
    backend = env.backend(lambda sock: Peer(sock, b"x" * 5000))
    proxy = env.proxy(backend.address, "splice")
    counts = []
    for i in range(200):
        client = Peer(proxy.connect(), b"y" * 3000)
        run_peers([client])
        assert client.received == 5000
        if i % 50 == 49:
            backend.wait_peers(i + 1)
            assert wait_until(lambda: proxy.loop.active_flows == 0)
            counts.append(open_fds())
    assert max(counts) - min(counts) <= 2, counts
    check_counters(proxy, 200)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fin", [False, True], ids=["open", "fin"])
def test_urgent_data_neither_stalls_nor_truncates_the_flow(env, mode, fin):
    """recv() stops at TCP urgent data and splice() cannot pass it at all (it reports EAGAIN,
    or EOF when a FIN is queued). The relay must move past it; the out-of-band byte is
    dropped, as a plain recv() reader would."""
    backend = env.backend(lambda sock: Peer(sock, b"ok", hold=True))
    proxy = env.proxy(backend.address, mode)
    sock = proxy.connect()
    sock.sendall(b"a" * 1000)
    sock.send(b"!", socket.MSG_OOB)
    sock.sendall(b"b" * 1000)
    if fin:
        sock.shutdown(socket.SHUT_WR)
    (server,) = backend.wait_peers(1, done=lambda peer: peer.received >= 2000)
    assert server.digest == sha(transformed(b"a" * 1000 + b"b" * 1000, mode))
    if fin:
        assert wait_until(lambda: server.eof)
    else:
        assert not server.eof
    sock.close()


@settings(max_examples=25, deadline=None)
@given(mode=st.sampled_from(MODES),
       up=st.integers(0, 300_000), down=st.integers(0, 300_000),
       buffer_size=st.sampled_from([64, 1000, 4096, 65536]),
       pipe_size=st.sampled_from([4096, 65536, 1 << 20]),
       server_waits=st.booleans())
def test_random_sizes_buffers_and_close_orders(mode, up, down, buffer_size, pipe_size,
                                               server_waits):
    """Property: whatever the sizes, buffer/pipe sizes and who FINs first, both streams
    arrive intact and the flow closes cleanly."""
    up_data, down_data = os.urandom(up), os.urandom(down)
    backend = Backend(lambda sock: Peer(sock, down_data, send_after_eof=server_waits))
    proxy = Proxy(backend.address, mode, buffer_size=buffer_size, pipe_size=pipe_size)
    try:
        client = Peer(proxy.connect(), up_data)
        run_peers([client], timeout=60)
        (server,) = backend.wait_peers(1)
        assert server.digest == sha(transformed(up_data, mode))
        assert client.digest == sha(transformed(down_data, mode))
        check_counters(proxy, 1)
    finally:
        proxy.close()
        backend.close()


# -- functions: length changes, EOF flush, resets and errors -----------------------------------
def test_eof_flush_output_comes_before_the_fin(env):
    """A function that holds everything until EOF (then emits it reversed, plus a trailer
    larger than the buffer, handed out in bounded pieces): the FIN follows the last byte."""
    def hold_until_eof(ctx, direction, data, eof):
        ctx[direction] += data
        return (bytes(ctx[direction][::-1]) + b"T" * 100_000) if eof else b""

    function = vfapi.Function(0x7E01, "hold", hold_until_eof,
                              spawn=lambda params, flow: [bytearray(), bytearray()])
    up, down = os.urandom(300_000), os.urandom(5000)
    backend = env.backend(lambda sock: Peer(sock, down))
    proxy = env.proxy(backend.address, function, buffer_size=4096)
    client = Peer(proxy.connect(), up)
    run_peers([client], timeout=60)
    (server,) = backend.wait_peers(1)
    assert server.digest == sha(up[::-1] + b"T" * 100_000)
    assert client.digest == sha(down[::-1] + b"T" * 100_000)
    check_counters(proxy, 1)


@pytest.mark.parametrize("trigger, counter", [(ValueError("bug"), "vf_errors"),
                                              (vfapi.ResetFlow("blocked"), "vf_resets")])
def test_function_failure_resets_only_that_flow(env, trigger, counter):
    def process(ctx, direction, data, eof):
        if b"!" in data:
            raise trigger
        return data

    function = vfapi.Function(0x7E02, "fails", process)
    backend = env.backend(lambda sock: Peer(sock, echo=True))
    proxy = env.proxy(backend.address, function)
    healthy = Peer(proxy.connect(), b"fine " * 1000)
    doomed = proxy.connect()
    doomed.sendall(b"boom!")
    assert_reset(doomed)
    run_peers([healthy], timeout=30)
    assert healthy.error is None and healthy.received == 5000
    check_counters(proxy, 2, reset=1)
    assert proxy.counter(counter) == 1


def test_a_function_that_never_consumes_a_full_buffer_is_reset(env):
    stuck = vfapi.Function(0x7E03, "stuck", lambda ctx, direction, data, eof: (0, b""))
    backend = env.backend(lambda sock: Peer(sock, echo=True))
    proxy = env.proxy(backend.address, stuck, buffer_size=4096)
    sock = proxy.connect()
    sock.sendall(b"x" * 5000)
    assert_reset(sock)
    check_counters(proxy, 1, reset=1)
    assert proxy.counter("vf_errors") == 1


def test_a_spawn_that_raises_resets_the_flow(env):
    def spawn(params, flow):
        raise RuntimeError("no")

    function = vfapi.Function(0x7E04, "nospawn", lambda *a: b"", spawn=spawn)
    backend = env.backend(lambda sock: Peer(sock, echo=True))
    proxy = env.proxy(backend.address, function)
    try:
        sock = proxy.connect()
    except ConnectionResetError:  # the RST may beat create_connection's return
        pass
    else:
        assert_reset(sock)
    check_counters(proxy, 1, reset=1)
    assert proxy.counter("vf_errors") == 1


def assert_reset(sock, timeout=10.0):
    sock.settimeout(timeout)
    with pytest.raises(ConnectionResetError):
        while sock.recv(65536):
            pass
    sock.close()
