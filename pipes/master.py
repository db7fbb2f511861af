"""The pipesd master: it supervises. Kernel set-up, children, signals, reload.

Start-up order (reverse on exit):
  1. kernel state for this instance (kernelsetup.install first removes a crashed
     predecessor's leftovers, so a restart after `kill -9` starts clean);
  2. shared memory: the SRH table and the stats block (stale segments are replaced);
  3. the control socket (control.py, answered by commands.py) and --modules (admission.py);
  4. one capture and one worker per CPU and, with --metrics-listen, the metrics
     server (metrics.py), forked.

Everything the master waits for goes through one event loop (eventloop.py): signals (their
handlers only queue them; the loop calls one handle_<signal> method each), control clients,
worker replies (workerrpc.py), module probes. Nothing in it blocks, so supervision (reaping,
heartbeats, restarts) is never held up by a control client or a slow worker.

Reload (SIGHUP or `pipesctl reload`) is make-before-break: the new generation of workers
listens (SO_REUSEPORT, same port) before the old one is told to stop; the old workers take
what is already in their accept queues, close their listeners (the kernel hands queued
handshakes to the new listeners: tcp_migrate_req) and drain their flows.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import time
from typing import Optional

from . import _srhtable, kernelsetup, returnpath, stats, system, timewait
from .addressplan import AddressPlan
from .admission import AdmissionError, ModuleAdmission
from .commands import ControlCommands
from .config import Config, ConfigError, build_config
from .control import ControlServer
from .eventloop import READ, EventLoop
from .functions import FunctionRegistry, check_builtin_files
from .worker import Worker
from .workerrpc import WorkerChannels

log = logging.getLogger("srv6pipes.master")

STATS_REGIONS = 256        # worker slots ever alive at once (old generation draining + new)
HEARTBEAT_TIMEOUT = 10.0   # seconds without a loop turn before a worker is killed
RESTART_BACKOFF = 1.0      # seconds between restarts of a worker that keeps dying
BOOT_FAILURES_FATAL = 5    # consecutive boot failures after which the master gives up
READY_TIMEOUT = 15.0       # a reload's new generation must be listening within this
SERVICE_KINDS = ("capture", "metrics")   # children besides the workers (a capture per CPU)
HANDLED_SIGNALS = ("SIGCHLD", "SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
READY = "ready"            # the event a worker sends once it listens


def kernel_config(config: Config) -> "kernelsetup.KernelConfig":
    return kernelsetup.KernelConfig(name=config.name, locator=config.locator, port=config.port,
                                    queue_num=config.queue_num,
                                    queue_count=config.captures, fwmark=config.fwmark,
                                    table=config.route_table, rule_priority=config.rule_priority,
                                    intercept_cookies=config.syn_cookies == "intercept",
                                    kernel_hmac_off=bool(config.hmac_keyring))


def _cookie_state(cookie_state: Optional[dict]) -> str:
    """What `pipesctl stats` shows of the SYN-cookie program (kernel.cookie_interception)."""
    if cookie_state is None:
        return "off (--syn-cookies reset)"
    return f"off: {cookie_state['error']}" if "error" in cookie_state else "on"


@dataclasses.dataclass
class Child:
    kind: str            # "worker", "capture" or "metrics"
    index: int           # worker or capture index (CPU slot); 0 for the metrics child
    region: int          # stats region (workers)
    generation: int
    started: float
    stopping: bool = False
    ready: bool = False  # workers: listening (sent READY)


class Master:
    def __init__(self, config: Config, cli_values: dict):
        self.config = config
        self.cli_values = cli_values
        self.registry = FunctionRegistry()
        self.children: dict[int, Child] = {}
        self.signal_queue: list[int] = []
        self.generation = 0
        self.stopping = False
        self.exit_code: Optional[int] = None
        self.free_regions = list(range(STATS_REGIONS))
        self.boot_failures = 0
        self.restart_at: dict[tuple[str, int], float] = {}
        self.retiring: set[int] = set()     # old generation, stopped once the new one listens
        self.retire_deadline = 0.0
        self.loop = EventLoop()
        self.channels = WorkerChannels(self.loop)
        self.channels.on_event = self.worker_event
        self.admission: Optional[ModuleAdmission] = None
        self.srh_table = None
        self.stats_block: stats.StatsBlock | None = None
        self.control: ControlServer | None = None
        self.kernel_installed = None
        self.cookie_interception = "off"
        self.started = time.time()
        self.stop_deadline = 0.0

    # -- life cycle ------------------------------------------------------------------
    def run(self) -> int:
        import prctl

        prctl.set_proctitle(f"pipesd: master [{self.config.name}]")
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        for name in HANDLED_SIGNALS:
            signal.signal(getattr(signal, name), self.queue_signal)
        signal.set_wakeup_fd(wake_w)
        self.loop.watch(self.wake_r, READ, self.drain_wakeups)
        try:
            self.setup()
            for index in range(self.config.captures):
                self.spawn_capture(index)
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
        self.admission = ModuleAdmission(self.loop, self.channels, self.registry,
                                         self.config.function_bits,
                                         system.modules_dir(self.config.name))
        for path in self.config.modules:
            try:
                self.admission.admit_at_start(path)
            except AdmissionError as exc:
                raise SystemExit(f"pipesd: --modules: {exc}") from None
        self.install_kernel_state(self.config)
        self.srh_table = _srhtable.SrhTable.create(self.config.name, self.config.table_slots,
                                                   self.config.table_ttl_ms)
        self.stats_block = stats.StatsBlock.create(self.config.name, STATS_REGIONS)
        self.control = ControlServer(self.config.control, self.loop,
                                     ControlCommands(self).dispatch)

    def install_kernel_state(self, config: Config) -> None:
        """Interception (kernelsetup) and, off-path, return routing (returnpath). Both
        first remove what a crashed predecessor may have left."""
        self.kernel_installed = kernel_config(config)
        state = kernelsetup.install(self.kernel_installed)
        self.cookie_interception = _cookie_state(state.get("cookies"))
        returnpath.remove(config.name, config.fwmark, self.kernel_installed.rule_priority)
        if config.return_mode != "on-path":
            returnpath.install(config.name, config.fwmark, self.kernel_installed.rule_priority)

    def replace_kernel_state(self, new: Config) -> None:
        """A reload's kernel change, make-before-break (kernelsetup.replace): interception
        never stops. The off-path return rules (returnpath) are rebuilt when their mark,
        priority or mode change."""
        old_kernel, old = self.kernel_installed, self.config
        new_kernel = kernel_config(new)
        if new_kernel != old_kernel:
            state = kernelsetup.replace(old_kernel, new_kernel)
            self.kernel_installed = new_kernel
            self.cookie_interception = _cookie_state(state.get("cookies"))
        if (new.return_mode, new.fwmark, new.rule_priority) != (old.return_mode, old.fwmark,
                                                               old.rule_priority):
            returnpath.remove(old.name, old.fwmark, old_kernel.rule_priority)
            if new.return_mode != "on-path":
                returnpath.install(new.name, new.fwmark, new_kernel.rule_priority)

    def remove_kernel_state(self) -> None:
        if self.kernel_installed is None:
            return
        kernel, self.kernel_installed = self.kernel_installed, None
        returnpath.remove(kernel.name, kernel.fwmark, kernel.rule_priority)
        kernelsetup.remove(kernel)

    def teardown(self) -> None:
        """Stops every child, then removes kernel state and shared memory. Always runs."""
        self.stop_children(graceful=False, timeout=5.0)
        retired = timewait.retire_leftovers()   # or routed traffic may stall on them
        if retired:
            log.info("retired %d TIME_WAIT sockets of our flows", retired)
        if self.control is not None:
            self.control.close()
        if self.admission is not None:
            self.admission.close()
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
        self.loop.close()
        log.info("pipesd %s stopped, kernel state removed", self.config.name)

    def main_loop(self) -> int:
        while self.exit_code is None:
            self.loop.run_once(1.0)
            self.supervise()
        return self.exit_code

    def supervise(self) -> None:
        """Once per loop turn: whatever the children need."""
        if self.stopping:
            if not self.children:
                self.exit_code = system.EXIT_OK
            else:
                self.continue_stopping()
            return
        self.check_heartbeats()
        self.retire_old_generation()
        self.respawn_missing()
        if self.boot_failures >= BOOT_FAILURES_FATAL:
            log.error("workers keep failing to boot; giving up")
            self.exit_code = system.EXIT_CRASHED

    def queue_signal(self, signum, frame) -> None:
        self.signal_queue.append(signum)

    def drain_wakeups(self, _events: int) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while self.signal_queue:
            signum = self.signal_queue.pop(0)
            getattr(self, "handle_" + signal.Signals(signum).name.lower())()

    # -- signal handlers -------------------------------------------------------------
    def handle_sigchld(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.admission is not None and self.admission.child_exited(pid, status):
                continue
            child = self.children.pop(pid, None)
            if child is None:
                continue
            self.child_gone(pid, child, os.waitstatus_to_exitcode(status))

    def child_gone(self, pid: int, child: Child, code: int) -> None:
        if child.kind == "worker":
            self.channels.remove(pid)
            self.release_region(child)
            self.retiring.discard(pid)
        if child.stopping or self.stopping:
            return
        log.warning("%s %d (pid %d) died with %s; restarting", child.kind, child.index,
                    pid, code)
        # Consecutive worker boot failures (say, the port is taken) end the master
        # instead of re-forking forever; any other death resets the count. A capture
        # that cannot bind yet (its predecessor still holds the queue) just retries.
        if child.kind == "worker":
            self.boot_failures = (self.boot_failures + 1 if code == system.EXIT_BOOT_FAILED
                                  else 0)
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
            self.signal_children(signal.SIGTERM, kinds=SERVICE_KINDS)

    def handle_sigquit(self) -> None:
        log.info("quitting at once")
        self.stopping = True
        self.stop_children(graceful=False, timeout=5.0)

    def handle_sighup(self) -> None:
        error = self.reload()
        if error:
            log.error("reload refused, keeping the running configuration: %s", error)

    # -- reload ----------------------------------------------------------------------
    def reload(self) -> Optional[str]:
        """Re-reads the configuration and starts a new generation of workers; the old one
        is stopped once the new one listens (retire_old_generation). Returns None, or why
        the reload was refused (the running configuration then stays untouched)."""
        if self.stopping:
            return "pipesd is stopping"
        try:
            new = build_config(self.cli_values)
            check_builtin_files(new)
            new_kernel = kernel_config(new)
        except (ConfigError, OSError, ValueError) as exc:
            return str(exc)
        if new.name != self.config.name or new.control != self.config.control:
            return "--name and --control cannot change at run time"
        if new.function_bits != self.config.function_bits and self.admission.modules:
            return "--function-bits cannot change while modules are loaded"
        if new.modules != self.config.modules:
            log.warning("reload: --modules is only read at start; use pipesctl load/unload")
        capture_settings = ("locator", "function_bits", "param_bits", "queue_num", "captures",
                            "return_mode", "hmac_keyring", "require_hmac")
        if new.return_mode != "on-path":   # its return routes (returnpath) carry the mark
            capture_settings += ("fwmark", "rule_priority")
        capture_changed = any(getattr(new, k) != getattr(self.config, k) for k in capture_settings)
        # The HMAC key file may have changed under the same name: the capture re-reads it.
        capture_changed = capture_changed or bool(new.hmac_keyring)
        if new_kernel != self.kernel_installed or new.return_mode != self.config.return_mode:
            try:
                self.replace_kernel_state(new)
            except Exception as exc:  # noqa: BLE001 - KernelSetupError, NetlinkError, OSError
                log.error("reload: new kernel settings failed (%s): restoring the old ones", exc)
                self.remove_kernel_state()
                self.install_kernel_state(self.config)
                return f"kernel settings: {exc}"
        metrics_changed = new.metrics_listen != self.config.metrics_listen
        self.config = new
        self.admission.function_bits = new.function_bits
        if capture_changed:
            # The capture reads its settings at start: replace it. The new one binds the
            # queue once the old one has let go (restart backoff, then retries).
            self.signal_children(signal.SIGTERM, kinds=("capture",))
            for index in range(new.captures):
                self.restart_at[("capture", index)] = time.monotonic() + RESTART_BACKOFF
        if metrics_changed:
            # Stopped here; respawn_missing starts it again if there is still an address.
            self.signal_children(signal.SIGTERM, kinds=("metrics",))
            self.restart_at[("metrics", 0)] = time.monotonic() + RESTART_BACKOFF
        old = [pid for pid, c in self.children.items() if c.kind == "worker" and not c.stopping]
        self.retiring.update(old)
        self.retire_deadline = time.monotonic() + READY_TIMEOUT
        self.spawn_generation()
        log.info("reloading: generation %d, %d workers; %d old workers stop once it listens",
                 self.generation, new.workers, len(old))
        return None

    def retire_old_generation(self) -> None:
        """Stops the old generation once every worker of the new one listens (or after
        READY_TIMEOUT: a new generation that cannot boot is handled as any boot failure)."""
        if not self.retiring:
            return
        current = [c for c in self.children.values()
                   if c.kind == "worker" and c.generation == self.generation and not c.stopping]
        listening = len(current) == self.config.workers and all(c.ready for c in current)
        if not listening and time.monotonic() < self.retire_deadline:
            return
        if not listening:
            log.warning("reload: the new generation is not listening after %.0fs; stopping "
                        "the old one anyway", READY_TIMEOUT)
        for pid in list(self.retiring):
            child = self.children.get(pid)
            if child is not None:
                child.stopping = True
                self.kill(pid, signal.SIGTERM)
        self.retiring.clear()

    def worker_event(self, pid: int, event: dict) -> None:
        """An unsolicited message from a worker (workerrpc): READY once it listens."""
        child = self.children.get(pid)
        if child is not None and event.get("event") == READY:
            child.ready = True
            self.retire_old_generation()

    # -- children --------------------------------------------------------------------
    def fork(self, child: Child, body) -> int:
        master = os.getpid()
        pid = os.fork()
        if pid == 0:
            try:
                import prctl

                # Every child goes when the master does (kill -9 included): a metrics child
                # left behind would keep its port, a worker its listener.
                prctl.set_pdeathsig(signal.SIGTERM)
                if os.getppid() != master:  # the master died before that was armed
                    return
                signal.set_wakeup_fd(-1)
                for name in HANDLED_SIGNALS:
                    signal.signal(getattr(signal, name), signal.SIG_DFL)
                os.close(self.wake_r)
                self.loop.close()
                if self.control is not None:
                    self.control.close_in_child()
                self.channels.close_in_child()
                body()
            except BaseException:  # noqa: BLE001 - a child never returns into the master
                log.exception("%s %d crashed", child.kind, child.index)
            finally:
                os._exit(system.EXIT_BOOT_FAILED)
        self.children[pid] = child
        return pid

    def spawn_capture(self, index: int) -> None:
        """Capture `index` runs on the CPU of worker `index` and reads the queue the kernel
        fills with the SYNs that CPU receives (capture.capture_placement)."""
        from .capture import capture_placement, run_capture_process

        child = Child("capture", index, -1, self.generation, time.monotonic())
        config = self.config
        cpu, queue_offset = capture_placement(sorted(os.sched_getaffinity(0)),
                                              config.captures)[index]
        routes = None
        if config.return_mode != "on-path":
            plan = AddressPlan(config.locator, config.function_bits, config.param_bits)
            routes = returnpath.ReturnRoutes(config.name, config.fwmark,
                                             self.kernel_installed.rule_priority,
                                             config.return_mode, plan)
        self.fork(child, lambda: run_capture_process(
            config.name, config.queue_num + queue_offset, self.srh_table, routes,
            config.hmac_keyring, config.require_hmac, index=index, cpu=cpu))

    def spawn_metrics(self) -> None:
        """--metrics-listen: a child serving Prometheus text over HTTP, each scrape one
        `stats` request to our control socket (metrics.py); it keeps no privilege."""
        from . import metrics

        host, port = self.config.metrics_listen
        control = self.config.control

        def serve() -> None:
            import prctl

            prctl.set_proctitle(f"pipesd: metrics [{self.config.name}]")
            server = metrics.make_server(host, port, control)
            system.drop_capabilities(())
            server.serve_forever()

        self.fork(Child("metrics", 0, -1, self.generation, time.monotonic()), serve)

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
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        worker = Worker(index, self.config, cpu, self.srh_table, region_view,
                        self.admission.boot_list(), theirs)
        child = Child("worker", index, region, self.generation, time.monotonic())
        try:
            pid = self.fork(child, lambda: (ours.close(), worker.run()))
        finally:
            theirs.close()
        self.channels.add(pid, ours)

    def release_region(self, child: Child) -> None:
        region = self.stats_block.region(child.region)
        region.flows_died()  # its flows went with it
        region.set("pid", 0)
        self.free_regions.append(child.region)

    def respawn_missing(self) -> None:
        now = time.monotonic()
        running = {(c.kind, c.index) for c in self.children.values()
                   if not c.stopping and (c.kind in SERVICE_KINDS
                                          or c.generation == self.generation)}
        for index in range(self.config.captures):
            if ("capture", index) not in running \
                    and now >= self.restart_at.get(("capture", index), 0):
                self.spawn_capture(index)
        if self.config.metrics_listen and ("metrics", 0) not in running \
                and now >= self.restart_at.get(("metrics", 0), 0):
            self.spawn_metrics()
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

    def signal_children(self, signum, kinds=("worker", *SERVICE_KINDS)) -> None:
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
        """Workers first (they may still be relaying), then the captures and the metrics
        child."""
        deadline = time.monotonic() + timeout
        for kinds in (("worker",), SERVICE_KINDS):
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
                    self.channels.remove(pid)
                    self.release_region(child)

    # -- views for the control commands ---------------------------------------------------
    def live_worker_pids(self) -> list[int]:
        return [pid for pid, c in self.children.items()
                if c.kind == "worker" and not c.stopping and pid in self.channels.channels]

    def worker_indexes(self) -> dict[int, int]:
        return {pid: c.index for pid, c in self.children.items() if c.kind == "worker"}
