"""The master's side of its worker channels: requests out, replies matched back, deadlines.

Each worker has a SOCK_SEQPACKET socketpair with the master (one message per request or
reply, see messages.py). `WorkerChannels.ask` sends one request to a set of workers and
calls `done({pid: reply})` once every one has answered or the deadline has passed; a
worker that did not answer in time, whose channel is full or gone, gets an error reply
there. Nothing waits: replies are read when the event loop sees them.

A late reply carries the id of a request already finished and is dropped, so it can never
be taken for the answer to a later request. A slow worker is therefore reported, not
punished: it still processes every request in order (the channel is FIFO), so a module
load whose answer came too late is followed by the unload the master sends to roll it back.
A worker that is really stuck stops its heartbeat, and the master replaces it for that.
"""
from __future__ import annotations

import itertools
import json
import logging
import socket
from typing import Callable, Optional

from . import messages
from .eventloop import READ, EventLoop, Timer

log = logging.getLogger("srv6pipes.master")

MAX_REPLY = 1 << 20


class _Call:
    __slots__ = ("waiting", "replies", "done", "timer", "timeout")

    def __init__(self, waiting: set[int], done: Callable[[dict[int, dict]], None],
                 timeout: float):
        self.waiting = waiting
        self.replies: dict[int, dict] = {}
        self.done = done
        self.timer: Optional[Timer] = None
        self.timeout = timeout


class WorkerChannels:
    def __init__(self, loop: EventLoop):
        self.loop = loop
        self.channels: dict[int, socket.socket] = {}     # pid -> the master's end
        self.calls: dict[int, _Call] = {}                # request id -> call
        self._ids = itertools.count(1)
        # Called with (pid, message) for what a worker sends unasked ({"event": ...}).
        self.on_event: Callable[[int, dict], None] = lambda pid, event: None

    def add(self, pid: int, channel: socket.socket) -> None:
        channel.setblocking(False)
        self.channels[pid] = channel
        self.loop.watch(channel.fileno(), READ, lambda _events, pid=pid: self._read(pid))

    def remove(self, pid: int) -> None:
        """The worker is gone (or stopping): its pending answers become errors."""
        channel = self.channels.pop(pid, None)
        if channel is not None:
            self.loop.unwatch(channel.fileno())
            channel.close()
        for request_id, call in list(self.calls.items()):
            if pid in call.waiting:
                self._answer(request_id, pid, messages.reply_error("worker stopped"))

    def pids(self) -> list[int]:
        return list(self.channels)

    def ask(self, make_request: Callable[[int], messages.Message], pids: list[int],
            timeout: float, done: Callable[[dict[int, dict]], None]) -> None:
        """Sends make_request(id) to each of pids (live channels only); done(replies)
        follows once all answered or after timeout seconds. Never raises, never blocks."""
        request_id = next(self._ids)
        data = messages.encode(make_request(request_id))
        call = _Call(set(), done, timeout)
        self.calls[request_id] = call
        unreachable = {}
        for pid in pids:
            channel = self.channels.get(pid)
            if channel is None:
                unreachable[pid] = "worker stopped"
                continue
            try:
                channel.send(data, socket.MSG_DONTWAIT)
                call.waiting.add(pid)
            except BlockingIOError:
                unreachable[pid] = "worker channel full (worker busy)"
            except OSError as exc:
                unreachable[pid] = f"worker unreachable: {exc.strerror or exc}"
        for pid, error in unreachable.items():
            call.replies[pid] = messages.reply_error(error)
        if not call.waiting:
            self._finish(request_id)
            return
        call.timer = self.loop.call_later(timeout, lambda: self._expire(request_id))

    def _read(self, pid: int) -> None:
        channel = self.channels.get(pid)
        if channel is None:
            return
        while True:
            try:
                data = channel.recv(MAX_REPLY)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:   # the worker closed its end: it is exiting
                self.loop.unwatch(channel.fileno())
                self.channels.pop(pid, None)
                channel.close()
                self.remove(pid)
                return
            try:
                reply = json.loads(data)
                if "event" in reply:
                    self.on_event(pid, reply)
                    continue
                request_id = reply.pop("id")
            except (ValueError, KeyError, AttributeError, TypeError):
                log.warning("worker pid %d sent a malformed reply: dropped", pid)
                continue
            if isinstance(request_id, int) and request_id in self.calls:
                self._answer(request_id, pid, reply)
            # else: the answer to a request that timed out, dropped (see module docstring)

    def _answer(self, request_id: int, pid: int, reply: dict) -> None:
        call = self.calls.get(request_id)
        if call is None or pid not in call.waiting:
            return
        call.waiting.discard(pid)
        call.replies[pid] = reply
        if not call.waiting:
            self._finish(request_id)

    def _expire(self, request_id: int) -> None:
        call = self.calls.get(request_id)
        if call is None:
            return
        for pid in call.waiting:
            call.replies[pid] = messages.reply_error(
                f"worker did not answer within {call.timeout:g}s")
        call.waiting.clear()
        self._finish(request_id)

    def _finish(self, request_id: int) -> None:
        call = self.calls.pop(request_id)
        if call.timer is not None:
            call.timer.cancel()
        call.done(call.replies)

    def close_in_child(self) -> None:
        for channel in self.channels.values():
            channel.close()
