"""Unit tests for srv6pipes.srh: wire vectors, validation, round trips, path semantics."""
import dataclasses
import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from srv6pipes.srh import (
    MAX_SEGMENTS,
    RETURN_PATH_TLV,
    SRH,
    TLV,
    PacketInfo,
    SRHError,
    find_srh,
)

A = ipaddress.IPv6Address
C = A("fc00:c::1")
P1 = A("fc00:1::1:0:2a")
P2 = A("fc00:2::2:0:7")
S = A("fc00:5::80")

# Hand-built SRH as P1 receives it on C -> P1 -> P2 -> S: segments in wire order S, P2, P1.
THREE_SEGMENTS = (
    bytes([
        6,     # next header: TCP
        6,     # hdrlen: (8 + 3 * 16) / 8 - 1
        4,     # routing type: SRH
        2,     # segments left: P1 is active
        2,     # last entry
        0x80,  # flags
        0x12, 0x34,  # tag
    ])
    + S.packed + P2.packed + P1.packed
)


def ipv6_packet(payload, next_header, src=C, dst=P1, payload_length=None):
    """An IPv6 fixed header followed by ``payload`` (extension headers + L4)."""
    length = len(payload) if payload_length is None else payload_length
    header = struct.pack("!IHBB", 6 << 28, length, next_header, 64) + src.packed + dst.packed
    return header + payload


def tcp_header(sport=40000, dport=80):
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)


def generic_extension(next_header, body_units=0, fill=b"\x00"):
    """A hop-by-hop/destination-options style header of (body_units + 1) * 8 octets."""
    return bytes([next_header, body_units]) + fill * (6 + 8 * body_units)


# Known vectors.

def test_parse_three_segment_vector_field_by_field():
    srh = SRH.parse(THREE_SEGMENTS)
    assert srh.next_header == 6
    assert srh.segments_left == 2
    assert srh.last_entry == 2
    assert srh.flags == 0x80
    assert srh.tag == 0x1234
    assert srh.segments == (S, P2, P1)
    assert srh.tlvs == ()
    assert srh.active_segment == P1
    assert srh.final_destination == S
    assert srh.path == [P1, P2, S]
    assert srh.wire_length == 56


def test_build_three_segment_vector():
    srh = SRH([str(S), P2.packed, P1], segments_left=2, flags=0x80, tag=0x1234)
    assert srh.to_bytes() == THREE_SEGMENTS
    assert srh == SRH.parse(THREE_SEGMENTS)


def test_from_path_sets_first_hop_active():
    srh = SRH.from_path([P1, P2, S])
    assert srh.segments == (S, P2, P1)
    assert srh.segments_left == 2
    assert srh.active_segment == P1
    assert srh.next_header == 6


def test_default_segments_left_is_last_entry():
    assert SRH([S, P2]).segments_left == 1


def test_return_path_tlv_vector_with_padn():
    tlv_value = P2.packed + C.packed
    srh = SRH.from_path([P1, S], tlvs=[TLV(RETURN_PATH_TLV, tlv_value)])
    wire = srh.to_bytes()
    # 8 fixed + 32 segments + 34 TLV = 74, padded to 80 with a PadN of 4 zero octets.
    assert len(wire) == srh.wire_length == 80
    assert wire[1] == 9
    assert wire[40:42] == bytes([RETURN_PATH_TLV, 32])
    assert wire[42:74] == tlv_value
    assert wire[74:] == bytes([4, 4, 0, 0, 0, 0])
    assert SRH.parse(wire) == srh


def test_pad1_generated_when_one_octet_is_missing():
    srh = SRH([S], tlvs=[TLV(200, b"\x01" * 5)])  # 8 + 16 + 7 = 31 octets
    wire = srh.to_bytes()
    assert len(wire) == 32 and wire[-1] == 0
    assert SRH.parse(wire) == srh


def test_parse_skips_pad1_and_padn_anywhere():
    body = (bytes([6, 4, 4, 0, 0, 0, 0, 0]) + S.packed
            + b"\x00\x00"                     # two Pad1
            + bytes([4, 1, 0])                # PadN, 1 octet of content
            + bytes([130, 3]) + b"abc"        # a real TLV
            + bytes([4, 0]) + b"\x00" * 4)    # PadN, then Pad1 x4 at the end
    assert len(body) == 40
    srh = SRH.parse(body)
    assert srh.tlvs == (TLV(130, b"abc"),)


