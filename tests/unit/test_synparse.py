"""The capture's C fast path (cext/synparse.h via SrhTable.record_syn) against the Python
parser (srh.find_srh): whatever the fast path accepts, the Python path must accept with the
same key, segments-left and SRH bytes; everything else it must leave alone (None, nothing
counted), so pipes/capture.py's Python path still decides, counts and logs it."""
import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from srv6pipes.srh import RETURN_PATH_TLV, SRH, SRHError, TLV, find_srh

from tests.support import synpackets
from tests.support.synpackets import CLIENT, extension, scratch_table, syn_with_srh, table_counts, tcp_header

A = ipaddress.IPv6Address
SERVER = A("fc00:5::80")
P1 = A("fc00:1::1")


@pytest.fixture
def table():
    with scratch_table("syn") as writer:
        yield writer


def ipv6_packet(dst, next_header, payload):
    return synpackets.ipv6_packet(CLIENT, dst, next_header, payload)


def test_common_syn_is_inserted_and_counted(table):
    srh = SRH((SERVER, P1), segments_left=1)
    assert table.record_syn(syn_with_srh(srh, sport=1234)) == (CLIENT.packed, 1234, SERVER.packed, 80)
    assert table.lookup(CLIENT.packed, 1234, SERVER.packed, 80) == (1, srh.to_bytes())
    assert table_counts(table) == {"syn_seen": 1, "inserts": 1}


def test_hop_by_hop_and_destination_options_around_the_srh(table):
    srh = SRH((SERVER, P1))
    # hop-by-hop (-> routing) + SRH (-> destination options) + destination options (-> TCP)
    srh_to_dstopts = bytes([60]) + srh.to_bytes()[1:]
    chain = extension(43) + srh_to_dstopts + extension(6, 1) + tcp_header()
    packet = ipv6_packet(P1, 0, chain)
    assert table.record_syn(packet) == (CLIENT.packed, 40000, SERVER.packed, 80)


@pytest.mark.parametrize("packet", [
    ipv6_packet(SERVER, 6, tcp_header()),                                  # no SRH
    syn_with_srh(SRH((SERVER, P1)), flags=0x12),                                    # SYN-ACK
    syn_with_srh(SRH((SERVER, P1)), flags=0x10),                                    # ACK
    syn_with_srh(SRH((SERVER, P1), tlvs=(TLV(RETURN_PATH_TLV, P1.packed),))),       # TLVs
    syn_with_srh(SRH(tuple(A(f"fc00:9::{i + 1:x}") for i in range(64)))),           # > slot size
    syn_with_srh(SRH((SERVER, P1)))[:60],                                           # truncated
    ipv6_packet(P1, 44, struct.pack("!BBHI", 6, 0, 0, 1) + tcp_header()),  # fragment header
    ipv6_packet(P1, 43, bytes([6, 2, 0, 1, 0, 0, 0, 0]) + bytes(16) + tcp_header()),  # type 0
    ipv6_packet(P1, 43, bytes([6, 2, 4, 5, 0, 0, 0, 0]) + bytes(16) + tcp_header()),  # SL > LE
    b"\x45" + bytes(59),                                                   # IPv4
    b"",
])
def test_everything_else_is_left_to_the_python_path(table, packet):
    assert table.record_syn(packet) is None
    assert table_counts(table) == {}


segments = st.lists(st.binary(min_size=16, max_size=16), min_size=1, max_size=70)


@st.composite
def syn_like_packets(draw):
    """Mostly well-formed SYNs with an SRH, with the knobs the fast path must refuse turned
    at random, then possibly damaged."""
    addrs = tuple(A(a) for a in draw(segments))
    count = len(addrs)
    wire = bytearray(8 + 16 * count)
    wire[0] = 6
    wire[1] = 2 * count + draw(st.sampled_from([0, 0, 0, 1, -1]))
    wire[2] = draw(st.sampled_from([4, 4, 4, 0, 3]))
    wire[3] = draw(st.integers(0, count + 1)) & 0xFF
    wire[4] = (count - 1 + draw(st.sampled_from([0, 0, 0, 1, -1]))) & 0xFF
    for i, addr in enumerate(addrs):
        wire[8 + 16 * i:24 + 16 * i] = addr.packed
    wire[1] &= 0xFF
    if draw(st.booleans()):
        wire += draw(st.sampled_from([bytes(8), bytes([4, 6]) + bytes(6), bytes([1, 9]) + bytes(6)]))
        wire[1] = (len(wire) - 8) // 8
    first = 43
    chain = bytes(wire)
    if draw(st.booleans()):
        chain += extension(6, draw(st.integers(0, 2)))
        chain = bytes([60]) + chain[1:]
    if draw(st.booleans()):
        chain = extension(first) + chain
        first = 0
    flags = draw(st.sampled_from([0x02, 0x02, 0x12, 0x10, 0x03]))
    packet = bytearray(ipv6_packet(P1, first, chain + tcp_header(draw(st.integers(0, 65535)),
                                                                  draw(st.integers(0, 65535)),
                                                                  flags)))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(packet) - 1))
        packet[at] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        packet = packet[:draw(st.integers(0, len(packet)))]
    return bytes(packet)


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(packet=syn_like_packets())
def test_fast_path_accepts_only_what_the_python_parser_accepts_identically(table, packet):
    flow = table.record_syn(packet)
    if flow is None:
        return
    info = find_srh(packet)     # must not raise: the fast path accepted the packet
    assert info.proto == 6 and info.srh is not None
    assert packet[info.l4_offset + 13] & 0x12 == 0x02
    assert flow == (info.src.packed, info.sport, info.srh.final_destination.packed, info.dport)
    assert table.lookup(*flow) == (info.srh.segments_left, info.srh_wire)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(packet=st.binary(max_size=200))
def test_random_bytes_never_crash(table, packet):
    flow = table.record_syn(packet)
    if flow is not None:
        try:
            find_srh(packet)
        except SRHError as exc:  # pragma: no cover - a disagreement is the failure
            pytest.fail(f"fast path accepted what find_srh rejects: {exc}")
