"""SYN capture: per-packet logic (no network) and end to end over NFQUEUE in a namespace.

The end-to-end tests build one network namespace per test (always deleted), with two local
"segment" addresses on lo, SRv6 enabled and an ip6tables-legacy NFQUEUE rule for SYNs, run
``python -m srv6pipes.capture`` inside it and open connections from a forked child that
joined the namespace. lo traffic goes through OUTPUT then PREROUTING, so the rule sees each
SYN once, with its original destination and segments-left; the kernel's SRH processing
then loops the packet locally to the final destination.
"""
import ipaddress
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid

import pytest

from srv6pipes import _srhtable, capture
from srv6pipes.ratelimit import RateLimitedLogger
from srv6pipes.srh import RETURN_PATH_TLV, SRH, TLV
from srv6pipes.system import IPV6_RTHDR

from tests.support.childrun import run_in_child
from tests.support.synpackets import (ipv6_packet, scratch_table, syn_with_srh, table_counts,
                        tcp_header)

A = ipaddress.IPv6Address
CLIENT = A("fc00:c::1")
P1 = A("fc00:1::1")       # "proxy" segments: local addresses of the namespace
P2 = A("fc00:2::1")
P3 = A("fc00:3::1")
SERVER = A("fc00:5::80")


@pytest.fixture
def table():
    with scratch_table("cap") as writer:
        yield writer


# -- per-packet logic, no network -------------------------------------------------------
def test_syn_with_srh_is_inserted_under_the_workers_key(table):
    srh = SRH((SERVER, P2, P1), segments_left=2)
    assert capture.SynCapture(table, 0).handle_payload(syn_with_srh(srh)) == "inserts"
    # The worker sees peer = client, local = final destination.
    assert table.lookup(CLIENT.packed, 40000, SERVER.packed, 80) == (2, srh.to_bytes())
    assert table_counts(table) == {"syn_seen": 1, "inserts": 1}


def test_srh_with_tlvs_is_kept_whole(table):
    srh = SRH((SERVER, P1), tlvs=(TLV(RETURN_PATH_TLV, P1.packed + CLIENT.packed),))
    capture.SynCapture(table, 0).handle_payload(syn_with_srh(srh, sport=1))
    assert table.lookup(CLIENT, 1, SERVER, 80) == (1, srh.to_bytes())


@pytest.mark.parametrize("packet, counter", [
    (ipv6_packet(CLIENT, SERVER, 6, tcp_header()), "no_srh"),
    (ipv6_packet(CLIENT, SERVER, 6, tcp_header(flags=0x12)), "not_syn"),   # SYN-ACK
    (ipv6_packet(CLIENT, SERVER, 6, tcp_header(flags=0x10)), "not_syn"),   # ACK
    (ipv6_packet(CLIENT, SERVER, 17, struct.pack("!HHHH", 1, 2, 8, 0)), "not_syn"),
    (syn_with_srh(SRH((SERVER, P1)))[:50], "malformed"),                   # truncated
    (b"\x45" + bytes(39), "malformed"),                                    # IPv4
    (ipv6_packet(CLIENT, P1, 43, bytes([6, 2, 4, 5, 0, 0, 0, 0]) + bytes(16)
                 + tcp_header()), "malformed"),                            # SL > last entry
    (b"", "malformed"),
])
def test_other_packets_are_counted_not_inserted(table, packet, counter):
    assert capture.SynCapture(table, 0).handle_payload(packet) == counter
    assert table_counts(table) == {"syn_seen": 1, counter: 1}


def test_srh_too_large_for_a_slot_is_rejected(table):
    srh = SRH(tuple(A(f"fc00:9::{i + 1:x}") for i in range(64)))  # 8 + 64 * 16 > 1024
    assert capture.SynCapture(table, 0).handle_payload(syn_with_srh(srh)) == "rejected"
    assert table_counts(table) == {"syn_seen": 1, "rejected": 1}


def test_truncated_copy_of_a_long_syn_still_parses(table):
    srh = SRH((SERVER, P1))
    packet = ipv6_packet(CLIENT, P1, 43, srh.to_bytes() + tcp_header() + bytes(6000))
    assert capture.SynCapture(table, 0).handle_payload(packet[:capture.COPY_RANGE]) == "inserts"


class FakePacket:
    def __init__(self, payload=None, error=None):
        self.payload, self.error, self.verdicts = payload, error, []

    def get_payload(self):
        if self.error:
            raise self.error
        return self.payload

    def set_mark(self, mark):
        self.mark = mark

    def accept(self):
        self.verdicts.append("accept")

    def drop(self):
        self.verdicts.append("drop")