def test_parse_ignores_trailing_bytes_and_accepts_memoryview():
    data = THREE_SEGMENTS + b"\xff" * 20
    assert SRH.parse(data) == SRH.parse(memoryview(data)) == SRH.parse(bytearray(data))


def test_parse_accepts_larger_hdrlen_than_needed():
    wire = bytearray(THREE_SEGMENTS + bytes([4, 6]) + bytes(6))
    wire[1] = 7
    assert SRH.parse(bytes(wire)).segments == (S, P2, P1)


# Parse errors.

def _with(**fields):
    """THREE_SEGMENTS with some fixed-header octets replaced."""
    positions = {"nexthdr": 0, "hdrlen": 1, "type": 2, "segments_left": 3, "last_entry": 4}
    wire = bytearray(THREE_SEGMENTS)
    for name, value in fields.items():
        wire[positions[name]] = value
    return bytes(wire)


@pytest.mark.parametrize("data, message", [
    (b"", r"SRH truncated: 0 octets, the fixed part needs 8"),
    (THREE_SEGMENTS[:7], r"SRH truncated: 7 octets"),
    (_with(type=2), r"routing type is 2, expected 4 \(SRH\)"),
    (THREE_SEGMENTS[:48], r"hdrlen 6 means 56 octets, only 48 available"),
    (_with(hdrlen=4), r"hdrlen 4 is too small for last_entry 2: 3 segments need hdrlen >= 6"),
    (_with(segments_left=3), r"segments_left 3 is beyond last_entry 2"),
    (_with(last_entry=1, segments_left=0), r"TLV type 42 at offset 55 is truncated"),
])
def test_parse_errors(data, message):
    with pytest.raises(SRHError, match=message):
        SRH.parse(data)


def test_parse_rejects_too_many_segments():
    count = MAX_SEGMENTS + 1
    data = bytes([6, 2 * count, 4, 0, count - 1, 0, 0, 0]) + bytes(16 * count)
    with pytest.raises(SRHError, match=r"last_entry 64 means 65 segments; at most 64"):
        SRH.parse(data)


def test_parse_tlv_running_past_header():
    data = bytes([6, 3, 4, 0, 0, 0, 0, 0]) + S.packed + bytes([130, 7]) + b"abcdef"
    with pytest.raises(SRHError, match=r"TLV type 130 at offset 24 runs to 33, past the "
                                       r"header end 32"):
        SRH.parse(data)


def test_parse_tlv_with_missing_length_octet():
    data = bytes([6, 3, 4, 0, 0, 0, 0, 0]) + S.packed + bytes(7) + bytes([130])
    with pytest.raises(SRHError, match=r"TLV type 130 at offset 31 is truncated"):
        SRH.parse(data)


# Constructor errors.

@pytest.mark.parametrize("kwargs, message", [
    ({"segments": []}, r"an SRH needs 1..64 segments, got 0"),
    ({"segments": [S] * 65}, r"an SRH needs 1..64 segments, got 65"),
    ({"segments": "fc00::1"}, r"not one address"),
    ({"segments": [S, "nope"]}, r"segment 1: 'nope' is not an IPv6 address"),
    ({"segments": [S, "10.0.0.1"]}, r"segment 1: '10.0.0.1' is not an IPv6 address"),
    ({"segments": [S], "segments_left": 1}, r"segments_left 1 is beyond the last entry 0"),
    ({"segments": [S], "segments_left": -1}, r"segments_left must be in 0..255, got -1"),
    ({"segments": [S], "flags": 256}, r"flags must be in 0..255, got 256"),
    ({"segments": [S], "tag": 65536}, r"tag must be in 0..65535, got 65536"),
    ({"segments": [S], "next_header": -1}, r"next_header must be in 0..255"),
    ({"segments": [S], "tlvs": [TLV(4, b"")]}, r"TLV type 4 is padding"),
    ({"segments": [S], "tlvs": [TLV(0, b"")]}, r"TLV type 0 is padding"),
    ({"segments": [S], "tlvs": [TLV(300, b"")]}, r"TLV type must be in 0..255, got 300"),
    ({"segments": [S], "tlvs": [TLV(130, "text")]}, r"TLV 130 value must be bytes"),
    ({"segments": [S], "tlvs": [TLV(130, bytes(256))]}, r"TLV 130 value is 256 octets"),
    ({"segments": [S], "tlvs": [(1, 2, 3)]}, r"a TLV is a \(type, value\) pair"),
    ({"segments": [S] * 64, "tlvs": [TLV(130, bytes(255))] * 4},
     r"SRH would be 2060 octets; the wire format allows at most 2048"),
])
def test_constructor_errors(kwargs, message):
    with pytest.raises(SRHError, match=message):
        SRH(**kwargs)


