"""SYN capture: NFQUEUE -> SRH table. The first step of the data path.

The kernel queues every SYN addressed to this proxy's locator (ip6tables-legacy
``-p tcp --syn -j NFQUEUE --queue-num Q --queue-bypass``). This process reads the full
packet copy, which still carries the original destination (our function address) and the
original segments-left, and stores the SRH in the shared table under the key the worker
sees after accept(): (client address, client port, final destination, destination port).
Only then does it accept the packet, so the entry exists before the SYN reaches the
listener. Packets are always accepted, never dropped: a SYN without an SRH or with a
malformed one goes on and the worker decides (it resets it).

Counters live in the SRH table header (``_srhtable.COUNTERS``), so the master and
``pipesctl`` read them from any mapping of the table. Per packet read from the queue,
``syn_seen`` grows by one and so does exactly one of ``inserts``, ``rejected`` (SRH
larger than the table's slots), ``no_srh``, ``malformed``, ``not_syn``, ``hmac_refused``
(dropped: ``--require-hmac`` and no valid HMAC, or a wrong one) and ``errors``. ``stacked``
also counts the SYNs whose binding SRH was flattened into the client's (srhstack.py).

Process shape: the master forks one capture per worker CPU (``--captures``), each pinned
to its CPU and bound to its own queue: the kernel's CPU fan-out puts a SYN in the queue of
the CPU that received it (:func:`capture_placement`), so the SYN's verdict, its TCP
processing and its SYN-ACK stay on that CPU, and no capture waits for another. They all
write the one table (concurrent writers: cext/srhtable_impl.h). The master calls
:func:`run_capture_process` (table created by the master); :func:`capture_main` creates
the table itself. Both name the process, ask for SIGTERM when the master dies, drop every
capability but CAP_NET_ADMIN (needed to send verdicts) and stop promptly on
SIGTERM/SIGINT.
``python -m srv6pipes.capture NAME QUEUE`` runs it in the foreground (tests, debugging).
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import select
import signal
import socket
import struct
import sys
import warnings
from typing import Callable, Optional

from . import _srhtable, system
from .ratelimit import RateLimitedLogger
from .srh import SRHError, find_srh
from .srhhmac import HmacKeyring, HmacRefused
from .srhstack import syn_route
from .timewait import TimeWaitReaper

log = logging.getLogger("srv6pipes.capture")

EXIT_BOOT_FAILED = system.EXIT_BOOT_FAILED   # the master does not re-fork us in a tight loop
EXIT_CRASHED = system.EXIT_CRASHED

IPPROTO_TCP = 6
TCP_SYN = 0x02
TCP_ACK = 0x10
IPV6_HEADER_LENGTH = 40

# Bytes of each packet copied to us: the IPv6 header, room for two stacked SRHs (a binding's,
# each no longer than a table slot keeps) and for other extension headers and the TCP header.
# A SYN is shorter than that unless it carries data (TCP Fast Open), which we never read.
COPY_RANGE = IPV6_HEADER_LENGTH + 2 * _srhtable.SRH_MAX + 256
# Accept verdicts are sent for a run of SYNs at once (one NFQNL_MSG_VERDICT_BATCH) when the
# queue holds several; at most this many wait for theirs.
VERDICT_BATCH = 32
QUEUE_MAXLEN = 4096         # SYNs the kernel holds for us before it drops (ENOBUFS)
# SYNs the capture rejects are dropped, not passed on to the listener: a worker could only
# reset them, and under a flood of them (garbage SRHs, SRHs not for us) each would take a
# place in the listener's SYN queue that a real client needs. Unexpected errors (ours)
# still accept: the worker then falls back to the kernel's saved SYN.
DROPPED = frozenset({"no_srh", "malformed", "rejected", "hmac_refused"})
READ_BUDGET = 256           # queue messages handled before the stop flag is checked again
POLL_INTERVAL = 0.5         # seconds; the wake-up fd makes stopping immediate anyway


class CaptureError(Exception):
    """The queue cannot be bound (taken by another process, no permission, no module)."""


class SynCapture:
    """One bound NFQUEUE queue feeding the SRH table (one of its writers, one per CPU).

    handle_payload() is the pure per-packet logic (no I/O but the table); bind(), serve()
    and close() own the queue.
    """

    def __init__(self, table, queue_num: int, logger: Optional[logging.Logger] = None,
                 queue_maxlen: int = QUEUE_MAXLEN, return_routes=None,
                 hmac_keyring=None, require_hmac: bool = False):
        self.table = table
        # SRH HMAC (srhhmac.py): an HmacKeyring checks HMACs present; require_hmac also
        # drops SYNs without one. Such SYNs take the Python path (srhstack.syn_route).
        self.hmac_keyring = hmac_keyring
        self.require_hmac = require_hmac
        if hmac_keyring is not None or require_hmac:  # the C fast path checks them too
            table.set_hmac(hmac_keyring.keys if hmac_keyring is not None else None,
                           require_hmac)
        # Off-path proxies: a returnpath.ReturnRoutes that marks each SYN with its return
        # path (see returnpath.py); None on-path.
        self.return_routes = return_routes
        # Retires our own TIME_WAIT socket on a reused client port (see timewait.py).
        self.reaper = None
        self.queue_num = queue_num
        self.queue_maxlen = queue_maxlen
        self.log = logger or log
        self.rlog = RateLimitedLogger(self.log)
        self.nfq = None
        self._sock: Optional[socket.socket] = None
        self._verdicts: Optional[_VerdictBatch] = None

    # -- per packet --------------------------------------------------------------------
    def handle_payload(self, payload: bytes, set_mark: Optional[Callable[[int], None]] = None) -> str:
        """Records the SRH of one queued packet; returns the counter it was counted in
        (DROPPED ones get a drop verdict, the others accept).

        Called for each packet before its verdict. Never raises for bad packets. With
        return routes, calls set_mark(mark) so the connection's replies take its return path.
        """
        table = self.table
        if self.return_routes is None and type(payload) is bytes:
            # The common SYNs, parsed and inserted in C (cext/synparse.h, synbinding.h);
            # None means "anything else", left to the Python parser below with nothing
            # counted yet.
            flow = table.record_syn(payload)
            if type(flow) is str:  # "hmac_refused", counted
                self.rlog.warning("hmac_refused", "SYN dropped: SRH HMAC missing or wrong")
                return flow
            if flow is not None:
                client, client_port, destination, dest_port = flow
                self._retire_time_wait(client, client_port, destination, dest_port)
                return "inserts"
        table.count("syn_seen")
        try:
            if len(payload) >= COPY_RANGE:
                payload = _untruncate(payload)
            info = find_srh(payload)
            if info.proto != IPPROTO_TCP or info.sport is None:
                return self._count("not_syn", "not a TCP packet (protocol %s)", info.proto)
            flags_at = info.l4_offset + 13
            if flags_at >= len(payload) or payload[flags_at] & (TCP_SYN | TCP_ACK) != TCP_SYN:
                return self._count("not_syn", "TCP packet from [%s]:%s is not a SYN",
                                   info.src, info.sport)
            if info.srh is None:
                return self._count("no_srh", "SYN without SRH from [%s]:%s to [%s]:%s",
                                   info.src, info.sport, info.dst, info.dport,
                                   level=logging.DEBUG)
            try:
                # A binding's stacked SRHs become one; HMAC checked (srhstack.py).
                route = syn_route(info, self.hmac_keyring, self.require_hmac)
            except HmacRefused as exc:
                return self._count("hmac_refused", "SYN from [%s]:%s dropped: %s (%s)",
                                   info.src, info.sport, exc, exc.reason)
            if route.stacked:
                table.count("stacked")
            srh = route.srh
            client = info.src.packed
            destination = srh.final_destination.packed
            self._retire_time_wait(client, info.sport, destination, info.dport)
            if self.return_routes is not None and set_mark is not None:
                mark = self.return_routes.mark_for(srh, info.src)
                if mark:
                    set_mark(mark)
            # Key as the worker sees it after accept(): peer = client, local = final dest.
            if table.insert(client, info.sport, destination, info.dport, route.segments_left,
                            route.wire):
                return "inserts"
            self.rlog.warning("rejected", "SYN from [%s]:%s: SRH of %d bytes is larger than "
                              "the table's %d-byte slots; the worker will reset it", info.src,
                              info.sport, srh.wire_length, _srhtable.SRH_MAX)
            return "rejected"
        except SRHError as exc:
            return self._count("malformed", "malformed SYN: %s", exc)
        except Exception as exc:  # noqa: BLE001 - one odd packet must not stop the capture
            return self._count("errors", "error handling a SYN: %r", exc, level=logging.ERROR)

    def _retire_time_wait(self, client: bytes, client_port: int, destination: bytes,
                          dest_port: int) -> None:
        """Our TIME_WAIT socket on this tuple (destination:port <- client:port), if any,
        would swallow the handshake: retire it (timewait.py)."""
        if self.reaper is None:
            return
        try:
            if self.reaper.retire(destination, dest_port, client, client_port):
                self.table.count("time_wait_retired")
        except OSError as exc:
            self.rlog.warning("time_wait", "cannot retire TIME_WAIT [%s]:%s: %s",
                              socket.inet_ntop(socket.AF_INET6, client), client_port, exc)

    def _count(self, counter: str, msg: str, *args, level: int = logging.WARNING) -> str:
        self.table.count(counter)
        self.rlog.log(level, counter, msg, *args)
        return counter

    def _on_packet(self, packet) -> None:
        """netfilterqueue callback. Must not raise (netfilterqueue would lose the error and
        the packet its verdict). Once the queue is bound, an accept is deferred to the batch
        (send_verdicts), unless the SYN may carry a mark (return routes: a batch verdict
        sets none); drops go at once."""
        outcome = "errors"
        try:
            outcome = self.handle_payload(packet.get_payload(), packet.set_mark)
        except Exception as exc:  # noqa: BLE001
            self.table.count("errors")
            self.rlog.error("callback", "SYN capture callback failed: %r", exc)
        finally:
            try:
                if outcome in DROPPED:
                    packet.drop()
                elif self._verdicts is not None and self.return_routes is None:
                    if self._verdicts.defer(packet.id):
                        self.send_verdicts()
                else:
                    packet.accept()
            except Exception as exc:  # noqa: BLE001 - verdict already given / queue gone
                self.rlog.error("verdict", "the verdict on a queued SYN failed: %r", exc)

    def send_verdicts(self) -> None:
        """Accepts every SYN whose verdict was deferred (one message). Called when the queue
        has nothing more to read, every VERDICT_BATCH SYNs, and before unbinding."""
        if self._verdicts is None:
            return
        try:
            if self._verdicts.send():
                self.table.count("verdict_batches")
        except OSError as exc:
            # Those SYNs stay queued until the kernel drops them at unbind: count them.
            self.table.count("errors", self._verdicts.count)
            self.rlog.error("verdict", "a batch verdict failed (%s): %d SYNs not accepted",
                            exc, self._verdicts.count)
            self._verdicts.clear()

    # -- the queue ---------------------------------------------------------------------
    def bind(self) -> None:
        """Binds queue `queue_num` in full-copy mode. Raises CaptureError naming the cause."""
        try:
            from netfilterqueue import COPY_PACKET, NetfilterQueue
        except ImportError as exc:
            raise CaptureError("the NetfilterQueue package is not installed "
                               "(pip install NetfilterQueue; needs libnetfilter-queue)") from exc
        try:
            nfq = NetfilterQueue(af=socket.AF_INET6)
        except OSError as exc:
            raise CaptureError(f"cannot open an NFQUEUE handle ({exc}): are we root "
                               "(CAP_NET_ADMIN) and is nfnetlink_queue available?") from exc
        # netfilterqueue warns when the socket buffer is smaller than it asked for; with
        # warnings turned into errors that would abort bind() after the queue was created.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                nfq.bind(self.queue_num, self._on_packet, max_len=self.queue_maxlen,
                         mode=COPY_PACKET, range=COPY_RANGE)
            except OSError as exc:
                raise CaptureError(
                    f"cannot bind NFQUEUE {self.queue_num} ({exc}): another process (another "
                    "pipesd instance?) holds this queue number, or we lack CAP_NET_ADMIN; "
                    "pick another --queue-num") from exc
        for warning in caught:
            self.log.warning("NFQUEUE %d: %s", self.queue_num, warning.message)
        self.nfq = nfq
        # A socket object on a dup of the queue's netlink fd: non-blocking reads in bounded
        # batches (run_socket), so the stop flag is checked even under a SYN flood.
        self._sock = socket.socket(fileno=os.dup(nfq.get_fd()))
        self._sock.setblocking(False)
        self._verdicts = _VerdictBatch(self._sock, self.queue_num)
        try:
            self.reaper = TimeWaitReaper()
        except OSError as exc:  # no sock_diag: short connections may stall on port reuse
            self.log.warning("cannot open sock_diag (%s): TIME_WAIT sockets will not be "
                             "retired on client port reuse", exc)

    def serve(self, should_stop: Callable[[], bool], wake_fd: Optional[int] = None,
              poll_interval: float = POLL_INTERVAL) -> None:
        """Handles queued SYNs until should_stop() is true. A byte on wake_fd (e.g. the
        signal wake-up fd) makes the check immediate; it is drained here."""
        if self.nfq is None:
            raise RuntimeError("SynCapture.serve() before bind()")
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        if wake_fd is not None:
            poller.register(wake_fd, select.POLLIN)
        reader = _BudgetedReader(self._sock, self.table)
        timeout_ms = int(poll_interval * 1000)
        while not should_stop():
            try:
                events = poller.poll(timeout_ms)
            except InterruptedError:
                continue
            for fd, _ in events:
                if fd == wake_fd:
                    _drain(wake_fd)
                else:
                    reader.budget = READ_BUDGET
                    try:
                        self.nfq.run_socket(reader)
                    finally:  # the queue is empty for now (or the budget spent)
                        self.send_verdicts()

    def close(self) -> None:
        """Unbinds the queue (the kernel then bypasses it: --queue-bypass). Idempotent."""
        self.send_verdicts()
        self._verdicts = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.nfq is not None:
            self.nfq.unbind()
            self.nfq = None
        if self.reaper is not None:
            self.reaper.close()
            self.reaper = None
        self.rlog.flush()


class _VerdictBatch:
    """Accept verdicts owed for a run of queued SYNs, sent as one NFQNL_MSG_VERDICT_BATCH:
    the kernel accepts every packet of the queue whose id is at most the one named (ids
    grow in queue order; the ones dropped already have left the queue). The message, on
    the queue's own netlink socket (the kernel takes verdicts only from its reader)::

        struct nlmsghdr { u32 len; u16 type = NFNL_SUBSYS_QUEUE << 8 | VERDICT_BATCH;
                          u16 flags = NLM_F_REQUEST; u32 seq, pid; }     host order
        struct nfgenmsg { u8 family = AF_UNSPEC, version = 0; be16 res_id = queue; }
        struct nlattr { u16 len = 12, type = NFQA_VERDICT_HDR; }         host order
        struct nfqnl_msg_verdict_hdr { be32 verdict = NF_ACCEPT; be32 id; }
    """

    NFNL_SUBSYS_QUEUE = 3
    NFQNL_MSG_VERDICT_BATCH = 3
    NLM_F_REQUEST = 1
    NFQA_VERDICT_HDR = 2
    NF_ACCEPT = 1

    def __init__(self, sock: socket.socket, queue_num: int):
        self.sock = sock
        self.head = struct.pack("=IHHII", 32, self.NFNL_SUBSYS_QUEUE << 8
                                | self.NFQNL_MSG_VERDICT_BATCH, self.NLM_F_REQUEST, 0, 0) \
            + struct.pack(">BBH", socket.AF_UNSPEC, 0, queue_num) \
            + struct.pack("=HH", 12, self.NFQA_VERDICT_HDR)
        self.last_id: Optional[int] = None
        self.count = 0

    def defer(self, packet_id: int) -> bool:
        """Owes packet_id an accept; True when the batch is full (send it now)."""
        self.last_id = packet_id
        self.count += 1
        return self.count >= VERDICT_BATCH

    def send(self) -> bool:
        """Sends the batch; False when no verdict was owed."""
        if self.last_id is None:
            return False
        self.sock.send(self.head + struct.pack(">II", self.NF_ACCEPT, self.last_id))
        self.clear()
        return True

    def clear(self) -> None:
        self.last_id = None
        self.count = 0


class _BudgetedReader:
    """What NetfilterQueue.run_socket() reads from: the queue socket, with EAGAIN after
    `budget` messages (run_socket returns on EAGAIN) and ENOBUFS counted as queue_drops."""

    def __init__(self, sock: socket.socket, table):
        self.sock = sock
        self.table = table
        self.budget = READ_BUDGET

    def recv(self, size: int) -> bytes:
        if self.budget <= 0:
            raise BlockingIOError(errno.EAGAIN, "read budget spent")
        self.budget -= 1
        try:
            return self.sock.recv(size)
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                self.table.count("queue_drops")
            raise


def _untruncate(payload: bytes) -> bytes:
    """A packet longer than COPY_RANGE arrives cut; its headers are all there. Make the IPv6
    payload length match what we have so find_srh parses the headers."""
    if len(payload) < IPV6_HEADER_LENGTH or payload[0] >> 4 != 6:
        return payload
    claimed = int.from_bytes(payload[4:6], "big")
    have = len(payload) - IPV6_HEADER_LENGTH
    if claimed <= have:
        return payload
    return payload[:4] + have.to_bytes(2, "big") + payload[6:]


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except (BlockingIOError, InterruptedError):
        pass


# -- the process -----------------------------------------------------------------------
def capture_placement(cpus: list[int], count: int) -> list[tuple[int, int]]:
    """(CPU, queue offset) of each of `count` captures, given the CPUs pipesd may use.

    Capture i runs where worker i does (cpus[i modulo their number]). The kernel's CPU
    fan-out (``--queue-cpu-fanout``, nft ``fanout``) queues a SYN received on CPU c to
    offset c modulo count, so capture i reads offset cpus[i] modulo count: its SYNs then
    arrive on its own CPU. When two captures' CPUs give the same offset (an affinity such
    as {0, 2} with two captures), the offsets are 0 .. count-1 in order instead: every
    queue is still read, without that locality."""
    placed = [cpus[index % len(cpus)] for index in range(count)]
    offsets = [cpu % count for cpu in placed]
    if len(set(offsets)) != count:
        offsets = list(range(count))
    return list(zip(placed, offsets))


def run_capture_process(name: str, queue_num: int, table, return_routes=None,
                        hmac_keyring: Optional[str] = None, require_hmac: bool = False,
                        index: int = 0, cpu: Optional[int] = None) -> None:
    """Post-fork entry point used by the master (which created `table`). Never returns.
    hmac_keyring is the path of the SRH HMAC key file (read here, at every start); the
    process is pinned to `cpu` (None: not pinned)."""
    code = _process_body(name, queue_num, lambda: table, return_routes, hmac_keyring,
                         require_hmac, index, cpu)
    _exit(code)


def capture_main(name: str, queue_num: int, nslots: int = _srhtable.DEFAULT_SLOTS,
                 ttl_ms: int = _srhtable.DEFAULT_TTL_MS) -> int:
    """Entry point that creates the table itself (replacing a stale one), then captures
    until SIGTERM. Returns the exit code: 0 stopped, EXIT_BOOT_FAILED could not start,
    EXIT_CRASHED failed later. In a forked child call os._exit(capture_main(...))."""
    return _process_body(name, queue_num,
                         lambda: _srhtable.SrhTable.create(name, nslots, ttl_ms))


def _process_body(name: str, queue_num: int, open_table: Callable, return_routes=None,
                  hmac_keyring: Optional[str] = None, require_hmac: bool = False,
                  index: int = 0, cpu: Optional[int] = None) -> int:
    parent = os.getppid()
    stop = []
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def handle_stop(signum, frame):
        stop.append(signum)

    try:
        _name_process(name, index, parent)
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, handle_stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.set_wakeup_fd(wake_w)
        table = open_table()
        table.prefault()  # no page faults on the per-SYN path (see SrhTable.prefault)
        keyring = HmacKeyring.load(hmac_keyring) if hmac_keyring else None
        capture = SynCapture(table, queue_num, log, return_routes=return_routes,
                             hmac_keyring=keyring, require_hmac=require_hmac)
        capture.bind()
        _drop_capabilities()
    except Exception as exc:  # noqa: BLE001 - every boot failure is reported the same way
        log.error("capture %d [%s] failed to start: %s", index, name, exc)
        return EXIT_BOOT_FAILED
    log.info("capture %d [%s] (pid %d, CPU %s): NFQUEUE %d -> SRH table %s", index, name,
             os.getpid(), "any" if cpu is None else cpu, queue_num, table.segment)
    try:
        capture.serve(lambda: bool(stop), wake_r)
    except Exception:  # noqa: BLE001
        log.exception("capture %d [%s] crashed", index, name)
        return EXIT_CRASHED
    finally:
        capture.close()
        signal.set_wakeup_fd(-1)
        os.close(wake_r)
        os.close(wake_w)
    counters = table.counters()   # of the table: every capture's together
    log.info("capture %d [%s] stopped; table counters: %s", index, name,
             ", ".join(f"{key} {counters[key]}" for key in
                       ("syn_seen", "inserts", "no_srh", "malformed", "rejected",
                        "hmac_refused")))
    return 0


def _name_process(name: str, index: int, parent: int) -> None:
    try:
        import prctl
    except ImportError:  # pragma: no cover - python-prctl is a dependency
        log.warning("python-prctl missing: no process name, no parent-death signal")
        return
    prctl.set_name(f"pipesd cap{index}")  # 15 characters: the kernel's limit
    prctl.set_proctitle(f"pipesd: capture {index} [{name}]")
    prctl.set_pdeathsig(signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before pdeathsig was armed
        raise CaptureError("parent process exited during start-up")


def _drop_capabilities() -> None:
    """Keeps CAP_NET_ADMIN only: nfnetlink checks it on every verdict we send. The capture
    parses untrusted packets, so it should hold nothing else."""
    try:
        system.drop_capabilities(system.CAPTURE_CAPABILITIES)
    except Exception as exc:  # noqa: BLE001 - not fatal: we run, with more privilege
        log.warning("could not drop capabilities: %s", exc)


def _exit(code: int) -> None:
    for handler in logging.getLogger().handlers + log.handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv=None) -> int:
    """``python -m srv6pipes.capture NAME QUEUE``: capture in the foreground."""
    parser = argparse.ArgumentParser(prog="python -m srv6pipes.capture", description=__doc__
                                     .split("\n\n")[0])
    parser.add_argument("name", help="pipesd instance name (SRH table /srv6pipes-NAME-srh)")
    parser.add_argument("queue_num", type=int, help="NFQUEUE number")
    parser.add_argument("--slots", type=int, default=_srhtable.DEFAULT_SLOTS)
    parser.add_argument("--ttl-ms", type=int, default=_srhtable.DEFAULT_TTL_MS)
    parser.add_argument("--unlink-on-exit", action="store_true",
                        help="remove the table when stopping (default: leave it to the master)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return capture_main(args.name, args.queue_num, args.slots, args.ttl_ms)
    finally:
        if args.unlink_on_exit:
            _srhtable.unlink(args.name)


if __name__ == "__main__":
    sys.exit(main())
