"""Unit tests for srv6pipes.addressplan: layout, encode/decode, validation errors."""
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from srv6pipes.addressplan import AddressError, AddressPlan, FunctionAddress


def test_default_layout_matches_paper_fig2():
    plan = AddressPlan("fc00:1::/80")
    assert plan.function_bits == 16 and plan.param_bits == 32 and plan.gap_bits == 0
    assert [(f.name, f.offset, f.width) for f in plan.fields] == [
        ("locator", 0, 80), ("function", 80, 16), ("gap", 96, 0), ("params", 96, 32)]


def test_default_example_encode_and_decode():
    plan = AddressPlan("fc00:1::/80")
    addr = plan.encode(1, 0x2A)
    assert addr == ipaddress.IPv6Address("fc00:1::1:0:2a")
    assert plan.decode(addr) == FunctionAddress(1, 0x2A)
    assert plan.decode("fc00:1::1:0:2a") == FunctionAddress(function_id=1, params=42)


def test_encode_without_params_and_extremes():
    plan = AddressPlan("fc00:1::/80")
    assert plan.encode(7) == ipaddress.IPv6Address("fc00:1::7:0:0")
    assert plan.encode(0xFFFF, 0xFFFFFFFF) == ipaddress.IPv6Address("fc00:1::ffff:ffff:ffff")


def test_locator_accepts_network_object():
    net = ipaddress.IPv6Network("fc00:2::/64")
    plan = AddressPlan(net)
    assert plan.locator == net
    assert plan.gap_bits == 16


def test_repr_and_equality():
    plan = AddressPlan("fc00:1::/80")
    assert repr(plan) == "AddressPlan('fc00:1::/80', function_bits=16, param_bits=32)"
    assert plan == eval(repr(plan), {"AddressPlan": AddressPlan})
    assert hash(plan) == hash(AddressPlan(ipaddress.IPv6Network("fc00:1::/80")))
    assert plan != AddressPlan("fc00:1::/80", param_bits=31)


def test_locator_with_host_bits_is_rejected_with_hint():
    with pytest.raises(AddressError, match=r"host bits set; did you mean fc00:1::/80"):
        AddressPlan("fc00:1::1/80")


@pytest.mark.parametrize("locator, message", [
    ("10.0.0.0/8", "not an IPv6 prefix"),
    ("not-an-address/64", "not an IPv6 prefix"),
    ("fc00::/129", "invalid prefix length"),
    (ipaddress.IPv4Network("10.0.0.0/8"), "IPv4 prefix"),
])
def test_bad_locator(locator, message):
    with pytest.raises(AddressError, match=message):
        AddressPlan(locator)


@pytest.mark.parametrize("kwargs, message", [
    ({"function_bits": 0}, r"function_bits must be between 1 and 32, got 0"),
    ({"function_bits": 33}, r"function_bits must be between 1 and 32, got 33"),
    ({"param_bits": -1}, r"param_bits must be between 0 and 64, got -1"),
    ({"param_bits": 65}, r"param_bits must be between 0 and 64, got 65"),
    ({"function_bits": 16.0}, r"function_bits must be an integer"),
    ({"function_bits": 32, "param_bits": 32}, r"does not fit in 128 bits: locator /80 \+ "
                                              r"function_bits 32 \+ param_bits 32 = 144"),
])
def test_bad_widths(kwargs, message):
    with pytest.raises(AddressError, match=message):
        AddressPlan("fc00:1::/80", **kwargs)


def test_widths_filling_exactly_128_bits():
    plan = AddressPlan("fc00::/32", function_bits=32, param_bits=64)
    assert plan.gap_bits == 0
    assert plan.decode(plan.encode(2**32 - 1, 2**64 - 1)) == (2**32 - 1, 2**64 - 1)


@pytest.mark.parametrize("function_id, params, message", [
    (-1, 0, r"function_id -1 does not fit in 16 bits \(0..65535\)"),
    (0x10000, 0, r"function_id 65536 does not fit in 16 bits"),
    (1, -1, r"params -1 does not fit in 32 bits"),
    (1, 2**32, r"params 4294967296 does not fit in 32 bits \(0..4294967295\)"),
    (True, 0, r"function_id must be an integer"),
])
def test_encode_out_of_range(function_id, params, message):
    with pytest.raises(AddressError, match=message):
        AddressPlan("fc00:1::/80").encode(function_id, params)


def test_zero_param_bits_only_allows_zero_params():
    plan = AddressPlan("fc00:1::/80", param_bits=0)
    assert plan.decode(plan.encode(5)) == (5, 0)
    with pytest.raises(AddressError, match=r"params 1 does not fit in 0 bits"):
        plan.encode(5, 1)


def test_decode_outside_locator():
    plan = AddressPlan("fc00:1::/80")
    with pytest.raises(AddressError, match=r"fc00:2::1 is outside the locator fc00:1::/80"):
        plan.decode("fc00:2::1")
    assert not plan.contains("fc00:2::1")
    assert plan.contains("fc00:1::1:0:2a")
    assert plan.contains(ipaddress.IPv6Address("fc00:1::ffff:ffff:ffff"))
    assert not plan.contains("fc00:1:0:0:1::")


def test_decode_rejects_gap_bits():
    plan = AddressPlan("fc00:1::/64", function_bits=16, param_bits=32)
    assert plan.gap_bits == 16
    assert plan.decode("fc00:1::5:0:0:2a") == (5, 0x2A)
    with pytest.raises(AddressError, match=r"nonzero bits \(0x1\) in the 16-bit gap"):
        plan.decode("fc00:1::5:1:0:2a")
    # contains() only checks the locator.
    assert plan.contains("fc00:1::5:1:0:2a")


@pytest.mark.parametrize("bad", ["10.0.0.1", "garbage", b"\x00" * 4, None])
def test_decode_and_contains_reject_non_ipv6(bad):
    plan = AddressPlan("fc00:1::/80")
    with pytest.raises(AddressError, match="is not an IPv6 address"):
        plan.decode(bad)
    with pytest.raises(AddressError, match="is not an IPv6 address"):
        plan.contains(bad)


def test_address_error_is_a_value_error():
    assert issubclass(AddressError, ValueError)


@st.composite
def plans_and_values(draw):
    """A random valid plan with a function id and params that fit it."""
    function_bits = draw(st.integers(1, 32))
    param_bits = draw(st.integers(0, 64))
    prefixlen = draw(st.integers(0, 128 - function_bits - param_bits))
    network_int = draw(st.integers(0, 2**128 - 1)) >> (128 - prefixlen) << (128 - prefixlen) \
        if prefixlen else 0
    locator = ipaddress.IPv6Network((network_int, prefixlen))
    plan = AddressPlan(locator, function_bits, param_bits)
    function_id = draw(st.integers(0, 2**function_bits - 1))
    params = draw(st.integers(0, 2**param_bits - 1))
    return plan, function_id, params


@given(plans_and_values())
def test_encode_decode_round_trip(case):
    plan, function_id, params = case
    addr = plan.encode(function_id, params)
    assert addr in plan.locator
    assert plan.contains(addr)
    assert plan.decode(addr) == FunctionAddress(function_id, params)
    assert plan.decode(str(addr)) == (function_id, params)


@given(plans_and_values(), st.integers(0, 2**128 - 1))
def test_decode_any_address_never_crashes(case, value):
    plan = case[0]
    addr = ipaddress.IPv6Address(value)
    try:
        decoded = plan.decode(addr)
    except AddressError:
        return
    # Whatever decodes must encode back to the same address (one spelling per meaning).
    assert plan.encode(*decoded) == addr
