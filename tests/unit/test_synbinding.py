"""The capture's C fast path for binding SYNs (cext/synbinding.h via SrhTable.record_syn)
against the Python reference (srh.find_srh + srhstack.syn_route): same decision (insert,
refuse, or leave to the Python path), and when it inserts, the same key, segments-left
and SRH bytes."""
import dataclasses
import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from srv6pipes import srhhmac
from srv6pipes.srh import SRH, TLV, find_srh
from srv6pipes.srhhmac import HmacKeyring, HmacRefused
from srv6pipes.srhstack import syn_route

from tests.support.synpackets import CLIENT, ipv6_packet, scratch_table, table_counts, tcp_header

A = ipaddress.IPv6Address
S = A("fd00:d::1")
BSID = A("fd00:a1::b:1")
P1 = A("fc00:1::5:0:1")
P3 = A("fc00:3::6:0:1")
KEYS = HmacKeyring({101: b"staff-router-secret", 102: b"students"})


def stacked(outer: SRH, inner: SRH, sport=40000) -> bytes:
    wire = bytes([43]) + outer.to_bytes()[1:]
    return ipv6_packet(CLIENT, outer.active_segment, 43, wire + inner.to_bytes() + tcp_header(sport))


def single(srh: SRH, sport=40000) -> bytes:
    return ipv6_packet(CLIENT, srh.active_segment, 43, srh.to_bytes() + tcp_header(sport))


def signed(srh: SRH, key_id=101, secret=None) -> SRH:
    return srhhmac.sign(srh, CLIENT.packed, key_id, secret or KEYS.secret(key_id) or b"x")


def python_outcome(packet, keyring, require):
    """What the Python path stores: ('insert', key, segments_left, wire) or ('refused',)."""
    info = find_srh(packet)
    try:
        route = syn_route(info, keyring, require)
    except HmacRefused:
        return ("refused",)
    key = (CLIENT.packed, info.sport, route.srh.final_destination.packed, info.dport)
    return ("insert", key, route.segments_left, route.wire)


def c_outcome(table, packet):
    result = table.record_syn(packet)
    if result is None:
        return None
    if result == "hmac_refused":
        return ("refused",)
    return ("insert", result, *table.lookup(*result))


@pytest.fixture
def table():
    with scratch_table("bind") as writer:
        yield writer


CASES = [
    ("binding, signed", stacked(signed(SRH((BSID, P3, P1), 2)), SRH((S, BSID), 1))),
    ("binding, unsigned", stacked(SRH((BSID, P3, P1), 2), SRH((S, BSID), 1))),
    ("binding, forged", stacked(signed(SRH((BSID, P1), 1), secret=b"guess"), SRH((S, BSID), 1))),
    ("binding, unknown key", stacked(signed(SRH((BSID, P1), 1), 999), SRH((S, BSID), 1))),
    ("signed single", single(signed(SRH((S, P3, P1), 1)))),
    ("plain single", single(SRH((S, P1), 1))),
]


@pytest.mark.parametrize("require", [False, True])
@pytest.mark.parametrize("keyring", [KEYS, None], ids=["keyring", "no-keyring"])
@pytest.mark.parametrize("name, packet", CASES, ids=[c[0] for c in CASES])
def test_fast_path_agrees_with_the_python_path(table, name, packet, keyring, require):
    table.set_hmac(keyring.keys if keyring else None, require)
    expected = python_outcome(packet, keyring, require)
    got = c_outcome(table, packet)
    if name == "plain single" and not require:
        assert got is not None  # synparse.h's shape, already covered by test_synparse
        assert got[2:] == expected[2:]
        return
    assert got == expected, name
    counts = table_counts(table)
    if expected == ("refused",):
        assert counts == {"syn_seen": 1, "hmac_refused": 1}
    elif "binding" in name:
        assert counts == {"syn_seen": 1, "inserts": 1, "stacked": 1}


def test_the_flat_header_is_signed_for_the_next_proxy(table):
    table.set_hmac(KEYS.keys, True)
    flow = table.record_syn(stacked(signed(SRH((BSID, P3, P1), 2)), SRH((S, BSID), 1)))
    segments_left, wire = table.lookup(*flow)
    flat = SRH.parse(wire)
    assert flat.path == [P1, P3, S] and segments_left == 2
    assert srhhmac.verify(SRH.parse(flat.onward().to_bytes()), CLIENT.packed, KEYS) == 101


@pytest.mark.parametrize("packet", [
    # the policy does not return to the client's active segment
    stacked(SRH((A("fd00:a1::b:9"), P1), 1), SRH((S, BSID), 1)),
    # the client's SRH has a TLV
    stacked(SRH((BSID, P1), 1), SRH((S, BSID), 1, tlvs=(TLV(124, P1.packed),))),
    # the outer SRH has a TLV other than an HMAC
    stacked(SRH((BSID, P1), 1, tlvs=(TLV(124, P1.packed),)), SRH((S, BSID), 1)),
    # three SRHs
    ipv6_packet(CLIENT, P1, 43, (bytes([43]) + SRH((BSID, P1), 1).to_bytes()[1:]) * 2
                + SRH((S, BSID), 1).to_bytes() + tcp_header()),
    # a SYN-ACK
    ipv6_packet(CLIENT, P1, 43, bytes([43]) + SRH((BSID, P1), 1).to_bytes()[1:]
                + SRH((S, BSID), 1).to_bytes() + tcp_header(flags=0x12)),
])
def test_other_shapes_are_left_to_the_python_path(table, packet):
    table.set_hmac(KEYS.keys, False)  # (with require, unsigned ones are refused first)
    assert table.record_syn(packet) is None
    assert table_counts(table) == {}


addresses = st.integers(1, 2**64).map(lambda n: A((0xfc00 << 112) | n))


@given(before=st.lists(addresses, max_size=3), after=st.lists(addresses, max_size=3),
       policy=st.lists(addresses, min_size=1, max_size=5), at=st.integers(0, 4),
       flags=st.integers(0, 255), tag=st.integers(0, 0xFFFF), sign=st.booleans(),
       forge=st.booleans(), require=st.booleans())
@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_bindings_agree(table, before, after, policy, at, flags, tag, sign, forge,
                               require):
    table.set_hmac(KEYS.keys, require)
    inner = dataclasses.replace(SRH.from_path([*before, BSID, *after, S]),
                                segments_left=len(after) + 1)
    at %= len(policy)
    outer = SRH((BSID, *reversed(policy)), len(policy) - at, flags=flags, tag=tag)
    if sign:
        outer = signed(outer, secret=b"forged" if forge else None)
    packet = stacked(outer, inner)
    got = c_outcome(table, packet)
    if got is None:   # a shape the fast path leaves alone (e.g. too long for a slot)
        return
    assert got == python_outcome(packet, KEYS, require)