@pytest.mark.parametrize("packet, verdict, counter", [
    (FakePacket(syn_with_srh(SRH((SERVER, P1)))), "accept", "inserts"),
    (FakePacket(b"garbage"), "drop", "malformed"),   # a worker could only reset it
    (FakePacket(error=RuntimeError("payload gone")), "accept", "errors"),  # ours: let it go
])
def test_callback_gives_one_verdict_and_never_raises(table, packet, verdict, counter):
    capture.SynCapture(table, 0)._on_packet(packet)
    assert packet.verdicts == [verdict]
    assert table_counts(table).get(counter) == 1


class VerdictChecks(FakePacket):
    """A packet whose verdict looks the SYN's key up in the table, as a worker's accept()
    right after the verdict would."""

    def __init__(self, payload, table, key):
        super().__init__(payload)
        self.table, self.key, self.found = table, key, []

    def accept(self):
        self.found.append(self.table.lookup(*self.key))
        super().accept()


@pytest.mark.parametrize("path, srh", [
    ("C", SRH((SERVER, P1))),
    ("Python", SRH((SERVER, P1), tlvs=(TLV(RETURN_PATH_TLV, P1.packed + CLIENT.packed),))),
])
def test_the_table_entry_precedes_the_verdict(table, path, srh, monkeypatch):
    """The SRH is in the table before the SYN is let go (the saved-SYN fallback would hide
    an entry written after it), on the C fast path and on the Python path."""
    parsed = []

    def find_srh(payload):
        parsed.append(payload)
        return real_find_srh(payload)
    real_find_srh = capture.find_srh
    monkeypatch.setattr(capture, "find_srh", find_srh)
    packet = VerdictChecks(syn_with_srh(srh, sport=4321), table, (CLIENT, 4321, SERVER, 80))
    capture.SynCapture(table, 0)._on_packet(packet)
    assert len(parsed) == (path == "Python")   # the path the case names was taken
    assert packet.verdicts == ["accept"]
    assert packet.found == [(1, srh.to_bytes())]
    assert table_counts(table)["inserts"] == 1


def test_capture_errors_are_counted(table, monkeypatch):
    def broken(payload):
        raise KeyError("bug")

    monkeypatch.setattr(capture, "find_srh", broken)
    assert capture.SynCapture(table, 0).handle_payload(b"x" * 60) == "errors"
    assert table_counts(table) == {"syn_seen": 1, "errors": 1}


def test_rate_limited_logger_suppresses_and_reports(caplog):
    now = [100.0]
    rlog = RateLimitedLogger(logging.getLogger("test.rl"), burst=2, interval=10,
                             clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.rl"):
        written = [rlog.warning("bad", "bad SYN %d", i) for i in range(5)]
        assert written == [True, True, False, False, False]
        assert rlog.warning("other", "other key") is True  # keys are independent
        assert rlog.suppressed("bad") == 3
        now[0] += 10
        assert rlog.warning("bad", "bad SYN %d", 5) is True
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["bad SYN 0", "bad SYN 1", "other key",
                        "bad SYN 5 (3 similar messages suppressed)"]
    assert rlog.suppressed("bad") == 0


def test_rate_limited_logger_flush_reports_pending(caplog):
    rlog = RateLimitedLogger(logging.getLogger("test.rl2"), burst=1, interval=60)
    with caplog.at_level(logging.INFO, logger="test.rl2"):
        for _ in range(4):
            rlog.error("k", "boom")
        rlog.flush()
        rlog.flush()
    assert [r.getMessage() for r in caplog.records] == ["boom", "3 more 'k' messages suppressed"]
    with pytest.raises(ValueError):
        RateLimitedLogger(logging.getLogger("x"), burst=0)


# -- end to end -------------------------------------------------------------------------
def run(*argv, check=True):
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=30)


