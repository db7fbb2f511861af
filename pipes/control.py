"""The master's control socket: one JSON request per line, one JSON reply per line.

    {"cmd": "stats"}      -> {"ok": true, "stats": {...}}
    {"cmd": "functions"}  -> {"ok": true, "functions": [...]}
    {"cmd": "ping"}       -> {"ok": true, "pid": ...}
Errors come back as {"ok": false, "error": "..."}. The socket is created 0600: only root
(the operator) talks to the daemon.
"""
from __future__ import annotations

import json
import os
import socket
from typing import Callable

MAX_REQUEST = 64 * 1024


class ControlError(RuntimeError):
    """pipesctl could not talk to the daemon, or the daemon refused the request."""


class ControlServer:
    """Non-blocking listener the master polls; handlers map a command to a reply dict."""

    def __init__(self, path: str, handlers: dict[str, Callable[[dict], dict]]):
        self.path = path
        self.handlers = handlers
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.exists(path):
            if is_live(path):
                raise ControlError(f"another pipesd answers on {path}; use another --name")
            os.unlink(path)  # left by a crashed predecessor
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o077)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old_umask)
        self.sock.listen(16)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def handle_ready(self) -> None:
        """Called by the master when the listener is readable: serves waiting clients.

        Requests are tiny and local, so each is read and answered with a short timeout
        rather than with per-client state machines in the master loop.
        """
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return
            with conn:
                conn.settimeout(2.0)
                try:
                    reply = self.dispatch(read_line(conn))
                except (OSError, ValueError) as exc:
                    reply = {"ok": False, "error": f"bad request: {exc}"}
                try:
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:
                    pass

    def dispatch(self, line: bytes) -> dict:
        request = json.loads(line)
        if not isinstance(request, dict) or "cmd" not in request:
            return {"ok": False, "error": "request must be an object with a 'cmd'"}
        handler = self.handlers.get(request["cmd"])
        if handler is None:
            return {"ok": False, "error": f"unknown command {request['cmd']!r}; "
                                          f"known: {', '.join(sorted(self.handlers))}"}
        try:
            return {"ok": True, **handler(request)}
        except Exception as exc:  # noqa: BLE001 - a bad request must not kill the master
            return {"ok": False, "error": str(exc)}

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError("request too long")
    return data


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
    try:
        sock.connect(socket_path)
        sock.sendall(json.dumps({"cmd": cmd, **fields}).encode() + b"\n")
        reply = json.loads(read_line(sock) or b"null")
    except (OSError, ValueError) as exc:
        raise ControlError(f"cannot talk to pipesd on {socket_path}: {exc}") from None
    finally:
        sock.close()
    if not isinstance(reply, dict) or not reply.get("ok"):
        raise ControlError(reply.get("error", "no reply") if isinstance(reply, dict) else "no reply")
    return reply
