"""The master's control socket: pipesctl's requests, served without ever blocking the master.

Protocol (messages.py declares every request): one JSON object per line in, one per line out,
in order. A client may send several requests on one connection; each is answered before the
next is read. The socket is created 0600 in a 0700 directory: only root talks to the daemon.

Every client is a small state machine driven by the master's event loop (`ControlServer`):
non-blocking reads into a bounded buffer, a bounded reply buffer written as the socket takes
it, and a deadline. A client that sends nothing, sends too much or does not read its replies
is closed when its deadline passes; beyond MAX_CLIENTS, new connections get an error line
and are closed. So nothing a client does (or does not do) can stall supervision.

Handlers answer through a `respond` callback, at once or later (a request that needs the
workers, say): `dispatch(request, respond)`.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from typing import Callable, Optional

from . import messages
from .eventloop import READ, WRITE, EventLoop, Timer
from .ratelimit import RateLimitedLogger

log = logging.getLogger("srv6pipes.control")

MAX_CLIENTS = 16
CLIENT_TIMEOUT = 5.0        # seconds to send a request, or to read a reply
MAX_REPLY = 16 << 20        # a reply larger than this is replaced by an error


class ControlError(RuntimeError):
    """pipesctl could not talk to the daemon, or the daemon refused the request."""


Respond = Callable[[dict], None]
Dispatch = Callable[[messages.Message, Respond], None]


class ControlServer:
    """The listening socket and its clients, on the master's event loop."""

    def __init__(self, path: str, loop: EventLoop, dispatch: Dispatch):
        self.path = path
        self.loop = loop
        self.dispatch = dispatch
        self.clients: dict[int, _Client] = {}
        self.counters = {"requests": 0, "refused": 0, "clients_refused": 0, "timeouts": 0}
        self.rlog = RateLimitedLogger(log)
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if os.path.exists(path):
            if is_live(path):
                raise ControlError(f"another pipesd answers on {path}; use another --name")
            os.unlink(path)  # left by a crashed predecessor
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                                  | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o077)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old_umask)
        self.sock.listen(64)
        loop.watch(self.sock.fileno(), READ, self._accept)

    def _accept(self, _events: int) -> None:
        for _ in range(64):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE...: the next turn retries
                self.rlog.warning("accept", "control socket: accept failed: %s", exc)
                return
            conn.setblocking(False)
            if len(self.clients) >= MAX_CLIENTS:
                self.counters["clients_refused"] += 1
                self.rlog.warning("clients", "control socket: more than %d clients, refusing "
                                  "one", MAX_CLIENTS)
                try:
                    conn.send(_line(messages.reply_error(
                        f"busy: {MAX_CLIENTS} control clients already connected")))
                except OSError:
                    pass
                conn.close()
                continue
            client = _Client(self, conn)
            self.clients[conn.fileno()] = client

    def close(self) -> None:
        for client in list(self.clients.values()):
            client.close()
        self.loop.unwatch(self.sock.fileno())
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close_in_child(self) -> None:
        """In a forked child: drop the inherited descriptors, touch nothing else."""
        for client in self.clients.values():
            client.conn.close()
        self.sock.close()