def require_root_tools():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, NFQUEUE)")
    for tool in ("ip", "ip6tables-legacy"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


@pytest.fixture
def netns():
    """A fresh namespace with P1, P2 and P3 on lo and SRv6 on; always deleted."""
    require_root_tools()
    name = f"sp-cap-{uuid.uuid4().hex[:8]}"
    run("ip", "netns", "add", name)
    try:
        def inside(*argv):
            return run("ip", "netns", "exec", name, *argv)

        inside("ip", "link", "set", "lo", "up")
        for address in (P1, P2, P3):
            inside("ip", "-6", "addr", "add", f"{address}/128", "dev", "lo", "nodad")
        inside("sysctl", "-qw", "net.ipv6.conf.all.seg6_enabled=1",
               "net.ipv6.conf.lo.seg6_enabled=1")
        yield name
    finally:
        run("ip", "netns", "del", name, check=False)


QUEUE = 7


class CaptureProcess:
    """``python -m srv6pipes.capture`` inside the namespace; stderr goes to a file."""

    def __init__(self, netns, tmp_path, queue=QUEUE, tag="a"):
        self.name = f"cap{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.log_path = tmp_path / f"capture-{tag}.log"
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "srv6pipes.capture",
             self.name, str(queue), "--slots", "256", "--log-level", "debug"],
            stdout=self.log_file, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout=15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if f"NFQUEUE {QUEUE} ->" in self.log_path.read_text():
                return _srhtable.SrhTable.attach(self.name)
            if self.proc.poll() is not None:
                raise AssertionError(f"capture exited {self.proc.returncode}: {self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"capture not ready after {timeout}s: {self.log()}")

    def log(self):
        return self.log_path.read_text()

    def stop(self, timeout=10.0):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.log_file.close()
        _srhtable.unlink(self.name)
        return self.proc.returncode


@pytest.fixture
def queued_netns(netns):
    subprocess.run(["ip", "netns", "exec", netns, "ip6tables-legacy", "-t", "mangle", "-A",
                    "PREROUTING", "-p", "tcp", "--syn", "-j", "NFQUEUE", "--queue-num",
                    str(QUEUE), "--queue-bypass"], check=True, timeout=30)
    return netns


@pytest.fixture
def capture_proc(queued_netns, tmp_path):
    process = CaptureProcess(queued_netns, tmp_path)
    yield process
    process.stop()


def in_netns(netns, func, *args, timeout=30.0):
    """Runs func(*args) in a forked child that joined netns; returns its result."""
    def joined():
        from pyroute2.netns import setns

        setns(netns)
        return func(*args)

    return run_in_child(joined, timeout=timeout)


def connect_and_echo(srh_bytes, count=1, port=8080, timeout=5):
    """Listener on P2 (the final destination); `count` connections, each with the SRH (if
    any) on the client socket. Returns [(peer, local)] as the accepting side saw them."""
    seen = []
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((str(P2), port))
        listener.listen(128)
        listener.settimeout(timeout)
        for _ in range(count):
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as client:
                client.settimeout(timeout)
                if srh_bytes is not None:
                    client.setsockopt(socket.IPPROTO_IPV6, IPV6_RTHDR, srh_bytes)
                client.connect((str(P2), port))
                accepted, peer = listener.accept()
                with accepted:
                    accepted.settimeout(5)
                    client.sendall(b"ping")
                    assert accepted.recv(4) == b"ping"
                    seen.append((peer[:2], accepted.getsockname()[:2]))
    return seen


def queue_bound(netns, queue=QUEUE):
    """True when some process reads NFQUEUE `queue` of the namespace."""
    listing = run("ip", "netns", "exec", netns, "cat", "/proc/net/netfilter/nfnetlink_queue")
    return any(line.split()[:1] == [str(queue)] for line in listing.stdout.splitlines())


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.e2e
def test_syn_with_srh_is_in_the_table_before_accept(capture_proc, queued_netns):
    reader = capture_proc.wait_ready()
    srh = SRH.from_path([P1, P2])  # P1 first, then P2 = the final destination
    [(peer, local)] = in_netns(queued_netns, connect_and_echo, srh.to_bytes())
    assert local == (str(P2), 8080)
    assert reader.lookup(peer[0], peer[1], local[0], local[1]) == (1, srh.to_bytes())
    counters = reader.counters()
    assert (counters["syn_seen"], counters["inserts"], counters["used"]) == (1, 1, 1)
    reader.close()


@pytest.mark.e2e
def test_three_segments_and_tlvs(capture_proc, queued_netns):
    """Path P1 -> P3 -> P2: the queue sees the SYN once, as P1 gets it (segments-left 2)."""
    reader = capture_proc.wait_ready()
    srh = SRH((P2, P3, P1), tlvs=(TLV(RETURN_PATH_TLV, P3.packed + P1.packed),))
    [(peer, local)] = in_netns(queued_netns, connect_and_echo, srh.to_bytes())
    entry = reader.lookup(peer[0], peer[1], local[0], local[1])
    assert entry is not None, capture_proc.log()
    assert entry == (2, srh.to_bytes())
    assert SRH.parse(entry[1]).tlvs == srh.tlvs
    assert reader.counters()["syn_seen"] == 1
    reader.close()


@pytest.mark.e2e
def test_syn_without_srh_is_counted_and_dropped(capture_proc, queued_netns):
    """Nothing can proxy it: the verdict is drop, so it takes no place in a SYN queue."""
    reader = capture_proc.wait_ready()
    # The SYN (and its retransmission) is dropped: the child's connect times out.
    with pytest.raises(AssertionError, match="TimeoutError"):
        in_netns(queued_netns, connect_and_echo, None, 1, 8080, 2)
    counters = reader.counters()
    assert counters["syn_seen"] >= 1 and counters["no_srh"] == counters["syn_seen"]
    assert counters["inserts"] == 0
    reader.close()


@pytest.mark.e2e
def test_many_connections(capture_proc, queued_netns):
    reader = capture_proc.wait_ready()
    srh = SRH.from_path([P1, P2])
    seen = in_netns(queued_netns, connect_and_echo, srh.to_bytes(), 50)
    assert len({peer for peer, _ in seen}) == 50
    for peer, local in seen:
        assert reader.lookup(peer[0], peer[1], local[0], local[1]) == (1, srh.to_bytes())
    counters = reader.counters()
    assert counters["syn_seen"] == counters["inserts"] == 50 and counters["errors"] == 0
    reader.close()


@pytest.mark.e2e
def test_queue_taken_is_a_clear_boot_failure(capture_proc, queued_netns, tmp_path):
    capture_proc.wait_ready().close()
    second = CaptureProcess(queued_netns, tmp_path, tag="b")
    try:
        second.proc.wait(15)
    finally:
        code = second.stop()
    assert code == capture.EXIT_BOOT_FAILED
    assert f"cannot bind NFQUEUE {QUEUE}" in second.log()


@pytest.mark.e2e
def test_sigterm_stops_promptly_and_syns_bypass_the_queue(capture_proc, queued_netns):
    reader = capture_proc.wait_ready()
    started = time.monotonic()
    assert capture_proc.stop() == 0
    assert time.monotonic() - started < 3
    assert "stopped; table counters: syn_seen 0" in capture_proc.log()
    # Nobody reads the queue now: --queue-bypass lets SYNs through, nothing is recorded.
    srh = SRH.from_path([P1, P2])
    [(peer, local)] = in_netns(queued_netns, connect_and_echo, srh.to_bytes())
    assert reader.lookup(peer[0], peer[1], local[0], local[1]) is None
    reader.close()


@pytest.mark.e2e
def test_process_name_and_capabilities(capture_proc):
    capture_proc.wait_ready().close()
    pid = capture_proc.proc.pid  # `ip netns exec` execs python: same pid
    with open(f"/proc/{pid}/comm") as comm:
        assert comm.read().strip() == "pipesd cap0"
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":\t", 1) for line in status.read().splitlines() if ":\t" in line)
    # Only CAP_NET_ADMIN (bit 12) is left: nfnetlink checks it on every verdict.
    assert int(fields["CapEff"], 16) == int(fields["CapPrm"], 16) == 1 << 12
    assert fields["PPid"].strip() == str(os.getpid())


@pytest.mark.e2e
def test_master_style_child_writes_the_masters_table(queued_netns):
    """The master creates the table, forks, and the child calls run_capture_process()."""
    name = f"cap{os.getpid()}-{uuid.uuid4().hex[:8]}"
    table = _srhtable.SrhTable.create(name, nslots=64)
    ctx = multiprocessing.get_context("fork")

    def child():
        from pyroute2.netns import setns

        setns(queued_netns)
        capture.run_capture_process(name, QUEUE, table)  # never returns

    process = ctx.Process(target=child)
    process.start()
    try:
        assert wait_for(lambda: queue_bound(queued_netns)), "the child never bound the queue"
        srh = SRH.from_path([P1, P2])
        [(peer, local)] = in_netns(queued_netns, connect_and_echo, srh.to_bytes())
        assert table.lookup(peer[0], peer[1], local[0], local[1]) == (1, srh.to_bytes())
        os.kill(process.pid, signal.SIGTERM)
        process.join(5)
        assert process.exitcode == 0
        assert not queue_bound(queued_netns)
    finally:
        if process.is_alive():
            process.kill()
            process.join(5)
        table.close()
        _srhtable.unlink(name)
