"""Binding segments at an access router (End.B6 on Linux 6.18) and what pipesd makes of
them, on the campus testbed, without the controller: the access router's kernel state is
driven directly through the agent's BindingKernel.

What the kernel does is checked on the wire (a raw AF_PACKET socket on the proxy's link):
End.B6 inserts the policy's SRH (signed with the router's HMAC key) in front of the
client's, without advancing the client's; End.B6.Encaps wraps the packet instead, which
pipesd does not serve. Then pipesd serves the stacked form (flattened in the capture,
srhstack.py), the edge filter drops hand-crafted SRHs, and a proxy with --require-hmac
drops SYNs that bypassed the access router."""
from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time

import pytest

from srv6pipes import srhhmac
from srv6pipes.agent.kernel import BindingKernel
from srv6pipes.controller.messages import Binding
from srv6pipes.srh import SRH, find_srh

from tests.e2e.campuskit import BLOCKS, CLIENT_PREFIXES, HMAC_KEYS, Campus
from tests.e2e.e2ekit import ECHO_PORT, connection_outcome, kernel_snapshot, wait_for

pytestmark = pytest.mark.e2e

A = ipaddress.IPv6Address
BSID = BLOCKS["a1"][1]


@pytest.fixture(scope="module")
def campus(trusted_path_factory):
    if os.geteuid() != 0:
        pytest.skip("end-to-end tests build network namespaces: run as root")
    from srv6pipes.lab.testbed import Testbed

    with Testbed(topology="campus") as tb:
        # p2 runs no pipesd: the kernel-only test below uses it.
        lab = Campus(tb, str(trusted_path_factory.mktemp("campus")), f"b{os.getpid()}",
                     proxies=("p1", "p3"))
        try:
            yield lab
        finally:
            lab.close()


@pytest.fixture
def router(campus, tmp_path):
    """a1's kernel state for the test's bindings; the test must leave nothing behind."""
    a1 = campus.tb.hosts["a1"]
    before = kernel_snapshot(a1)

    def make(behaviour="End.B6"):
        with a1.enter():
            kernel = BindingKernel(f"t{os.getpid()}", BLOCKS["a1"], ["to-c1"], HMAC_KEYS["a1"],
                                   behaviour, state_dir=tmp_path)
            kernel.start()
        made.append(kernel)
        return kernel

    made = []
    yield make
    with a1.enter():
        for kernel in made:
            kernel.stop()
    assert kernel_snapshot(a1) == before
    assert a1.run(["ip", "sr", "hmac", "show"]).stdout.strip() == ""


def bind(campus, kernel, segments, server=None):
    binding = Binding(BSID, tuple(segments), server or campus.tb.hosts["s"].addr,
                      (CLIENT_PREFIXES["a1"],), "test")
    with campus.tb.hosts["a1"].enter():
        kernel.apply(binding, 60)
    return binding


def client_srh(campus, bsid=BSID):
    return SRH.from_path([bsid, campus.tb.hosts["s"].addr])


class Sniffer:
    """IPv6 packets arriving on one interface of a host (AF_PACKET), in a thread."""

    def __init__(self, host, ifname):
        with host.enter():
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x86DD))
        self.sock.bind((ifname, 0))
        self.sock.settimeout(0.1)
        self.packets: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            try:
                frame, address = self.sock.recvfrom(65536)
            except (TimeoutError, socket.timeout):
                continue
            if address[2] != socket.PACKET_OUTGOING:
                self.packets.append(frame[14:])

    def close(self):
        self.stop.set()
        self.thread.join()
        self.sock.close()


def first_syn(packets, dst=None):
    for packet in packets:
        try:
            info = find_srh(packet)
        except Exception:  # noqa: BLE001 - other traffic on the link
            continue
        if info.srh is not None and (dst is None or info.dst == dst):
            return info
    return None


