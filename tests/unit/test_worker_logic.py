"""The worker's per-connection decisions, without sockets: which SRH, which segment,
which function, which return header. (The same code runs end to end in tests/e2e.)"""
from __future__ import annotations

from ipaddress import IPv6Address

import pytest

from srv6pipes.addressplan import AddressPlan
from srv6pipes.srh import RETURN_PATH_TLV, SRH, TLV
from srv6pipes.returnpath import return_segments
from srv6pipes.worker import Rejected, resolve_route

PLAN = AddressPlan("fc00:1::/80")
OTHER = AddressPlan("fc00:2::/80")
CLIENT = IPv6Address("fd00:c::1")
SERVER = IPv6Address("fd00:5::1")


class Counters:
    def __init__(self):
        self.values = {}

    def add(self, name, amount=1):
        self.values[name] = self.values.get(name, 0) + amount


def saved_syn(srh: SRH, dst) -> bytes:
    """IPv6 header + SRH + 20-byte TCP SYN header, as TCP_SAVED_SYN returns it."""
    import struct

    tcp = struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    payload = srh.to_bytes() + tcp
    header = struct.pack("!IHBB", 6 << 28, len(payload), 43, 64) + CLIENT.packed + IPv6Address(dst).packed
    return header + payload


def test_table_hit_uses_the_original_segments_left():
    srh = SRH.from_path([PLAN.encode(1, 42), OTHER.encode(0), SERVER])
    counters = Counters()
    route = resolve_route((2, srh.to_bytes()), None, PLAN, counters)
    assert (route.function_id, route.params) == (1, 42)
    assert route.srh.onward().active_segment == OTHER.encode(0)
    assert counters.values == {"table_hits": 1}


def test_table_miss_falls_back_to_the_saved_syn_after_the_kernel_loop():
    srh = SRH.from_path([OTHER.encode(0), PLAN.encode(1, 7), SERVER])
    looped = SRH(srh.segments, segments_left=0)       # what the kernel leaves in the copy
    counters = Counters()
    route = resolve_route(None, saved_syn(looped, SERVER), PLAN, counters)
    assert (route.function_id, route.params) == (1, 7)
    assert route.srh.segments_left == 1
    assert counters.values == {"table_misses": 1, "saved_syn_fallbacks": 1}


@pytest.mark.parametrize("entry, syn, counter", [
    (None, b"", "no_srh"),                                   # SYN cookies: nothing saved
    (None, b"\x60" + b"\0" * 10, "malformed_srh"),
    ((1, b"\x06\x02\x04"), None, "malformed_srh"),
    ((0, SRH([PLAN.encode(0), SERVER], 0).to_bytes()), None, "malformed_srh"),
    ((1, SRH.from_path([OTHER.encode(0), SERVER]).to_bytes()), None, "not_our_segment"),
])
def test_bad_inputs_are_rejected_with_their_counter(entry, syn, counter):
    with pytest.raises(Rejected) as raised:
        resolve_route(entry, syn, PLAN, Counters())
    assert raised.value.counter == counter


def test_saved_syn_without_any_srh_is_no_srh():
    import struct

    tcp = struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    syn = struct.pack("!IHBB", 6 << 28, len(tcp), 6, 64) + CLIENT.packed + SERVER.packed + tcp
    with pytest.raises(Rejected) as raised:
        resolve_route(None, syn, PLAN, Counters())
    assert raised.value.counter == "no_srh"


def test_return_segments_per_mode():
    p0 = AddressPlan("fc00:9::/80").encode(0)
    srh = SRH.from_path([p0, PLAN.encode(1), SERVER])
    route = resolve_route((1, srh.to_bytes()), None, PLAN, Counters())
    assert return_segments(route.srh, CLIENT, "on-path", PLAN) is None
    assert return_segments(route.srh, CLIENT, "reverse", PLAN) == [p0, CLIENT]
    first_hop = SRH.from_path([PLAN.encode(1), SERVER])
    assert return_segments(first_hop, CLIENT, "reverse", PLAN) is None
    back = [PLAN.encode(1), p0, CLIENT]
    tlv = TLV(RETURN_PATH_TLV, b"".join(a.packed for a in back))
    with_tlv = SRH.from_path([p0, PLAN.encode(1), SERVER], tlvs=(tlv,))
    route = resolve_route((1, with_tlv.to_bytes()), None, PLAN, Counters())
    assert return_segments(route.srh, CLIENT, "tlv", PLAN) == [p0, CLIENT]