def test_srh_error_is_a_value_error():
    assert issubclass(SRHError, ValueError)


# Onward, return path, reversed SRH on C -> P1 -> P2 -> S.

def test_onward_at_first_proxy_keeps_every_segment_and_decrements():
    tlvs = (TLV(RETURN_PATH_TLV, P1.packed + C.packed),)
    at_p1 = SRH([S, P2, P1], 2, flags=1, tag=9, tlvs=tlvs)
    onward = at_p1.onward()
    assert onward.segments == (S, P2, P1)      # P1 stays: P2 can reverse the path
    assert onward.segments_left == 1 and onward.last_entry == 2
    assert onward.active_segment == P2
    assert (onward.flags, onward.tag, onward.tlvs) == (1, 9, tlvs)


def test_onward_is_none_when_next_hop_is_final_destination():
    at_p2 = SRH([S, P2, P1], 1)
    assert at_p2.onward() is None


def test_onward_at_final_destination_is_an_error():
    with pytest.raises(SRHError, match=r"segments_left is 0"):
        SRH([S, P2, P1], 0).onward()


def test_onward_chain_visits_every_proxy_once():
    p3, p4 = A("fc00:3::1"), A("fc00:4::1")
    srh = SRH.from_path([P1, P2, p3, p4, S])
    hops = []
    while srh is not None:
        hops.append(srh.active_segment)
        assert srh.final_destination == S
        srh = srh.onward()
    # p4 connects straight to S: its onward header is None.
    assert hops == [P1, P2, p3, p4]


def test_onward_from_third_of_four_proxies():
    p3 = A("fc00:3::1")
    at_p3 = SRH.from_path([P1, P2, p3, S]).onward().onward()
    assert at_p3.active_segment == p3
    assert at_p3.segments_left == 1
    assert at_p3.onward() is None


def test_return_path_from_tlv():
    srh = SRH.from_path([P1, P2, S], tlvs=[TLV(RETURN_PATH_TLV, P2.packed + P1.packed + C.packed)])
    assert srh.return_path() == [P2, P1, C]
    assert srh.onward().return_path() == [P2, P1, C]


def test_return_path_absent():
    assert SRH.from_path([P1, S], tlvs=[TLV(130, b"x")]).return_path() is None


@pytest.mark.parametrize("value", [b"", bytes(15), bytes(17)])
def test_return_path_bad_length(value):
    srh = SRH.from_path([P1, S], tlvs=[TLV(RETURN_PATH_TLV, value)])
    with pytest.raises(SRHError, match=r"return-path TLV value is \d+ octets, expected a "
                                       r"nonzero multiple of 16"):
        srh.return_path()


def test_reversed_to_at_first_proxy_is_none():
    assert SRH([S, P2, P1], 2).reversed_to(C) is None


def test_reversed_to_at_second_proxy_goes_back_through_first():
    back = SRH([S, P2, P1], 1, tag=5).reversed_to(C)
    assert back.path == [P1, C]
    assert back.segments == (C, P1)
    assert back.active_segment == P1
    assert back.final_destination == C
    assert back.tag == 5 and back.tlvs == ()


def test_reversed_to_at_server_visits_proxies_in_reverse_order():
    back = SRH([S, P2, P1], 0).reversed_to(str(C))
    assert back.path == [P2, P1, C]
    assert back.segments_left == 2