def test_end_b6_stacks_the_signed_policy_srh_over_the_clients(campus, router):
    # p3 is on the server's path: a one-proxy chain must end there (p1's replies would not
    # come back through it).
    kernel = router()
    p3 = campus.address("p3", "identity")
    bind(campus, kernel, [p3])
    sniffer = Sniffer(campus.tb.hosts["p3"], "to-r")
    try:
        peer, echoed = campus.echo("c1", client_srh(campus))
    finally:
        sniffer.close()
    assert (peer, echoed) == ("fd00:c1::1", b"hello through the pipes")
    info = first_syn(sniffer.packets, dst=p3)
    assert info is not None, "no SYN with an SRH reached p3"
    # Outer (policy) SRH: [BSID, P3], segments-left 1, HMAC flag and TLV of key 101.
    assert info.srh.segments == (BSID, p3) and info.srh.segments_left == 1
    assert info.srh.flags & srhhmac.HMAC_FLAG
    assert srhhmac.hmac_field(info.srh).key_id == HMAC_KEYS["a1"][0]
    # Inner (client) SRH untouched: [S, BSID], segments-left still 1.
    assert info.inner_srh.segments == (campus.tb.hosts["s"].addr, BSID)
    assert info.inner_srh.segments_left == 1
    assert campus.table_counters("p3")["stacked"] >= 1


def test_end_b6_encaps_wraps_the_packet_instead(campus, router):
    kernel = router("End.B6.Encaps")
    p3 = campus.address("p3", "identity")
    bind(campus, kernel, [p3])
    sniffer = Sniffer(campus.tb.hosts["p3"], "to-r")
    try:
        outcome = connection_outcome(lambda: campus.socket("c1", client_srh(campus)),
                                     (str(campus.tb.hosts["s"].addr), ECHO_PORT), timeout=2)
    finally:
        sniffer.close()
    info = first_syn(sniffer.packets, dst=p3)
    assert info is not None
    # Outer IPv6 from the router, SRH [P3] at segments-left 0, then IPv6-in-IPv6: the TCP
    # SYN is one header deeper than pipesd's interception looks. Not served.
    assert info.src != A("fd00:c1::1") and info.proto == 41
    assert info.srh.segments == (p3,) and info.srh.segments_left == 0
    assert outcome != "data"


def test_two_proxy_chain_through_a_binding_keeps_the_client_address(campus, router):
    kernel = router()
    segments = [campus.address("p1", "xor", 42), campus.address("p3", "xor", 42)]
    bind(campus, kernel, segments)
    before = {name: campus.table_counters(name) for name in ("p1", "p3")}
    payload = os.urandom(300_000)
    peer, echoed = campus.echo("c1", client_srh(campus), payload)
    assert peer == "fd00:c1::1" and echoed == payload
    after = {name: campus.table_counters(name) for name in ("p1", "p3")}
    # p1 flattened the two SRHs; p3 received one ordinary (signed) SRH and verified it.
    assert after["p1"]["stacked"] == before["p1"]["stacked"] + 1
    assert after["p3"]["inserts"] == before["p3"]["inserts"] + 1
    assert after["p3"]["hmac_refused"] == before["p3"]["hmac_refused"]


def test_edge_filter_drops_hand_crafted_srhs(campus, router):
    kernel = router()
    bind(campus, kernel, [campus.address("p3", "identity")])
    target = (str(campus.tb.hosts["s"].addr), ECHO_PORT)
    with campus.tb.hosts["a1"].enter():
        refused = kernel.counters()["refused"]
    # The kernel writes the connect() address into segment 0, so "another server" is
    # another connect() target: ctl (nothing listens there: unfiltered, it would answer
    # with a reset, not stay silent).
    other = (str(campus.tb.hosts["ctl"].addr), ECHO_PORT)
    forged = [
        (SRH.from_path([campus.address("p1", "xor", 1), campus.tb.hosts["s"].addr]), target),
        (client_srh(campus), other),                              # the binding, another server
        (SRH.from_path([BSID, campus.address("p3", "xor", 1), campus.tb.hosts["s"].addr]), target),
        (SRH.from_path([BLOCKS["a1"][2], campus.tb.hosts["s"].addr]), target),  # not live
    ]
    for srh, where in forged:
        assert connection_outcome(lambda: campus.socket("c1", srh), where, timeout=1) == "timeout"
    with campus.tb.hosts["a1"].enter():
        assert kernel.counters()["refused"] >= refused + len(forged)
    # The binding itself still works.
    assert campus.echo("c1", client_srh(campus))[0] == "fd00:c1::1"


