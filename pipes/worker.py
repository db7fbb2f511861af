"""A worker: accept -> SRH lookup -> function lookup -> connect onward -> hand to the relay.

One worker process per CPU. The object is built in the master before fork and must not
touch the process; `run()` is the post-fork entry point (process name, CPU pinning,
signals, its own SO_REUSEPORT listener, dropped capabilities), then `serve()` loops.

Per accepted connection (see `accept_burst` and `open_flow`):
  1. the accepted socket's peer is the client C:sport, its local address the final
     destination S:dport (TPROXY kept it);
  2. the SRH comes from the shared table filled by the capture processes, or, on a miss,
     from TCP_SAVED_SYN (the kernel's copy of the SYN headers);
  3. this proxy's segment is decoded into function + parameters (functions.py: built-ins and
     the functions of loaded modules, vfmodules.py);
  4. the onward socket binds C:sport (IPV6_TRANSPARENT), carries the remaining segments
     (IPV6_RTHDR) and connects to S:dport without blocking;
  5. both file descriptors go to the Cython relay loop, which owns them from then on.
Anything wrong resets the client connection, bumps a counter and logs (rate limited).
The socket calls of steps 1, 2 and 4 are in srv6pipes._sockops (cext/sockops.pyx): plain
descriptors, addresses as 16 bytes, no Python socket objects on this per-connection path.

The master talks to a worker over a SOCK_SEQPACKET socketpair, one JSON message per request
(`handle_control`): load / unload a module, list functions, module stats. Unloading drains:
the module's functions stop taking new flows at once, and the module is let go (deinit,
dlclose) once its last flow in this worker has closed.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import signal
import socket
import struct
import time
from typing import Any, NamedTuple

from . import _relay, messages, onward, system, vfmodules
from ._sockops import accept_connection, reset_and_close, saved_syn
from .onward import TupleBusy
from .addressplan import AddressError, AddressPlan
from .config import Config
from .functions import (KIND_SPLICE, MAX_FUNCTION_SLOTS, FunctionConflict, FunctionRegistry,
                        UnknownFunction, configure_builtins)
from .ratelimit import RateLimitedLogger
from .srh import (FIXED_LENGTH, LAST_ENTRY_OFFSET, ROUTING_TYPE_SRH, SEGMENTS_LEFT_OFFSET, SRH,
                  TYPE_OFFSET, SRHError, find_srh, segment_offset)
from .srhhmac import HmacKeyring, HmacRefused
from .srhstack import syn_route
from .stats import WorkerRegion

SAVED_SYN_MAX = 1024  # IPv6 + SRH + TCP headers of a SYN: SRHs of up to ~55 segments
LISTEN_BACKLOG = 4096
ACCEPT_BURST = 64
FD_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

log = logging.getLogger("srv6pipes.worker")


def address_text(address: bytes) -> str:
    """An address for a log line (only lines that are written: the hot path keeps bytes)."""
    return socket.inet_ntop(socket.AF_INET6, address)


class Rejected(Exception):
    """The connection cannot be proxied; `counter` names the stats counter to bump."""

    def __init__(self, counter: str, reason: str):
        super().__init__(reason)
        self.counter = counter


def make_listener(port: int, keepalive: tuple[int, int, int] = (0, 10, 6)) -> socket.socket:
    """The worker's own transparent listener; SO_REUSEPORT gives each worker its queue.
    Accepted sockets inherit its SO_LINGER {1, 0} (a worker that dies resets its flows
    instead of ending them with a FIN that looks like a complete transfer), keepalive and
    TCP_NODELAY (the relay writes what it has at once): set here once, not per connection
    (accept_connection sets no option)."""
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        idle, interval, count = keepalive
        if idle:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
        listener.setsockopt(socket.IPPROTO_IPV6, system.IPV6_TRANSPARENT, 1)
        # Keeps the SYN's headers (SRH included) for the table-miss fallback.
        listener.setsockopt(socket.IPPROTO_TCP, system.TCP_SAVE_SYN, 1)
        listener.bind(("::", port))
        listener.listen(LISTEN_BACKLOG)
        listener.setblocking(False)
    except OSError:
        listener.close()
        raise
    return listener


@dataclasses.dataclass
class Route:
    """What open_flow decided for one connection (kept as wire bytes: no SRH object is
    built on the table-hit path)."""

    srh_wire: bytes          # the SYN's SRH as captured (its own segments-left byte aside)
    segments_left: int       # when it reached us: index of our segment
    function_address: bytes  # that segment (16 bytes): locator | function | parameters
    function_id: int
    params: int

    @property
    def onward(self) -> bytes | None:
        """The SRH for the onward socket: same segments, segments-left one less (see
        SRH.onward); None when the next segment is the final destination."""
        if self.segments_left == 1:
            return None
        wire = self.srh_wire
        return (wire[:SEGMENTS_LEFT_OFFSET] + bytes((self.segments_left - 1,))
                + wire[SEGMENTS_LEFT_OFFSET + 1:])

    @property
    def srh(self) -> SRH:
        """The parsed header as received (for logs and tests; not on the hot path)."""
        return dataclasses.replace(SRH.parse(self.srh_wire), segments_left=self.segments_left)


def locate_own_segment(srh: SRH, plan: AddressPlan) -> SRH:
    """For a SYN seen after the kernel's SRH loop (segments_left already 0): our segment is
    the first one, in travel order, inside our locator. Returns the SRH as we received it."""
    for index in range(srh.last_entry, 0, -1):
        if plan.contains(srh.segments[index]):
            return dataclasses.replace(srh, segments_left=index)
    raise Rejected("not_our_segment", "no segment of the SYN's SRH is inside our locator")


def resolve_route(table_entry, saved_syn: bytes | None, plan: AddressPlan,
                  stats: WorkerRegion, max_segments: int = 32,
                  hmac_keyring=None, require_hmac: bool = False) -> Route:
    """Steps 2-3: the SRH of this connection and our segment's function + parameters.

    table_entry is (original segments-left, SRH bytes) or None; saved_syn is only read on
    a miss, and its SRH passes the same HMAC check and binding flattening as in the
    capture (srhstack.syn_route). Pure logic apart from counters, so it is unit tested
    without a network.
    """
    if table_entry is not None:
        stats.add("table_hits")
        segments_left, wire = table_entry
        # The capture parsed and validated it; check only what indexing below relies on.
        if (len(wire) < FIXED_LENGTH or wire[TYPE_OFFSET] != ROUTING_TYPE_SRH
                or len(wire) < segment_offset(wire[LAST_ENTRY_OFFSET] + 1)):
            raise Rejected("malformed_srh", "malformed SRH in table")
    else:
        stats.add("table_misses")
        if not saved_syn:
            # Empty for SYN-cookie connections (the SYN was never stored).
            raise Rejected("no_srh", "no SRH: table miss and no saved SYN (SYN cookies?)")
        try:
            info = find_srh(saved_syn)
        except SRHError as exc:
            raise Rejected("malformed_srh", f"malformed saved SYN: {exc}") from None
        if info.srh is None:
            raise Rejected("no_srh", "the SYN carried no SRH")
        try:
            acted_on = syn_route(info, hmac_keyring, require_hmac).srh
        except HmacRefused as exc:
            raise Rejected("hmac_refused", f"saved SYN: {exc}") from None
        except SRHError as exc:
            raise Rejected("malformed_srh", f"saved SYN: {exc}") from None
        srh = locate_own_segment(acted_on, plan)
        stats.add("saved_syn_fallbacks")
        segments_left, wire = srh.segments_left, srh.to_bytes()
    last_entry = wire[LAST_ENTRY_OFFSET]
    if last_entry + 1 > max_segments:
        raise Rejected("too_many_segments",
                       f"{last_entry + 1} segments, more than --max-segments {max_segments}")
    if segments_left == 0 or segments_left > last_entry:
        raise Rejected("malformed_srh", f"segments-left {segments_left} leaves no segment "
                                        f"for this proxy (last entry {last_entry})")
    active = wire[segment_offset(segments_left):segment_offset(segments_left + 1)]
    try:
        function_id, params = plan.decode(active)
    except AddressError:
        raise Rejected("not_our_segment", "the active segment "
                       f"{socket.inet_ntop(socket.AF_INET6, active)} is outside our locator") from None
    return Route(wire, segments_left, active, function_id, params)


class PendingFlow(NamedTuple):
    """An accepted client whose route is decided, before its onward connection exists."""

    client: int              # the accepted socket's descriptor
    client_addr: bytes
    client_port: int
    dest_addr: bytes
    dest_port: int
    route: Route
    function: Any            # functions.Function: the function the route names


class Worker:
    """Built in the master before fork; everything process-specific happens in run()."""

    def __init__(self, index: int, config: Config, cpu: int | None, srh_table,
                 stats: WorkerRegion, modules: list[tuple[str, dict[str, int]]] = (),
                 channel: socket.socket | None = None):
        self.index = index
        self.config = config
        self.cpu = cpu
        self.srh_table = srh_table
        self.stats = stats
        # Built-ins only: the modules are loaded here, in the master's slots (boot_modules).
        self.registry = FunctionRegistry()
        self.boot_modules = list(modules)    # (path, {function name: slot}) from the master
        self.channel = channel               # our end of the master's socketpair
        self.modules: dict[str, vfmodules.LoadedModule] = {}
        self.draining: dict[str, vfmodules.LoadedModule] = {}
        # Stats slots of each module's functions: the relay counts their open flows, which
        # is what an unload waits for. (A later module reusing a function's id and name
        # shares its slot; that can only delay the old one's deinit.)
        self.module_slots: dict[str, list[int]] = {}
        self.plan = AddressPlan(config.locator, config.function_bits, config.param_bits)
        self.hmac_keyring = None  # loaded in init_process (the file is re-read per worker)
        self.listener: socket.socket | None = None
        self.relay = None
        self.stopping_since: float | None = None
        self.spare_fd: int | None = None
        self.rlog = RateLimitedLogger(log)
        self.parked: list[tuple[float, PendingFlow]] = []  # (deadline, flow): park()
        self.retry_at = 0.0                                  # next retry_parked()

    # -- process set-up -------------------------------------------------------------
    def run(self) -> None:
        """Post-fork entry point; never returns (exits the process)."""
        try:
            self.init_process()
        except Exception as exc:  # noqa: BLE001 - any boot failure is reported the same way
            log.error("worker %d failed to boot: %s", self.index, exc)
            os._exit(system.EXIT_BOOT_FAILED)
        try:
            self.serve()
        finally:
            if self.relay is not None:
                self.relay.shutdown(True)
                self.relay.close()
        os._exit(system.EXIT_OK)

    def init_process(self) -> None:
        import prctl

        prctl.set_name(f"pipesd w{self.index}")
        prctl.set_proctitle(f"pipesd: worker {self.index} [{self.config.name}]")
        if self.cpu is not None:
            os.sched_setaffinity(0, {self.cpu})
        signal.signal(signal.SIGTERM, self.handle_stop)
        signal.signal(signal.SIGINT, self.handle_stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGQUIT, lambda *_: os._exit(system.EXIT_CRASHED))
        self.stats.set("pid", os.getpid())
        # Inherited over fork without page tables: map the table in now, not one page
        # fault per first-touched slot on the accept path (SrhTable.prefault).
        self.srh_table.prefault()
        config = self.config
        self.listener = make_listener(config.port, config.keepalive)
        self.relay = _relay.RelayLoop(self.listener.fileno(), self.stats.function_words(),
                                      MAX_FUNCTION_SLOTS, config.max_flows, config.buffer_size)
        # The client side inherits the listener's keepalive; the server side gets it from
        # the relay once a flow is a second old (short connections never pay for it).
        self.relay.set_keepalive(*config.keepalive)
        self.relay.set_timeouts(config.timeout_connect, config.timeout_client,
                                config.timeout_server, config.timeout_client_fin,
                                config.timeout_server_fin)
        configure_builtins(self.config)
        if self.config.hmac_keyring:
            self.hmac_keyring = HmacKeyring.load(self.config.hmac_keyring)
        for path, slots in self.boot_modules:
            try:
                self.load_module(path, slots)
            except (vfmodules.ModuleLoadError, FunctionConflict) as exc:
                # Not fatal: its functions are unknown here; `pipesctl functions` shows it.
                log.error("worker %d: module %s not loaded: %s", self.index, path, exc)
        if self.channel is not None:
            self.relay.watch(self.channel.fileno())
        # A spare descriptor lets us accept-and-reset when descriptors run out, instead of
        # spinning on a listener that stays readable.
        self.spare_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        system.drop_capabilities(system.WORKER_CAPABILITIES)
        self.tell_master({"event": "ready"})   # the master retires the old generation

    def handle_stop(self, signum, frame) -> None:
        """SIGTERM/SIGINT: stop accepting, let established flows drain."""
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()

    # -- the loop --------------------------------------------------------------------
    def serve(self) -> None:
        relay = self.relay
        stats = self.stats
        while True:
            if self.parked:
                ready = relay.poll(max(0, int((self.retry_at - time.monotonic()) * 1000)))
                if time.monotonic() >= self.retry_at:
                    self.retry_parked()
            else:
                ready = relay.poll(200)
            stats.set("heartbeat_ms", time.monotonic_ns() // 1_000_000)
            if ready & _relay.WATCHED_READY:
                self.handle_control()
            if self.draining:
                self.finish_draining()
            if self.stopping_since is not None:
                if self.listener is not None:
                    # Connections already in our accept queue completed their handshake:
                    # take them (one burst; they drain like the rest) rather than let close()
                    # reset them.
                    self.accept_burst()
                    self.listener.close()  # epoll forgets it
                    self.listener = None
                if relay.active_flows == 0 and not self.parked:
                    return
                if time.monotonic() - self.stopping_since > self.config.drain_timeout:
                    log.warning("worker %d: drain timeout, resetting %d flows",
                                self.index, relay.active_flows)
                    return
            elif ready & _relay.LISTENER_READY:
                self.accept_burst()

    def accept_burst(self) -> None:
        """Listener readable: takes up to ACCEPT_BURST connections (step 1), each to
        open_flow, and stops early when the queue is empty or accept fails."""
        listen_fd = self.listener.fileno()
        for _ in range(ACCEPT_BURST):
            try:
                accepted = accept_connection(listen_fd)
            except OSError as exc:
                if exc.errno in FD_EXHAUSTED:
                    self.shed_one_connection(exc)
                else:
                    self.stats.add("accept_errors")
                    self.rlog.warning("accept", "accept failed: %s", exc)
                return
            if accepted is None:
                return
            self.stats.add("accepted")
            self.open_flow(*accepted)

    def shed_one_connection(self, exc: OSError) -> None:
        """Out of descriptors: free the spare, accept one connection and reset it."""
        self.stats.add("fd_exhausted")
        self.rlog.warning("fd", "out of file descriptors (%s): resetting new connections", exc)
        if self.spare_fd is None:
            return
        os.close(self.spare_fd)
        self.spare_fd = None
        try:
            accepted = accept_connection(self.listener.fileno())
            if accepted is not None:
                reset_and_close(accepted[0])
        except OSError:
            pass
        try:
            self.spare_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.spare_fd = None

    def open_flow(self, client: int, client_addr: bytes, client_port: int,
                  dest_addr: bytes, dest_port: int) -> None:
        """Steps 2-5 of the module docstring for one connection accept_connection returned
        (its descriptor, then the addresses as 16 bytes and the ports). Either both
        descriptors go to the relay, or the client is reset and nothing stays open."""
        try:
            entry = self.srh_table.lookup(client_addr, client_port, dest_addr, dest_port)
            syn = None
            if entry is None:
                syn = saved_syn(client, SAVED_SYN_MAX)
            route = resolve_route(entry, syn, self.plan, self.stats, self.config.max_segments,
                                  self.hmac_keyring, self.config.require_hmac)
            try:
                function = self.registry.by_id(route.function_id)
            except UnknownFunction as exc:
                raise Rejected("unknown_function", str(exc)) from None
        except Rejected as rejected:
            self.stats.add(rejected.counter)
            self.rlog.warning(rejected.counter, "reset %s:%d -> %s: %s",
                              address_text(client_addr), client_port, rejected.counter, rejected)
            reset_and_close(client)
            return
        except OSError as exc:
            self.give_up(client, client_addr, client_port, exc)
            return
        flow = PendingFlow(client, client_addr, client_port, dest_addr, dest_port, route,
                           function)
        if not self.go_onward(flow):
            self.park(flow)

    def go_onward(self, flow: "PendingFlow", waited: bool = False) -> bool:
        """Steps 4 and 5: the onward connection (onward.py), then the relay owns both
        descriptors, whatever add_flow does (a flow that `waited` parked is then counted
        as onward_waited). False when the onward 4-tuple is still held by a closing
        connection (the caller parks the flow); on any other failure the client is reset
        (and True: the flow is finished with)."""
        route = flow.route
        try:
            server = onward.connect(flow.client_addr, flow.client_port, flow.dest_addr,
                                    flow.dest_port, route.onward)
        except TupleBusy:
            return False
        except OSError as exc:  # onward.connect has closed its own socket
            self.give_up(flow.client, flow.client_addr, flow.client_port, exc)
            return True
        function = flow.function
        if function.kind != KIND_SPLICE:  # spawn gets the flow's addresses
            addresses = (flow.client_addr, flow.client_port, flow.dest_addr, flow.dest_port,
                         route.function_address)
            self.relay.add_flow(flow.client, server, function.slot, function.address,
                                function.python, route.params, addresses)
        else:
            self.relay.add_flow(flow.client, server, function.slot)
        if waited:
            self.stats.add("onward_waited")
        return True

    def give_up(self, client: int, client_addr: bytes, client_port: int, exc: OSError) -> None:
        """Resets a client whose flow could not be set up, counted and logged."""
        counter = "fd_exhausted" if exc.errno in FD_EXHAUSTED else "onward_failed"
        self.stats.add(counter)
        self.rlog.warning(counter, "reset %s:%d: onward connection failed: %s",
                          address_text(client_addr), client_port, exc)
        reset_and_close(client)

    # -- flows waiting for their onward 4-tuple (onward.py) ----------------------------
    def park(self, flow: "PendingFlow") -> None:
        """The onward tuple is still closing: retried every RETRY_INTERVAL for RETRY_FOR
        (retry_parked, from the loop)."""
        if len(self.parked) >= onward.MAX_PARKED:
            self.give_up(flow.client, flow.client_addr, flow.client_port,
                         OSError(errno.EADDRNOTAVAIL, "too many flows waiting for their "
                                 "onward tuple"))
            return
        if not self.parked:
            self.retry_at = time.monotonic() + onward.RETRY_INTERVAL
        self.parked.append((time.monotonic() + onward.RETRY_FOR, flow))

    def retry_parked(self) -> None:
        """Once per RETRY_INTERVAL while flows are parked: those whose tuple freed go on,
        those past their deadline are reset."""
        now = time.monotonic()
        waiting = []
        for deadline, flow in self.parked:
            if self.go_onward(flow, waited=True):
                continue
            if now < deadline:
                waiting.append((deadline, flow))
            else:
                self.give_up(flow.client, flow.client_addr, flow.client_port,
                             OSError(errno.EADDRNOTAVAIL, "its previous connection on this "
                                     "tuple did not close in time"))
        self.parked = waiting
        self.retry_at = now + onward.RETRY_INTERVAL

    # -- modules and the master's requests -------------------------------------------
    def load_module(self, path: str, slots: dict[str, int]) -> vfmodules.LoadedModule:
        """Loads path here and registers its functions in the slots the master chose."""
        name = vfmodules.module_name(path)
        if name in self.modules or name in self.draining:
            raise FunctionConflict(f"module {name!r} is loaded or still draining here")
        module = vfmodules.load_module(path)
        try:
            self.registry.check_free(module.functions)
            if set(slots) != {f.name for f in module.functions}:
                raise FunctionConflict(f"module {name!r} changed since it was checked")
        except FunctionConflict:
            module.unload()
            raise
        for function in module.functions:
            self.registry.register(function, slots[function.name])
        self.modules[name] = module
        self.module_slots[name] = [slots[f.name] for f in module.functions]
        return module

    def module_flows(self, name: str) -> int:
        return sum(self.stats.flows_active(slot) for slot in self.module_slots[name])

    def unload_module(self, name: str) -> int:
        """Stops new flows of the module at once; returns how many flows it still has here
        (it is let go when they are gone, see finish_draining)."""
        module = self.modules.pop(name, None)
        if module is None:
            raise KeyError(f"module {name!r} is not loaded")
        self.registry.unregister_module(name)
        self.draining[name] = module
        active = self.module_flows(name)
        self.finish_draining()
        return active

    def finish_draining(self) -> None:
        for name, module in list(self.draining.items()):
            if self.module_flows(name) == 0:
                del self.draining[name]
                del self.module_slots[name]
                try:
                    module.unload()
                except Exception as exc:  # noqa: BLE001 - deinit failing must not kill us
                    log.warning("worker %d: module %s deinit failed: %r", self.index, name, exc)
                log.info("worker %d: module %s unloaded", self.index, name)

    def describe_modules(self) -> dict:
        flows = {name: self.module_flows(name) for name in self.module_slots}
        return {"loaded": {name: {"path": m.path, "active_flows": flows[name]}
                           for name, m in self.modules.items()},
                "draining": {name: {"path": m.path, "active_flows": flows[name]}
                             for name, m in self.draining.items()}}

    def module_stats(self) -> dict:
        from . import _vf, vf_crypto

        result = {"count": _vf.count_snapshot(), "dpi": _vf.dpi_counters(),
                  "crypto": vf_crypto.stats()}
        for name, module in self.modules.items():
            try:
                extra = module.stats()
            except Exception as exc:  # noqa: BLE001
                extra = {"error": repr(exc)}
            if extra is not None:
                result[name] = extra
        return result

    def handle_control(self) -> None:
        """Serves every request the master has sent (messages.WORKER_REQUESTS, one per
        message); each reply carries the request's id."""
        while self.channel is not None:
            try:
                message = self.channel.recv(messages.MAX_MESSAGE + 1, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                message = b""
            if not message:
                # The master is gone (its parent-death signal is on its way, or it closed
                # our channel): stop watching a descriptor that would stay readable.
                self.channel.close()
                self.channel = None
                return
            request_id = 0
            try:
                request = messages.parse(message, messages.WORKER_REQUESTS, need_id=True)
                request_id = request.id
                reply = messages.reply_ok(**self.control_request(request))
            except (messages.MessageError, vfmodules.ModuleLoadError, FunctionConflict,
                    KeyError) as exc:
                reply = messages.reply_error(str(exc).strip("'\""))
            self.tell_master({"id": request_id, **reply})

    def tell_master(self, message: dict) -> None:
        if self.channel is None:
            return
        try:
            self.channel.send(json.dumps(message).encode(), socket.MSG_DONTWAIT)
        except OSError as exc:
            self.rlog.warning("channel", "worker %d: cannot answer the master: %s",
                              self.index, exc)

    def control_request(self, request: messages.Message) -> dict:
        if isinstance(request, messages.LoadModule):
            module = self.load_module(request.path, dict(request.slots))
            return {"module": module.name}
        if isinstance(request, messages.UnloadModule):
            return {"active_flows": self.unload_module(request.module)}
        if isinstance(request, messages.ListModules):
            return self.describe_modules()
        return {"stats": self.module_stats()}   # messages.ModuleStats