def test_reversed_to_rejects_bad_client():
    with pytest.raises(SRHError, match=r"client: 'x' is not an IPv6 address"):
        SRH([S, P2, P1], 0).reversed_to("x")


# find_srh.

def test_find_srh_tcp_syn_with_srh():
    packet = ipv6_packet(THREE_SEGMENTS + tcp_header(40000, 80), 43)
    info = find_srh(packet)
    assert isinstance(info, PacketInfo)
    assert (info.src, info.dst) == (C, P1)
    assert info.srh == SRH.parse(THREE_SEGMENTS)
    assert (info.proto, info.l4_offset, info.sport, info.dport) == (6, 96, 40000, 80)


def test_find_srh_without_extension_headers():
    info = find_srh(ipv6_packet(tcp_header(1, 2), 6))
    assert info == PacketInfo(C, P1, None, 6, 40, 1, 2)


def test_find_srh_through_hop_by_hop_dstopts_and_first_fragment():
    payload = (generic_extension(60)                    # hop-by-hop -> dstopts
               + generic_extension(43, 1)               # dstopts (16 octets) -> routing
               + THREE_SEGMENTS[:0] + bytes([44]) + THREE_SEGMENTS[1:]  # SRH -> fragment
               + bytes([17, 0, 0, 1, 0, 0, 0, 1])       # fragment offset 0, more fragments
               + struct.pack("!HHHH", 53, 5353, 8, 0))  # UDP
    info = find_srh(ipv6_packet(payload, 0))
    assert info.srh.segments == (S, P2, P1) and info.srh.next_header == 44
    assert (info.proto, info.l4_offset) == (17, 40 + 8 + 16 + 56 + 8)
    assert (info.sport, info.dport) == (53, 5353)


def test_find_srh_non_first_fragment_has_no_ports():
    payload = bytes([6, 0, 0, 0x08, 0, 0, 0, 1]) + tcp_header()  # offset 1 (8 octets)
    info = find_srh(ipv6_packet(payload, 44))
    assert (info.proto, info.l4_offset, info.sport, info.dport) == (6, 48, None, None)


def test_find_srh_skips_other_routing_types():
    rh0 = bytes([6, 2, 0, 1, 0, 0, 0, 0]) + S.packed
    info = find_srh(ipv6_packet(rh0 + tcp_header(), 43))
    assert info.srh is None and info.proto == 6 and info.sport == 40000


def test_find_srh_ports_absent_when_l4_truncated():
    info = find_srh(ipv6_packet(b"\x00\x01\x00", 6))
    assert (info.proto, info.l4_offset, info.sport, info.dport) == (6, 40, None, None)


def test_find_srh_no_next_header_and_trailing_link_padding():
    info = find_srh(ipv6_packet(b"", 59) + bytes(6))
    assert (info.proto, info.l4_offset, info.sport) == (59, 40, None)


def test_find_srh_ignores_bytes_past_payload_length():
    packet = ipv6_packet(tcp_header(), 6, payload_length=2)
    info = find_srh(packet)
    assert info.sport is None  # only 2 octets of TCP header belong to the packet


@pytest.mark.parametrize("packet, message", [
    (bytes(39), r"IPv6 packet truncated: 39 octets, the fixed header needs 40"),
    (struct.pack("!IHBB", 4 << 28, 0, 6, 64) + bytes(32), r"IP version is 4, expected 6"),
    (ipv6_packet(tcp_header(), 6, payload_length=21), r"payload length 21 runs past the 60"),
    (ipv6_packet(bytes([6, 0, 0]), 0), r"extension header 0 at offset 40 truncated"),
    (ipv6_packet(bytes([6, 1]) + bytes(6), 60), r"runs to 56, past the payload end 48"),
    (ipv6_packet(bytes([6, 0, 0]), 44), r"fragment header at offset 40 truncated"),
    (ipv6_packet(generic_extension(0) + generic_extension(6), 60),
     r"hop-by-hop options header at offset 48"),
    (ipv6_packet((bytes([43]) + THREE_SEGMENTS[1:]) * 2 + THREE_SEGMENTS, 43),
     r"extra routing header at offset 152"),
    (ipv6_packet(bytes([43]) + THREE_SEGMENTS[1:] + bytes([6, 0, 0, 0]) + bytes(4), 43),
     r"extra routing header at offset 96"),
    (ipv6_packet(bytes([43, 0, 0, 0]) + bytes(4) + THREE_SEGMENTS, 43),
     r"extra routing header at offset 48"),
    (ipv6_packet(generic_extension(60) * 9, 60), r"more than 8 extension headers"),
    (ipv6_packet(bytes([44, 0, 0, 0, 0, 0, 0, 0]) * 9, 44), r"more than 8 extension headers"),
    (ipv6_packet(_with(segments_left=3), 43), r"segments_left 3 is beyond last_entry 2"),
])
def test_find_srh_errors(packet, message):
    with pytest.raises(SRHError, match=message):
        find_srh(packet)


