"""Off-path proxies (paper Fig. 1): C, P1, P2 and S all hang off a router R, so replies
do not pass the proxies by themselves. S (unmodified) gets its return SRH from its host's
routing, as the controller would install it; P2 must send its SYN-ACK and replies to the
'client' back through P1 — from the reversed SRH or from the SYN's return-path TLV."""
from __future__ import annotations

import os
import socket

import pytest

from srv6pipes.addressplan import AddressPlan
from srv6pipes.lab.apps import Pipesd
from srv6pipes.srh import RETURN_PATH_TLV, SRH, TLV

from tests.e2e.e2ekit import EchoServer, Lab, digest, kernel_state, read_to_eof

pytestmark = pytest.mark.e2e


@pytest.fixture(params=["reverse", "tlv"])
def star(request, testbed):
    mode = request.param
    tb = testbed(proxies=2, topology="star")
    server = EchoServer(tb.hosts["s"])
    proxies = {}
    before = {name: kernel_state(tb.hosts[name], "off") for name in ("p1", "p2")}
    try:
        for name in ("p1", "p2"):
            proxies[name] = Pipesd(tb.hosts[name], tb.locator(name), f"off{name}{os.getpid()}",
                                   extra=("--return-mode", mode))
        # The controller's part on the unmodified server: replies to C go through P2.
        tb.steer(client="s", dest="c", segments=[AddressPlan(tb.locator("p2")).encode(0)])
        yield mode, tb, Lab(tb, proxies, server)
    finally:
        server.close()
        for proxy in proxies.values():
            proxy.stop()
    # Rules, per-path tables and tcp_fwmark_accept are gone with the daemons.
    for name in ("p1", "p2"):
        assert kernel_state(tb.hosts[name], "off") == before[name]


def chain_srh(tb, lab, mode, key):
    p1 = AddressPlan(tb.locator("p1")).encode(1, key)
    p2 = AddressPlan(tb.locator("p2")).encode(1, key)
    tlvs = ()
    if mode == "tlv":
        back = [AddressPlan(tb.locator("p2")).encode(0), AddressPlan(tb.locator("p1")).encode(0),
                lab.c.addr]
        tlvs = (TLV(RETURN_PATH_TLV, b"".join(a.packed for a in back)),)
    return SRH.from_path([p1, p2, lab.s.addr], tlvs=tlvs)


def test_off_path_chain_returns_through_both_proxies(star):
    mode, tb, lab = star
    payload = os.urandom(3 << 20)
    sock_srh = chain_srh(tb, lab, mode, 77)
    for _ in range(3):
        sock = lab.connect([], srh=sock_srh)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = read_to_eof(sock)
        assert received[:64].split()[0].decode() == str(lab.c.addr)
        assert digest(bytes(received[64:])) == digest(payload)
    # Both proxies relayed the replies: bytes_down counted on each.
    for name in ("p1", "p2"):
        totals = lab.proxies[name].stats()["totals"]
        assert totals["functions"]["xor"]["bytes_down"] >= 3 * len(payload)
        # With return paths the capture takes its Python path (the mark is set per SYN):
        # its table entry must still precede every accept, not be found through the
        # kernel's saved SYN.
        worker = totals["worker"]
        assert worker["table_hits"] == 3, worker
        assert worker.get("saved_syn_fallbacks", 0) == 0, worker
