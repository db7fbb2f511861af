"""The pipesd master: kernel set-up, supervision, control socket, reload. It only supervises.

Start-up order (reverse on exit):
  1. kernel state for this instance (kernelsetup.install first removes a crashed
     predecessor's leftovers, so a restart after `kill -9` starts clean);
  2. shared memory: the SRH table and the stats block (stale segments are replaced);
  3. the control socket;
  4. the capture process and one worker per CPU, forked.
Signal handlers only queue the signal; the main loop calls one handle_<signal> method each.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import select
import signal
import socket
import time
from typing import Optional

from . import _srhtable, kernelsetup, returnpath, stats
from .addressplan import AddressPlan
from .config import Config, ConfigError, build_config
from .control import ControlServer
from . import vfmodules
from .functions import Function, FunctionConflict, FunctionRegistry, check_builtin_files
from .worker import EXIT_BOOT_FAILED, Worker

log = logging.getLogger("srv6pipes.master")

STATS_REGIONS = 256        # worker slots ever alive at once (old generation draining + new)
HEARTBEAT_TIMEOUT = 10.0   # seconds without a loop turn before a worker is killed
RESTART_BACKOFF = 1.0      # seconds between restarts of a worker that keeps dying
BOOT_FAILURES_FATAL = 5    # consecutive boot failures after which the master gives up
HANDLED_SIGNALS = ("SIGCHLD", "SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
WORKER_REPLY_TIMEOUT = 5.0 # seconds a worker has to answer a request (it polls every 0.2 s)


def kernel_config(config: Config) -> "kernelsetup.KernelConfig":
    return kernelsetup.KernelConfig(name=config.name, locator=config.locator, port=config.port,
                                    queue_num=config.queue_num, fwmark=config.fwmark,
                                    table=config.route_table, rule_priority=config.rule_priority,
                                    kernel_hmac_off=bool(config.hmac_keyring))


@dataclasses.dataclass
class Child:
    kind: str            # "worker" or "capture"
    index: int           # worker index (CPU slot); 0 for the capture
    region: int          # stats region (workers)
    generation: int
    started: float
    stopping: bool = False
    channel: Optional[socket.socket] = None   # workers: the master's end of the socketpair


class Master:
    def __init__(self, config: Config, cli_values: dict):
        self.config = config
        self.cli_values = cli_values
        self.registry = FunctionRegistry()
        # Loaded modules in load order: name -> {"path", "slots": {function name: slot}}.
        # Workers forked later load the same list at boot.
        self.modules: dict[str, dict] = {}
        self.children: dict[int, Child] = {}
        self.signal_queue: list[int] = []
        self.generation = 0
        self.stopping = False
        self.free_regions = list(range(STATS_REGIONS))
        self.boot_failures = 0
        self.restart_at: dict[tuple[str, int], float] = {}
        self.srh_table = None
        self.stats_block: stats.StatsBlock | None = None
        self.control: ControlServer | None = None
        self.kernel_installed = None
        self.started = time.time()
        self.stop_deadline = 0.0

    # -- life cycle ------------------------------------------------------------------
    def run(self) -> int:
        import prctl

        prctl.set_proctitle(f"pipesd: master [{self.config.name}]")
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_r = wake_r
        for name in HANDLED_SIGNALS:
            signal.signal(getattr(signal, name), self.queue_signal)
        signal.set_wakeup_fd(wake_w)
        try:
            self.setup()
            self.spawn_capture()
            self.spawn_generation()
            log.info("pipesd %s: %d workers on [%s]:%d, locator %s", self.config.name,
                     self.config.workers, "::", self.config.port, self.config.locator)
            return self.main_loop()
        finally:
            self.teardown()

    def setup(self) -> None:
        try:
            check_builtin_files(self.config)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"pipesd: {exc}") from None
        for path in self.config.modules:
            try:
                self.admit_module(path)
            except (vfmodules.ModuleLoadError, FunctionConflict) as exc:
                raise SystemExit(f"pipesd: --modules: {exc}") from None
        self.install_kernel_state(self.config)
        self.srh_table = _srhtable.SrhTable.create(self.config.name, self.config.table_slots,
                                                   self.config.table_ttl_ms)
        self.stats_block = stats.StatsBlock.create(self.config.name, STATS_REGIONS)
        self.control = ControlServer(self.config.control, {
            "ping": lambda req: {"pid": os.getpid(), "name": self.config.name},
            "stats": lambda req: {"stats": self.collect_stats()},
            "functions": lambda req: {"functions": self.describe_functions()},
            "load": lambda req: self.handle_load(str(req.get("path", ""))),
            "unload": lambda req: self.handle_unload(str(req.get("module", ""))),
        })

    def install_kernel_state(self, config: Config) -> None:
        """Interception (kernelsetup) and, off-path, return routing (returnpath). Both
        first remove what a crashed predecessor may have left."""
        self.kernel_installed = kernel_config(config)
        kernelsetup.install(self.kernel_installed)
        returnpath.remove(config.name, config.fwmark, self.kernel_installed.rule_priority)
        if config.return_mode != "on-path":
            returnpath.install(config.name, config.fwmark, self.kernel_installed.rule_priority)

    def remove_kernel_state(self) -> None:
        if self.kernel_installed is None:
            return
        kernel, self.kernel_installed = self.kernel_installed, None
        returnpath.remove(kernel.name, kernel.fwmark, kernel.rule_priority)
        kernelsetup.remove(kernel)

    def teardown(self) -> None:
        """Stops every child, then removes kernel state and shared memory. Always runs."""
        self.stop_children(graceful=False, timeout=5.0)
        if self.control is not None:
            self.control.close()
        try:
            self.remove_kernel_state()
        except Exception:  # noqa: BLE001 - keep tearing down the rest
            log.exception("removing kernel state failed")
        if self.srh_table is not None:
            self.srh_table.close()
        _srhtable.unlink(self.config.name)
        if self.stats_block is not None:
            try:
                self.stats_block.close()
            except BufferError:
                pass
        stats.unlink(self.config.name)
        log.info("pipesd %s stopped, kernel state removed", self.config.name)

    def main_loop(self) -> int:
        while True:
            try:
                readable, _, _ = select.select([self.wake_r, self.control], [], [], 1.0)
            except InterruptedError:
                readable = []
            if self.wake_r in readable:
                try:
                    while os.read(self.wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            while self.signal_queue:
                signum = self.signal_queue.pop(0)
                getattr(self, "handle_" + signal.Signals(signum).name.lower())()
            if self.control in readable:
                self.control.handle_ready()
            if self.stopping:
                if not self.children:
                    return 0
                self.continue_stopping()
                continue
            self.check_heartbeats()
            self.respawn_missing()
            if self.boot_failures >= BOOT_FAILURES_FATAL:
                log.error("workers keep failing to boot; giving up")
                return 1

    def queue_signal(self, signum, frame) -> None:
        self.signal_queue.append(signum)

    # -- signal handlers -------------------------------------------------------------
    def handle_sigchld(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if child.kind == "worker":
                self.release_region(child)
            if child.stopping or self.stopping:
                continue
            log.warning("%s %d (pid %d) died with %s; restarting", child.kind, child.index,
                        pid, code)
            # Consecutive worker boot failures (say, the port is taken) end the master
            # instead of re-forking forever; any other death resets the count. A capture
            # that cannot bind yet (its predecessor still holds the queue) just retries.
            if child.kind == "worker":
                self.boot_failures = self.boot_failures + 1 if code == EXIT_BOOT_FAILED else 0
            self.restart_at[(child.kind, child.index)] = time.monotonic() + (
                RESTART_BACKOFF if time.monotonic() - child.started < 5 else 0)

    def handle_sigterm(self) -> None:
        log.info("stopping: draining flows (up to %.0fs)", self.config.drain_timeout)
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.config.drain_timeout + 5.0
        self.signal_children(signal.SIGTERM, kinds=("worker",))

    handle_sigint = handle_sigterm

    def continue_stopping(self) -> None:
        """Called each loop turn while stopping: capture goes once the workers are gone."""
        if time.monotonic() > self.stop_deadline:
            self.signal_children(signal.SIGKILL)
        elif not any(c.kind == "worker" for c in self.children.values()):
            self.signal_children(signal.SIGTERM, kinds=("capture",))

    def handle_sigquit(self) -> None:
        log.info("quitting at once")
        self.stopping = True
        self.stop_children(graceful=False, timeout=5.0)

    def handle_sighup(self) -> None:
        """Reload: new config, new worker generation; old workers drain their flows."""
        try:
            new = build_config(self.cli_values)
            check_builtin_files(new)
        except (ConfigError, OSError, ValueError) as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        if new.modules != self.config.modules:
            log.warning("reload: --modules is only read at start; use pipesctl load/unload")
        old_kernel = kernel_config(self.config)
        new_kernel = kernel_config(new)
        if new.name != self.config.name or new.control != self.config.control:
            log.error("reload refused: --name and --control cannot change at run time")
            return
        capture_settings = ("locator", "function_bits", "param_bits", "queue_num",
                            "fwmark", "return_mode", "hmac_keyring", "require_hmac")
        capture_changed = any(getattr(new, k) != getattr(self.config, k) for k in capture_settings)
        # The HMAC key file may have changed under the same name: the capture re-reads it.
        capture_changed = capture_changed or bool(new.hmac_keyring)
        if new_kernel != old_kernel or new.return_mode != self.config.return_mode:
            self.remove_kernel_state()
            self.install_kernel_state(new)
        self.config = new
        if capture_changed:
            # The capture reads its settings at start: replace it. The new one binds the
            # queue once the old one has let go (restart backoff, then retries).
            self.signal_children(signal.SIGTERM, kinds=("capture",))
            self.restart_at[("capture", 0)] = time.monotonic() + RESTART_BACKOFF
        for pid, child in self.children.items():
            if child.kind == "worker":
                child.stopping = True
                os.kill(pid, signal.SIGTERM)
        self.spawn_generation()
        log.info("reloaded: generation %d, %d workers", self.generation, new.workers)

    # -- children --------------------------------------------------------------------
    def fork(self, child: Child, body) -> None:
        pid = os.fork()
        if pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                for name in HANDLED_SIGNALS:
                    signal.signal(getattr(signal, name), signal.SIG_DFL)
                os.close(self.wake_r)
                self.control.sock.close()
                for other in self.children.values():
                    if other.channel is not None:
                        other.channel.close()
                body()
            except BaseException:  # noqa: BLE001 - a child never returns into the master
                log.exception("%s %d crashed", child.kind, child.index)
            finally:
                os._exit(EXIT_BOOT_FAILED)
        self.children[pid] = child

    def spawn_capture(self) -> None:
        from .capture import run_capture_process

        child = Child("capture", 0, -1, self.generation, time.monotonic())
        config = self.config
        routes = None
        if config.return_mode != "on-path":
            plan = AddressPlan(config.locator, config.function_bits, config.param_bits)
            routes = returnpath.ReturnRoutes(config.name, config.fwmark,
                                             self.kernel_installed.rule_priority,
                                             config.return_mode, plan)
        self.fork(child, lambda: run_capture_process(config.name, config.queue_num,
                                                     self.srh_table, routes,
                                                     config.hmac_keyring, config.require_hmac))

    def spawn_generation(self) -> None:
        self.generation += 1
        for index in range(self.config.workers):
            self.spawn_worker(index)

    def spawn_worker(self, index: int) -> None:
        region = self.free_regions.pop(0)
        cpus = sorted(os.sched_getaffinity(0))
        cpu = cpus[index % len(cpus)]
        region_view = self.stats_block.region(region)
        region_view.set("heartbeat_ms", time.monotonic_ns() // 1_000_000)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        modules = [(m["path"], m["slots"]) for m in self.modules.values()]
        worker = Worker(index, self.config, cpu, self.srh_table, region_view, modules, theirs)
        child = Child("worker", index, region, self.generation, time.monotonic(), channel=ours)
        try:
            self.fork(child, lambda: (ours.close(), worker.run()))
        finally:
            theirs.close()

    def release_region(self, child: Child) -> None:
        if child.channel is not None:
            child.channel.close()
            child.channel = None
        region = self.stats_block.region(child.region)
        region.flows_died()  # its flows went with it
        region.set("pid", 0)
        self.free_regions.append(child.region)

    def respawn_missing(self) -> None:
        now = time.monotonic()
        running = {(c.kind, c.index) for c in self.children.values()
                   if not c.stopping and (c.kind == "capture" or c.generation == self.generation)}
        if ("capture", 0) not in running and now >= self.restart_at.get(("capture", 0), 0):
            self.spawn_capture()
        for index in range(self.config.workers):
            if ("worker", index) not in running and now >= self.restart_at.get(("worker", index), 0):
                self.spawn_worker(index)

    def check_heartbeats(self) -> None:
        now_ms = time.monotonic_ns() // 1_000_000
        for pid, child in list(self.children.items()):
            if child.kind != "worker" or child.stopping:
                continue
            last = self.stats_block.region(child.region).get("heartbeat_ms")
            if now_ms - last > HEARTBEAT_TIMEOUT * 1000:
                log.error("worker %d (pid %d) silent for %.0fs: killing it", child.index, pid,
                          (now_ms - last) / 1000)
                self.kill(pid, signal.SIGKILL)

    def signal_children(self, signum, kinds=("worker", "capture")) -> None:
        for pid, child in list(self.children.items()):
            if child.kind in kinds:
                child.stopping = True
                self.kill(pid, signum)

    @staticmethod
    def kill(pid: int, signum) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def stop_children(self, graceful: bool, timeout: float) -> None:
        """Workers first (they may still be relaying), then the capture process."""
        deadline = time.monotonic() + timeout
        for kinds in (("worker",), ("capture",)):
            self.signal_children(signal.SIGTERM if graceful else signal.SIGKILL, kinds)
            while any(c.kind in kinds for c in self.children.values()):
                if time.monotonic() > deadline:
                    self.signal_children(signal.SIGKILL, kinds)
                try:
                    pid, status = os.waitpid(-1, 0)
                except ChildProcessError:
                    self.children.clear()
                    break
                except InterruptedError:
                    continue
                child = self.children.pop(pid, None)
                if child is not None and child.kind == "worker":
                    self.release_region(child)

    # -- control commands ------------------------------------------------------------
    def collect_stats(self) -> dict:
        slot_names = self.registry.slot_names()
        workers = []
        for pid, child in sorted(self.children.items(), key=lambda item: item[1].index):
            if child.kind != "worker":
                continue
            snap = self.stats_block.region(child.region).snapshot(slot_names)
            snap.update(index=child.index, generation=child.generation, pid=pid,
                        draining=child.stopping)
            workers.append(snap)
        every_region = [self.stats_block.region(r).snapshot(slot_names)
                        for r in range(STATS_REGIONS)]
        totals = stats.merge(every_region)
        return {
            "name": self.config.name,
            "locator": str(self.config.locator),
            "uptime_s": round(time.time() - self.started, 1),
            "generation": self.generation,
            "totals": totals,
            "srh_table": self.srh_table.counters(),
            "kernel": stats.kernel_counters(),
            "workers": workers,
            "function_stats": self.module_stats(),
        }

    def describe_functions(self) -> list[dict]:
        """Every function: id, name, module, kind, active flows (all workers), and the
        workers (indexes) where its module is loaded; draining modules are listed too."""
        replies = self.ask_workers({"cmd": "modules"})
        totals = stats.merge([self.stats_block.region(c.region).snapshot(self.registry.slot_names())
                              for c in self.children.values() if c.kind == "worker"])
        per_function = totals.get("functions", {})
        every_worker = sorted(c.index for c in self.live_workers().values())
        result = []
        for function in self.registry:
            entry = function.describe()
            if function.module == "builtin":
                entry["workers"] = every_worker
            else:
                entry["workers"] = sorted(index for index, reply in replies.items()
                                          if function.module in reply.get("loaded", {}))
            entry["active_flows"] = per_function.get(function.name, {}).get("flows_active", 0)
            result.append(entry)
        for index, reply in sorted(replies.items()):
            for name, info in reply.get("draining", {}).items():
                result.append({"module": name, "draining": True, "worker": index,
                               "active_flows": info["active_flows"]})
        return result

    # -- modules ---------------------------------------------------------------------
    def live_workers(self) -> dict[int, Child]:
        return {pid: c for pid, c in self.children.items()
                if c.kind == "worker" and not c.stopping and c.channel is not None}

    def ask_workers(self, request: dict, pids=None) -> dict[int, dict]:
        """Sends request to every live worker (or those pids); returns {worker index: reply}.
        A worker that does not answer in time gets {"ok": False, "error": ...}."""
        children = self.live_workers()
        if pids is not None:
            children = {pid: c for pid, c in children.items() if pid in pids}
        message = json.dumps(request).encode()
        replies: dict[int, dict] = {}
        waiting: dict[socket.socket, tuple[int, Child]] = {}
        for pid, child in children.items():
            try:
                child.channel.send(message)
                waiting[child.channel] = (pid, child)
            except OSError as exc:
                replies[child.index] = {"ok": False, "error": f"worker unreachable: {exc}"}
        deadline = time.monotonic() + WORKER_REPLY_TIMEOUT
        while waiting and time.monotonic() < deadline:
            readable, _, _ = select.select(list(waiting), [], [], deadline - time.monotonic())
            for channel in readable:
                _, child = waiting.pop(channel)
                try:
                    replies[child.index] = json.loads(channel.recv(1 << 20) or b"null") or {
                        "ok": False, "error": "worker closed its channel"}
                except (OSError, ValueError) as exc:
                    replies[child.index] = {"ok": False, "error": f"bad reply: {exc}"}
        for pid, child in waiting.values():
            replies[child.index] = {"ok": False, "error": "worker did not answer"}
            # A late reply would be read as the answer to the next request, and a worker we
            # cannot reach would miss later loads: replace it. SIGTERM drains its flows; the
            # new one gets a fresh channel and the current module list.
            log.error("worker %d did not answer a %s request in %.0fs: replacing it",
                      child.index, request.get("cmd"), WORKER_REPLY_TIMEOUT)
            child.channel.close()
            child.channel = None
            child.stopping = True
            self.kill(pid, signal.SIGTERM)
        return replies

    def admit_module(self, path: str) -> tuple[str, list[Function]]:
        """Checks a module in a throwaway process and reserves its ids, names and slots.
        Raises ModuleLoadError / FunctionConflict (nothing reserved then)."""
        path = os.path.abspath(path)
        name = vfmodules.module_name(path)
        if name in self.modules:
            raise FunctionConflict(f"a module named {name!r} is already loaded "
                                   f"(from {self.modules[name]['path']})")
        described = vfmodules.probe_module(path)
        functions = [Function(d["id"], d["name"], d["kind"], module=name,
                              description=d["description"]) for d in described]
        limit = 1 << self.config.function_bits
        for function in functions:
            if function.function_id >= limit:
                raise FunctionConflict(f"function {function.name!r}: id {function.function_id:#x} "
                                       f"does not fit in --function-bits {self.config.function_bits}")
        self.registry.check_free(functions)
        registered = [self.registry.register(f) for f in functions]
        self.modules[name] = {"path": path, "slots": {f.name: f.slot for f in registered}}
        return name, registered

    def handle_load(self, path: str) -> dict:
        """pipesctl load: all or nothing; every live worker loads it, or none keeps it."""
        if not path:
            raise ValueError("load needs a path")
        name, functions = self.admit_module(path)
        entry = self.modules[name]
        replies = self.ask_workers({"cmd": "load", "path": entry["path"], "slots": entry["slots"]})
        failed = {index: r["error"] for index, r in replies.items() if not r.get("ok")}
        if failed:
            loaded = [pid for pid, c in self.live_workers().items()
                      if replies.get(c.index, {}).get("ok")]
            self.ask_workers({"cmd": "unload", "module": name}, pids=loaded)
            del self.modules[name]
            self.registry.unregister_module(name)
            index, error = sorted(failed.items())[0]
            raise vfmodules.ModuleLoadError(f"worker {index} refused {name!r}: {error}")
        log.info("loaded module %s from %s: %s", name, entry["path"],
                 ", ".join(f"{f.name} ({f.function_id:#x})" for f in functions))
        return {"module": name, "path": entry["path"],
                "functions": [f.describe() for f in functions],
                "workers": sorted(replies)}

    def handle_unload(self, name: str) -> dict:
        """pipesctl unload: the module's functions take no new flow from now on (they are
        reset as unknown functions); its flows run to their end, then each worker lets the
        module go. Returns the flows still draining per worker."""
        if name not in self.modules:
            raise KeyError(f"no module named {name!r} is loaded")
        del self.modules[name]
        self.registry.unregister_module(name)
        replies = self.ask_workers({"cmd": "unload", "module": name})
        draining = {index: r.get("active_flows", 0) for index, r in replies.items() if r.get("ok")}
        log.info("unloading module %s: %d flows draining", name, sum(draining.values()))
        return {"module": name, "draining_flows": draining}

    def module_stats(self) -> dict:
        replies = self.ask_workers({"cmd": "module_stats"})
        return {index: r.get("stats", r) for index, r in sorted(replies.items())}
