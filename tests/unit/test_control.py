"""The control socket's server (control.py) on a real Unix socket and the master's event loop
(run here in a thread), with a handler that answers at once or later. No daemon needed."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from srv6pipes import control, messages
from srv6pipes.eventloop import EventLoop


class Server:
    """A ControlServer on its own loop thread; `later` requests are answered after a delay."""

    def __init__(self, path):
        self.loop = EventLoop()
        self.seen: list[messages.Message] = []
        self.server = control.ControlServer(str(path), self.loop, self.dispatch)
        self.running = True
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def dispatch(self, request, respond):
        self.seen.append(request)
        if isinstance(request, messages.Stats):
            # Deferred, like stats asking the workers.
            self.loop.call_later(0.2, lambda: respond(messages.reply_ok(stats={"late": True})))
        elif isinstance(request, messages.Unload):
            raise RuntimeError("handler bug")
        else:
            respond(messages.reply_ok(pong=request.command))

    def run(self):
        while self.running:
            self.loop.run_once(0.05)

    def stop(self):
        self.running = False
        self.thread.join(5)
        self.server.close()
        self.loop.close()


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path / "ctl.sock")
    yield srv
    srv.stop()


@pytest.fixture
def connect(server):
    """connect() -> a client socket to the server, closed after the test."""
    made = []

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        made.append(sock)
        sock.settimeout(5)
        sock.connect(server.server.path)
        return sock

    yield make
    for sock in made:
        sock.close()


def read_replies(sock, count):
    data = b""
    while data.count(b"\n") < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_request_helper_gets_the_reply(server, connect):
    assert control.request(server.server.path, "ping")["pong"] == "ping"


def test_pipelined_requests_are_answered_in_order_deferred_ones_included(server, connect):
    sock = connect()
    sock.sendall(b'{"cmd":"ping"}\n{"cmd":"stats"}\n{"cmd":"nope"}\n{"cmd":"functions"}\n')
    replies = read_replies(sock, 4)
    assert [r.get("pong") for r in replies] == ["ping", None, None, "functions"]
    assert replies[1]["stats"] == {"late": True}
    assert not replies[2]["ok"] and "unknown command" in replies[2]["error"]


def test_thousands_of_pipelined_requests_on_one_connection(server, connect):
    sock = connect()
    sock.sendall(b'{"cmd":"ping"}\n' * 5000)
    assert len(read_replies(sock, 5000)) == 5000


def test_a_failing_handler_answers_an_internal_error_and_the_server_goes_on(server, connect):
    sock = connect()
    sock.sendall(b'{"cmd":"unload","module":"x"}\n{"cmd":"ping"}\n')
    failed, ok = read_replies(sock, 2)
    assert not failed["ok"] and "internal error" in failed["error"]
    assert ok["ok"]


def test_an_endless_request_is_refused_and_closed(server, connect):
    sock = connect()
    try:
        sock.sendall(b"x" * (messages.MAX_MESSAGE + 10))
    except OSError:
        pass
    reply = read_replies(sock, 1)
    assert reply and "longer than" in reply[0]["error"]
    assert sock.recv(10) == b""


def test_idle_clients_time_out_and_excess_clients_are_refused(server, connect):
    idle = [connect() for _ in range(control.MAX_CLIENTS)]
    extra = connect()
    refused = read_replies(extra, 1)
    assert "busy" in refused[0]["error"]
    # Meanwhile the server answers nobody else; once the idle ones time out it does again.
    deadline = time.monotonic() + control.CLIENT_TIMEOUT + 3
    while time.monotonic() < deadline:
        try:
            if control.request(server.server.path, "ping", timeout=1)["ok"]:
                break
        except control.ControlError:
            time.sleep(0.2)
    else:
        pytest.fail("the server never served again after the idle clients timed out")
    assert all(sock.recv(10) == b"" for sock in idle)
    assert server.server.counters["timeouts"] >= control.MAX_CLIENTS


def test_a_client_that_half_closes_still_gets_its_answer(server, connect):
    sock = connect()
    sock.sendall(b'{"cmd":"stats"}')      # no newline: EOF ends the request
    sock.shutdown(socket.SHUT_WR)
    assert read_replies(sock, 1)[0]["stats"] == {"late": True}


def test_no_daemon_is_a_clear_error_with_a_hint(tmp_path):
    with pytest.raises(control.ControlError, match="is pipesd running"):
        control.request(str(tmp_path / "none.sock"), "ping")