def test_proxy_drops_syns_that_bypass_the_access_router(campus):
    """ctl is behind no access router: it reaches p3 directly, unsigned or forged."""
    s = campus.tb.hosts["s"].addr
    target = (str(s), ECHO_PORT)
    p3 = campus.address("p3", "identity")
    source = campus.tb.hosts["ctl"].addr.packed
    unsigned = SRH.from_path([p3, s])
    forged = srhhmac.sign(unsigned, source, HMAC_KEYS["a1"][0], b"a guessed secret")
    unknown = srhhmac.sign(unsigned, source, 999, b"a key nobody has")
    refused = campus.table_counters("p3")["hmac_refused"]
    for srh in (unsigned, forged, unknown):
        assert connection_outcome(lambda: campus.socket("ctl", srh), target, timeout=1) == "timeout"
    assert wait_for(lambda: campus.table_counters("p3")["hmac_refused"] >= refused + 3, 5)
    # Signed with a1's real key (as a1 would): served.
    signed = srhhmac.sign(unsigned, source, *HMAC_KEYS["a1"])
    assert campus.echo("ctl", signed)[0] == str(campus.tb.hosts["ctl"].addr)


def test_binding_kernel_restart_adopts_and_stop_removes(campus, tmp_path):
    a1 = campus.tb.hosts["a1"]
    before = kernel_snapshot(a1)
    with a1.enter():
        first = BindingKernel("restart", BLOCKS["a1"], ["to-c1"], HMAC_KEYS["a1"],
                              state_dir=tmp_path)
        first.start()
        binding = Binding(BSID, (campus.address("p3", "identity"),), campus.tb.hosts["s"].addr,
                          (CLIENT_PREFIXES["a1"],))
        first.apply(binding, 30)
        short = Binding(BLOCKS["a1"][7], binding.segments, binding.server, binding.clients)
        first.apply(short, 0.2)
        time.sleep(0.3)
        # A crash: the object is dropped without stop(); a new agent of that name starts.
        second = BindingKernel("restart", BLOCKS["a1"], ["to-c1"], HMAC_KEYS["a1"],
                               state_dir=tmp_path)
        assert second.start() == 1          # the live binding adopted, the expired one not
        assert second.routes() == [BSID]
    assert campus.echo("c1", client_srh(campus))[0] == "fd00:c1::1"
    with a1.enter():
        second.stop()
    assert kernel_snapshot(a1) == before
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("require, kernel_key, accepted", [
    (-1, None, True),                 # no check at all: what pipesd sets with a keyring
    (0, None, False),                 # an HMAC whose key the kernel lacks: dropped
    (0, HMAC_KEYS["a1"], True),       # present and valid: passes (a missing one would too)
    (1, HMAC_KEYS["a1"], False),      # required on every SRH: the client's inner one fails
])
def test_what_the_kernel_checks_on_the_emulation_path(campus, router, tmp_path, require,
                                                      kernel_key, accepted):
    """p2 without pipesd: the kernel recipe and a transparent listener only, so whatever
    drops the signed binding SYN is the kernel's SRH code (seg6_hmac_validate_skb)."""
    from srv6pipes import kernelsetup
    from srv6pipes.agent.kernel import Seg6Genl
    from srv6pipes.worker import make_listener

    kernel = router()
    p2 = campus.tb.hosts["p2"]
    bind(campus, kernel, [campus.address("p2", "identity")])
    config = kernelsetup.KernelConfig(name=f"k{os.getpid()}", locator=campus.tb.locator("p2"),
                                      port=7010, queue_num=9, fwmark=0x100, table=190,
                                      rule_priority=190)
    with p2.enter():
        kernelsetup.install(config)
        listener = make_listener(7010)
        genl = Seg6Genl()
    try:
        with p2.enter():
            if kernel_key is not None:
                genl.set_key(*kernel_key)
        p2.run(["sh", "-c", "for f in /proc/sys/net/ipv6/conf/*/seg6_require_hmac; do "
                            f"echo {require} > $f; done"])
        sock = campus.socket("c1", client_srh(campus))
        sock.setblocking(False)
        try:
            sock.connect((str(campus.tb.hosts["s"].addr), 80))
        except BlockingIOError:
            pass
        listener.settimeout(1.5)
        try:
            connection, _ = listener.accept()
            connection.close()
            got = True
        except (TimeoutError, socket.timeout, BlockingIOError):
            got = False
        finally:
            sock.close()
        assert got == accepted
    finally:
        p2.run(["sh", "-c", "for f in /proc/sys/net/ipv6/conf/*/seg6_require_hmac; do "
                            "echo 0 > $f; done"])
        listener.close()
        with p2.enter():
            if kernel_key is not None:
                genl.delete_key(kernel_key[0])
            genl.close()
            kernelsetup.remove(config)