class _Client:
    """One connection: reads a line, dispatches it, writes the reply, reads the next.

    `_pump` does all the work in a loop (never by recursion: a client may pipeline thousands
    of requests in one write) and is called on readiness and when a deferred reply arrives.
    """

    def __init__(self, server: ControlServer, conn: socket.socket):
        self.server = server
        self.conn = conn
        self.fd = conn.fileno()
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.busy = False          # a request is being handled: read no further
        self.eof = False           # the peer sent everything it will send
        self.closed = False
        self.pumping = False
        self.timer: Optional[Timer] = None
        self._arm()
        server.loop.watch(self.fd, READ, self._ready)

    def _arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.server.loop.call_later(CLIENT_TIMEOUT, self._expired)

    def _expired(self) -> None:
        if not self.busy:          # our own slowness is bounded by the handlers' deadlines
            self.server.counters["timeouts"] += 1
            self.close()

    def _ready(self, events: int) -> None:
        if events & READ and not self.eof:
            try:
                data = self.conn.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                self.close()
                return
            if data == b"":
                self.eof = True
            elif data:
                self.inbuf += data
        self._pump()

    def _pump(self) -> None:
        if self.pumping or self.closed:
            return
        self.pumping = True
        try:
            while not self.closed:
                if self.outbuf:
                    try:
                        sent = self.conn.send(self.outbuf)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        self.close()
                        return
                    del self.outbuf[:sent]
                    continue
                if self.busy:
                    break
                line = self._take_line()
                if line is None:
                    if self.outbuf:
                        continue       # _take_line refused an endless request: say so
                    if self.eof:
                        self.close()
                        return
                    break
                self._handle(line)
        finally:
            self.pumping = False
        self._update_events()

    def _take_line(self) -> Optional[bytes]:
        newline = self.inbuf.find(b"\n")
        if newline >= 0:
            line = bytes(self.inbuf[:newline])
            del self.inbuf[:newline + 1]
            return line
        if len(self.inbuf) > messages.MAX_MESSAGE:
            # No end in sight: answer once, stop reading, close after the reply.
            self.inbuf.clear()
            self.eof = True
            self.server.counters["refused"] += 1
            self._queue(messages.reply_error(
                f"bad request: longer than {messages.MAX_MESSAGE} bytes"))
            return None
        if self.eof and self.inbuf:
            line, self.inbuf = bytes(self.inbuf), bytearray()
            return line
        return None

    def _handle(self, line: bytes) -> None:
        server = self.server
        server.counters["requests"] += 1
        try:
            request = messages.parse(line, messages.CONTROL_REQUESTS)
        except messages.MessageError as exc:
            server.counters["refused"] += 1
            server.rlog.info("bad-request", "control socket: refused a request: %s", exc)
            self._queue(messages.reply_error(f"bad request: {exc}"))
            return
        self.busy = True
        answered = []

        def respond(reply: dict) -> None:
            if answered or self.closed:
                return            # the client left, or a handler answered twice (a bug)
            answered.append(True)
            self.busy = False
            self._queue(reply)
            self._pump()

        try:
            server.dispatch(request, respond)
        except Exception as exc:  # noqa: BLE001 - a failing handler answers, the master lives
            log.exception("control request %s failed", request.command)
            respond(messages.reply_error(f"internal error: {exc!r}"))

    def _queue(self, reply: dict) -> None:
        data = _line(reply)
        if len(data) > MAX_REPLY:
            data = _line(messages.reply_error(f"reply larger than {MAX_REPLY} bytes"))
        self.outbuf += data
        self._arm()

    def _update_events(self) -> None:
        if self.closed:
            return
        events = WRITE if self.outbuf else 0
        if not self.eof and not self.busy and len(self.inbuf) <= messages.MAX_MESSAGE:
            events |= READ
        if events:
            self.server.loop.watch(self.fd, events, self._ready)
        else:
            self.server.loop.unwatch(self.fd)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        self.server.loop.unwatch(self.fd)
        self.server.clients.pop(self.fd, None)
        self.conn.close()


def _line(reply: dict) -> bytes:
    return json.dumps(reply, separators=(",", ":"), default=str).encode() + b"\n"


def is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def request(socket_path: str, cmd: str, timeout: float = 5.0, **fields) -> dict:
    """pipesctl side: sends one command, returns the reply dict or raises ControlError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        try:
            sock.connect(socket_path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            hint = (" (is pipesd running? give its --name, or --control PATH)"
                    if exc.errno in (errno.ENOENT, errno.ECONNREFUSED) else "")
            raise ControlError(f"no pipesd answers on {socket_path}: {exc.strerror}{hint}") \
                from None
        sock.sendall(json.dumps({"cmd": cmd, **fields}).encode() + b"\n")
        data = bytearray()
        while not data.endswith(b"\n"):
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        reply = json.loads(bytes(data) or b"null")
    except ControlError:
        raise
    except (OSError, ValueError) as exc:
        raise ControlError(f"cannot talk to pipesd on {socket_path}: {exc}") from None
    finally:
        sock.close()
    if not isinstance(reply, dict) or not reply.get("ok"):
        raise ControlError(reply.get("error", "no reply") if isinstance(reply, dict) else "no reply")
    return reply