def test_find_srh_accepts_eight_extension_headers():
    info = find_srh(ipv6_packet(generic_extension(60) * 7 + generic_extension(6)
                                + tcp_header(7, 8), 60))
    assert (info.proto, info.l4_offset, info.sport, info.dport) == (6, 40 + 64, 7, 8)


# Properties.

addresses = st.integers(0, 2**128 - 1).map(A)
tlv_lists = st.lists(
    st.builds(TLV, st.integers(0, 255).filter(lambda t: t not in (0, 4)),
              st.binary(max_size=255)),
    max_size=3)


@st.composite
def srhs(draw):
    segments = draw(st.lists(addresses, min_size=1, max_size=MAX_SEGMENTS))
    return SRH(
        segments,
        draw(st.integers(0, len(segments) - 1)),
        draw(st.integers(0, 255)),
        draw(st.integers(0, 65535)),
        tuple(draw(tlv_lists)),
        draw(st.integers(0, 255)),
    )


@given(srhs())
def test_round_trip(srh):
    wire = srh.to_bytes()
    assert len(wire) == srh.wire_length
    assert len(wire) % 8 == 0
    assert SRH.parse(wire) == srh
    assert SRH.parse(wire + b"\xaa" * 9) == srh


@given(srhs(), st.sampled_from([6, 17]), st.binary(max_size=40))
def test_round_trip_inside_packet(srh, proto, l4):
    srh = dataclasses.replace(srh, next_header=proto)
    info = find_srh(ipv6_packet(srh.to_bytes() + l4, 43))
    assert info.srh == srh
    assert (info.proto, info.l4_offset) == (proto, 40 + srh.wire_length)
    expected_ports = struct.unpack("!HH", l4[:4]) if len(l4) >= 4 else (None, None)
    assert (info.sport, info.dport) == expected_ports


@given(srhs())
def test_onward_and_reversed_are_consistent(srh):
    if srh.segments_left == 0:
        with pytest.raises(SRHError):
            srh.onward()
    elif srh.segments_left == 1:
        assert srh.onward() is None
    else:
        onward = srh.onward()
        assert onward.final_destination == srh.final_destination
        assert onward.segments == srh.segments
        assert onward.segments_left == srh.segments_left - 1
    back = srh.reversed_to(C)
    earlier = srh.path[:srh.last_entry - srh.segments_left]
    if not earlier:
        assert back is None
    else:
        assert back.path == earlier[::-1] + [C]


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_parse_random_bytes_only_raises_srh_error(data):
    try:
        SRH.parse(data)
    except SRHError:
        pass


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_parse_mutated_header_only_raises_srh_error(noise):
    # Random bytes behind a plausible fixed header reach the segment and TLV code.
    data = bytes([6, len(noise) // 8, 4]) + noise
    try:
        SRH.parse(data)
    except SRHError:
        pass


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_find_srh_random_bytes_only_raises_srh_error(data):
    try:
        find_srh(data)
    except SRHError:
        pass


@settings(max_examples=500)
@given(st.sampled_from([0, 6, 17, 43, 44, 59, 60]), st.binary(max_size=300))
def test_find_srh_random_payload_only_raises_srh_error(next_header, payload):
    try:
        find_srh(ipv6_packet(payload, next_header))
    except SRHError:
        pass
