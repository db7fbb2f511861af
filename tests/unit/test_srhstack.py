"""Stacked SRHs (End.B6 binding over the client's header) flattened into the one SRH a
proxy acts on (pipes/srhstack.py), against the shapes observed on this kernel."""
import dataclasses
import ipaddress

import pytest
from hypothesis import given, strategies as st

from srv6pipes import srhhmac
from srv6pipes.addressplan import AddressPlan
from srv6pipes.srh import SRH, SRHError, find_srh
from srv6pipes.srhstack import flatten, syn_route
from srv6pipes.worker import locate_own_segment

from tests.support.synpackets import CLIENT, ipv6_packet, tcp_header

A = ipaddress.IPv6Address
S = A("fd00:d::1")
BSID = A("fd00:a1:b::1")
P1 = A("fc00:1::1:0:5")
P3 = A("fc00:3::6:0:5")
KEYRING = srhhmac.HmacKeyring({7: b"secretsecret"})


def stacked_syn(outer: SRH, inner: SRH) -> bytes:
    """IPv6 + outer SRH + inner SRH + TCP SYN, as a proxy's NFQUEUE copy shows it."""
    outer_wire = bytes([43]) + outer.to_bytes()[1:]
    return ipv6_packet(CLIENT, outer.active_segment, 43,
                       outer_wire + inner.to_bytes() + tcp_header())


def test_observed_end_b6_shape_flattens_to_the_policy_then_the_server():
    # The shape seen at P1 (tests/e2e/test_binding.py): policy [P1, P3], client [BSID, S].
    outer = SRH((BSID, P3, P1), 2)
    inner = SRH((S, BSID), 1)
    flat = flatten(outer, inner)
    assert flat.path == [P1, P3, S]
    assert flat.active_segment == P1 and flat.segments_left == 2
    assert flat.onward().active_segment == P3
    info = find_srh(stacked_syn(outer, inner))
    assert (info.srh, info.inner_srh) == (dataclasses.replace(outer, next_header=43), inner)
    route = syn_route(info)
    assert route == (2, flat.to_bytes(), flat, True, None)


def test_after_the_kernel_loop_both_headers_at_zero():
    """TCP_SAVED_SYN: both segments-left 0; the worker locates its own segment."""
    outer = SRH((BSID, P3, P1), 0)
    inner = SRH((S, BSID), 0)
    flat = flatten(outer, inner)
    assert flat.segments == (S, P3, P1) and flat.segments_left == 0
    plan = AddressPlan("fc00:3::/80")
    assert locate_own_segment(flat, plan).active_segment == P3


paths = st.lists(st.integers(1, 2**64).map(lambda n: A((0xfc00 << 112) | n)), min_size=1,
                 max_size=5, unique=True)


@given(before=paths, after=paths, policy=paths, at=st.integers(0, 4))
def test_flattened_path_is_the_policy_in_place_of_the_bsid(before, after, policy, at):
    # Client path: before..., BSID, after..., S; the policy replaces the BSID.
    client_path = [*before, BSID, *after, S]
    inner = dataclasses.replace(SRH.from_path(client_path), segments_left=len(after) + 1)
    assert inner.active_segment == BSID
    at %= len(policy)
    outer = SRH((BSID, *reversed(policy)), len(policy) - at)
    flat = flatten(outer, inner)
    assert flat.path == [*before, *policy, *after, S]
    assert flat.active_segment == policy[at]
    # The saved-SYN form (both exhausted) gives the same segments.
    exhausted = flatten(dataclasses.replace(outer, segments_left=0),
                        dataclasses.replace(inner, segments_left=0))
    assert exhausted.segments == flat.segments


def test_outer_header_that_does_not_return_to_a_client_segment_is_refused():
    with pytest.raises(SRHError, match="is not a segment of the inner SRH"):
        flatten(SRH((A("fd00:a1:b::9"), P1), 1), SRH((S, BSID), 1))


def test_hmac_verified_on_the_outer_header_and_the_flat_one_signed_again():
    outer = srhhmac.sign(SRH((BSID, P3, P1), 2), CLIENT.packed, 7, b"secretsecret")
    inner = SRH((S, BSID), 1)
    info = find_srh(stacked_syn(outer, inner))
    route = syn_route(info, KEYRING, require_hmac=True)
    assert route.stacked and route.hmac_key_id == 7
    flat = SRH.parse(route.wire)
    assert flat.path == [P1, P3, S]
    # P3 receives the onward header with the client's address as source: it verifies.
    onward = SRH.parse(flat.onward().to_bytes())
    assert srhhmac.verify(onward, CLIENT.packed, KEYRING) == 7


@pytest.mark.parametrize("make, reason", [
    (lambda outer: outer, "missing"),
    (lambda outer: srhhmac.sign(outer, CLIENT.packed, 7, b"forged"), "mismatch"),
    (lambda outer: srhhmac.sign(outer, CLIENT.packed, 99, b"secretsecret"), "unknown_key"),
])
def test_hmac_refusals(make, reason):
    outer = make(SRH((BSID, P1), 1))
    info = find_srh(stacked_syn(outer, SRH((S, BSID), 1)))
    with pytest.raises(srhhmac.HmacRefused) as refused:
        syn_route(info, KEYRING, require_hmac=True)
    assert refused.value.reason == reason


def test_without_require_an_absent_hmac_passes_but_a_wrong_one_does_not():
    plain = find_srh(stacked_syn(SRH((BSID, P1), 1), SRH((S, BSID), 1)))
    assert syn_route(plain, KEYRING).hmac_key_id is None
    forged = srhhmac.sign(SRH((BSID, P1), 1), CLIENT.packed, 7, b"forged")
    with pytest.raises(srhhmac.HmacRefused):
        syn_route(find_srh(stacked_syn(forged, SRH((S, BSID), 1))), KEYRING)


def test_single_srh_keeps_its_wire_bytes():
    srh = SRH((S, P1), 1)
    packet = ipv6_packet(CLIENT, P1, 43, srh.to_bytes() + tcp_header())
    assert syn_route(find_srh(packet)) == (1, srh.to_bytes(), srh, False, None)


def test_three_srhs_are_malformed():
    one = bytes([43]) + SRH((S, P1), 1).to_bytes()[1:]
    packet = ipv6_packet(CLIENT, P1, 43, one * 2 + SRH((S, P1), 1).to_bytes() + tcp_header())
    with pytest.raises(SRHError, match="extra routing header"):
        find_srh(packet)
