"""Module admission: what happens between `pipesctl load PATH` and every worker running it.

Run by the master, one operation at a time (others queue), without blocking its loop:

  1. trust: the file and every directory above it must be root's alone (trust.py);
  2. pin: its bytes are read once and written to a private root-only copy named by their
     SHA-256 (`<state dir>/<instance>.modules/<sha256>/<name>.so|.py`); everything after
     this uses the copy, so what runs is what was checked, also in a worker restarted
     hours later, whatever happens to the original file;
  3. probe: the copy is loaded and unloaded in a throwaway child (vfmodules.Probe): a module
     whose init crashes or hangs is refused, the daemon unharmed;
  4. reserve: its function ids and names must be free and fit --function-bits; the
     registry gives each function its stats slot;
  5. load: every live worker loads the copy into those slots (workerrpc). All or nothing:
     if one refuses or does not answer in time, the others are told to unload it again.

Unload is the reverse: the functions stop taking new flows at once, the workers drain them
and let the module go, and the copy is deleted (a loaded .so stays mapped without it).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
import shutil
import time
from typing import Callable, Optional

from . import messages, trust, vfmodules
from .eventloop import READ, EventLoop, Timer
from .functions import Function, FunctionConflict, FunctionRegistry
from .workerrpc import WorkerChannels

log = logging.getLogger("srv6pipes.admission")

WORKER_LOAD_TIMEOUT = 5.0      # a worker's module init runs inside this (less than the heartbeat)


class AdmissionError(Exception):
    """The module is refused; the message says why."""


@dataclasses.dataclass
class AdmittedModule:
    name: str
    source: str                  # the path the operator gave
    copy: str                    # the pinned private copy every worker loads
    sha256: str
    functions: list[Function]

    @property
    def slots(self) -> dict[str, int]:
        return {f.name: f.slot for f in self.functions}


Done = Callable[[dict], None]


class ModuleAdmission:
    def __init__(self, loop: EventLoop, channels: WorkerChannels, registry: FunctionRegistry,
                 function_bits: int, private_dir: str):
        self.loop = loop
        self.channels = channels
        self.registry = registry
        self.function_bits = function_bits
        self.private_dir = private_dir
        self.modules: dict[str, AdmittedModule] = {}     # in load order
        self.queue: collections.deque = collections.deque()
        self.busy = False
        self.probes: dict[int, "_PendingProbe"] = {}     # pid -> probe in flight
        # A crashed predecessor's copies: nothing refers to them any more.
        shutil.rmtree(private_dir, ignore_errors=True)
        os.makedirs(private_dir, mode=0o700)

    # -- what workers need --------------------------------------------------------------
    def boot_list(self) -> list[tuple[str, dict[str, int]]]:
        """(copy path, slots) of every module, in load order: what a new worker loads."""
        return [(m.copy, m.slots) for m in self.modules.values()]

    # -- at start: blocking is fine, no worker exists yet ---------------------------------
    def admit_at_start(self, path: str) -> AdmittedModule:
        """Steps 1-4 for --modules, blocking. Raises AdmissionError."""
        name, copy, digest = self._pin(path)
        try:
            described = vfmodules.probe_module(copy)
            return self._reserve(name, path, copy, digest, described)
        except (vfmodules.ModuleLoadError, FunctionConflict, AdmissionError) as exc:
            self._discard(copy)
            raise AdmissionError(str(exc)) from None

    # -- pipesctl load / unload ----------------------------------------------------------
    def load(self, path: str, done: Done) -> None:
        self._enqueue(self._load, path, done)

    def unload(self, name: str, done: Done) -> None:
        self._enqueue(self._unload, name, done)

    def _enqueue(self, operation, argument, done: Done) -> None:
        self.queue.append((operation, argument, done))
        self._next()

    def _next(self) -> None:
        if self.busy or not self.queue:
            return
        operation, argument, done = self.queue.popleft()
        self.busy = True

        def finished(reply: dict) -> None:
            self.busy = False
            done(reply)
            self._next()

        try:
            operation(argument, finished)
        except (AdmissionError, vfmodules.ModuleLoadError, FunctionConflict) as exc:
            finished(messages.reply_error(str(exc)))

    def _load(self, path: str, done: Done) -> None:
        name, copy, digest = self._pin(path)
        started = time.monotonic()

        def probed(described: Optional[list[dict]], error: Optional[str]) -> None:
            if error is not None:
                self._discard(copy)
                done(messages.reply_error(error))
                return
            try:
                module = self._reserve(name, path, copy, digest, described)
            except (FunctionConflict, AdmissionError) as exc:
                self._discard(copy)
                done(messages.reply_error(str(exc)))
                return
            self._send_to_workers(module, started, done)

        self._start_probe(copy, probed)

    def _send_to_workers(self, module: AdmittedModule, started: float, done: Done) -> None:
        pids = self.channels.pids()

        def answered(replies: dict[int, dict]) -> None:
            failed = {pid: r.get("error", "?") for pid, r in replies.items() if not r.get("ok")}
            if failed:
                # Roll back everywhere: a worker that answered late still loads it first.
                self.channels.ask(lambda i: messages.UnloadModule(id=i, module=module.name),
                                  pids, WORKER_LOAD_TIMEOUT, lambda _replies: None)
                self._forget(module.name)
                pid, error = sorted(failed.items())[0]
                done(messages.reply_error(f"worker (pid {pid}) refused {module.name!r}: {error}"))
                return
            log.info("loaded module %s from %s (sha256 %s) in %.2fs: %s", module.name,
                     module.source, module.sha256[:16], time.monotonic() - started,
                     ", ".join(f"{f.name} ({f.function_id:#x})" for f in module.functions))
            done(messages.reply_ok(module=module.name, path=module.source,
                                   sha256=module.sha256,
                                   functions=[f.describe() for f in module.functions],
                                   workers=len(replies)))

        self.channels.ask(lambda i: messages.LoadModule(id=i, path=module.copy,
                                                        slots=module.slots),
                          pids, WORKER_LOAD_TIMEOUT, answered)

    def _unload(self, name: str, done: Done) -> None:
        if name not in self.modules:
            loaded = ", ".join(self.modules) or "none"
            raise AdmissionError(f"no module named {name!r} is loaded (loaded: {loaded})")
        self._forget(name)

        def answered(replies: dict[int, dict]) -> None:
            draining = {pid: r.get("active_flows", 0) for pid, r in replies.items()
                        if r.get("ok")}
            errors = {pid: r.get("error") for pid, r in replies.items() if not r.get("ok")}
            log.info("unloading module %s: %d flows draining", name, sum(draining.values()))
            done(messages.reply_ok(module=name, draining_flows=draining,
                                   worker_errors=errors))

        self.channels.ask(lambda i: messages.UnloadModule(id=i, module=name),
                          self.channels.pids(), WORKER_LOAD_TIMEOUT, answered)

    # -- the steps ------------------------------------------------------------------------
    def _pin(self, path: str) -> tuple[str, str, str]:
        """Steps 1-2: returns (module name, private copy path, sha256)."""
        path = os.path.abspath(path)
        name = vfmodules.module_name(path)
        if name in self.modules:
            raise AdmissionError(f"a module named {name!r} is already loaded "
                                 f"(from {self.modules[name].source})")
        try:
            resolved = trust.check_trusted(path)
            fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as handle:
                data = handle.read()
        except trust.UntrustedFile as exc:
            raise AdmissionError(f"refused: {exc}") from None
        except OSError as exc:
            raise AdmissionError(f"{path}: {exc.strerror}") from None
        digest = hashlib.sha256(data).hexdigest()
        folder = os.path.join(self.private_dir, digest)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        copy = os.path.join(folder, os.path.basename(path))
        with open(copy, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(data)
        return name, copy, digest

    def _reserve(self, name: str, source: str, copy: str, digest: str,
                 described: list[dict]) -> AdmittedModule:
        """Step 4: ids and names free, ids fit; registers the functions (slots)."""
        functions = [Function(d["id"], d["name"], d["kind"], module=name,
                              description=d["description"]) for d in described]
        limit = 1 << self.function_bits
        for function in functions:
            if function.function_id >= limit:
                raise AdmissionError(f"function {function.name!r}: id {function.function_id:#x} "
                                     f"does not fit in --function-bits {self.function_bits}")
        self.registry.check_free(functions)
        registered = [self.registry.register(f) for f in functions]
        module = AdmittedModule(name, os.path.abspath(source), copy, digest, registered)
        self.modules[name] = module
        return module

    def _forget(self, name: str) -> None:
        module = self.modules.pop(name)
        self.registry.unregister_module(name)
        self._discard(module.copy)

    @staticmethod
    def _discard(copy: str) -> None:
        try:
            os.unlink(copy)
            os.rmdir(os.path.dirname(copy))
        except OSError:
            pass

    # -- probes on the event loop -----------------------------------------------------------
    def _start_probe(self, copy: str, finished: Callable) -> None:
        probe = vfmodules.Probe(copy)
        pending = _PendingProbe(probe, finished)
        self.probes[probe.pid] = pending
        self.loop.watch(probe.fd, READ, lambda _events: self._probe_output(pending))
        pending.timer = self.loop.call_later(vfmodules.PROBE_TIMEOUT,
                                             lambda: self._probe_timeout(pending))

    def _probe_output(self, pending: "_PendingProbe") -> None:
        try:
            chunk = os.read(pending.probe.fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        if chunk and len(pending.data) < vfmodules.MAX_PROBE_REPLY:
            pending.data += chunk
            return
        self._close_probe_fd(pending)
        self._maybe_finish(pending)

    def _probe_timeout(self, pending: "_PendingProbe") -> None:
        pending.timed_out = True
        self._close_probe_fd(pending)
        try:
            os.kill(pending.probe.pid, 9)
        except ProcessLookupError:
            pass

    def child_exited(self, pid: int, status: int) -> bool:
        """The master reaped pid: True if it was one of our probes."""
        pending = self.probes.get(pid)
        if pending is None:
            return False
        pending.status = status
        self._maybe_finish(pending)
        return True

    def _close_probe_fd(self, pending: "_PendingProbe") -> None:
        if pending.fd_open:
            pending.fd_open = False
            self.loop.unwatch(pending.probe.fd)
            os.close(pending.probe.fd)

    def _maybe_finish(self, pending: "_PendingProbe") -> None:
        if pending.fd_open or pending.status is None:
            return
        self.probes.pop(pending.probe.pid, None)
        if pending.timer is not None:
            pending.timer.cancel()
        status = None if pending.timed_out else pending.status
        try:
            described = pending.probe.result(bytes(pending.data), status)
        except vfmodules.ModuleLoadError as exc:
            pending.finished(None, str(exc))
            return
        pending.finished(described, None)

    def close(self) -> None:
        for pending in list(self.probes.values()):
            self._close_probe_fd(pending)
            try:
                os.kill(pending.probe.pid, 9)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.private_dir, ignore_errors=True)


class _PendingProbe:
    def __init__(self, probe: vfmodules.Probe, finished: Callable):
        self.probe = probe
        self.finished = finished
        self.data = bytearray()
        self.fd_open = True
        self.status: Optional[int] = None
        self.timed_out = False
        self.timer: Optional[Timer] = None
