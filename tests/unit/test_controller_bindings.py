"""Binding allocation and expiry (pipes/controller/bindings.py) and the agent channel's
frames (messages.py): pure logic."""
import ipaddress
import json

import pytest
from hypothesis import given, settings, strategies as st

from srv6pipes.controller import messages
from srv6pipes.controller.bindings import BindingKey, BindingTable, BlockExhausted
from srv6pipes.controller.messages import Binding, ChannelError, NonceCache

A = ipaddress.IPv6Address
N = ipaddress.IPv6Network
BLOCK = N("fd00:a1::b:0/124")     # 15 usable BSIDs
KEY = b"k" * 32


def key(i, router="a1"):
    return BindingKey(router, N("fd00:c1::/64"), A(f"fd00:d::{i + 1:x}"), ("encrypt", "decrypt"))


def test_allocation_lowest_free_never_the_first_address_and_exhaustion():
    table = BindingTable({"a1": BLOCK})
    entries = [table.create(key(i), [A("fc00:1::1")], ["p1"], "t", 100.0) for i in range(15)]
    assert [e.binding.bsid for e in entries] == [BLOCK[i] for i in range(1, 16)]
    with pytest.raises(BlockExhausted, match="fd00:a1::b:0/124 of a1 is full"):
        table.create(key(99), [A("fc00:1::1")], ["p1"], "t", 100.0)
    table.remove(entries[4])
    assert table.create(key(99), [A("fc00:1::1")], ["p1"], "t", 100.0).binding.bsid == BLOCK[5]
    with pytest.raises(KeyError):
        table.create(key(99), [A("fc00:1::1")], ["p1"], "t", 100.0)


def test_touch_and_expire():
    table = BindingTable({"a1": BLOCK})
    old = table.create(key(1), [A("fc00:1::1")], ["p1"], "t", 10.0)
    fresh = table.create(key(2), [A("fc00:1::1")], ["p1"], "t", 10.0)
    table.touch(fresh, 50.0)
    table.touch(fresh, 20.0)   # never shortened
    assert table.expire(30.0) == [old]
    assert table.get(key(1)) is None and table.get(key(2)) is fresh and len(table) == 1
    assert table.expire(50.0) == [fresh] and len(table) == 0


def test_reroute_only_moves_bindings_crossing_a_dead_proxy():
    table = BindingTable({"a1": BLOCK})
    via_p1 = table.create(key(1), [A("fc00:1::5:0:1"), A("fc00:3::6:0:1")], ["p1", "p3"], "t", 9.0)
    via_p2 = table.create(key(2), [A("fc00:2::5:0:1"), A("fc00:3::6:0:1")], ["p2", "p3"], "t", 9.0)
    moved, failed = table.reroute(lambda e: "p1" in e.proxies,
                                  lambda e: ([A("fc00:2::5:0:1"), A("fc00:3::6:0:1")], ["p2", "p3"]))
    assert moved == [via_p1] and not failed
    assert via_p1.proxies == ("p2", "p3") and via_p1.generation == 2
    assert via_p1.binding.segments[0] == A("fc00:2::5:0:1")
    assert via_p1.binding.bsid == BLOCK[1]          # the client keeps its BSID
    assert via_p2.generation == 1
    assert table.per_proxy() == {"p2": 2, "p3": 2}

    def nowhere(entry):
        raise RuntimeError("no path")
    moved, failed = table.reroute(lambda e: "p2" in e.proxies, nowhere)
    assert not moved and len(failed) == 2


@given(st.lists(st.tuples(st.integers(0, 30), st.booleans()), max_size=60))
@settings(max_examples=50)
def test_allocation_never_hands_out_a_bsid_twice(ops):
    table = BindingTable({"a1": BLOCK})
    for i, remove in ops:
        existing = table.get(key(i))
        if existing is not None and remove:
            table.remove(existing)
        elif existing is None:
            try:
                table.create(key(i), [A("fc00:1::1")], ["p1"], "t", 1.0)
            except BlockExhausted:
                assert len(table) == 15
        bsids = [e.binding.bsid for e in table.by_key.values()]
        assert len(bsids) == len(set(bsids)) == len(table.by_bsid)
        assert all(b in BLOCK and b != BLOCK[0] for b in bsids)


# -- the channel ---------------------------------------------------------------------

BINDING = Binding(A("fd00:a1::b:1"), (A("fc00:1::5:0:1"), A("fc00:3::6:0:1")), A("fd00:d::1"),
                  (N("fd00:c1::/64"),), "staff encrypt,decrypt www")


def test_binding_json_round_trip_and_sync_parsing():
    assert Binding.from_json(json.loads(json.dumps(BINDING.to_json()))) == BINDING
    body = {"type": "sync", "bindings": [{"binding": BINDING.to_json(), "lifetime": 30}]}
    assert messages.parse_sync(body) == [(BINDING, 30.0)]


@pytest.mark.parametrize("item, message", [
    ({"binding": {**BINDING.to_json(), "bsid": "nope"}, "lifetime": 3}, "bsid"),
    ({"binding": {**BINDING.to_json(), "segments": []}, "lifetime": 3}, "segments"),
    ({"binding": {**BINDING.to_json(), "clients": ["fd00::/300"]}, "lifetime": 3}, "prefix"),
    ({"binding": {**BINDING.to_json(), "clients": []}, "lifetime": 3}, "clients"),
    ({"binding": BINDING.to_json(), "lifetime": 0}, "lifetime"),
    ({"binding": BINDING.to_json(), "lifetime": True}, "lifetime"),
    ({"binding": BINDING.to_json(), "lifetime": 1e9}, "lifetime"),
    ("not an object", "each item"),
])
def test_bad_sync_items(item, message):
    with pytest.raises(ChannelError, match=message) as refused:
        messages.parse_sync({"type": "sync", "bindings": [item]})
    assert refused.value.reason == "bad_request"


def test_sync_refuses_a_bsid_twice():
    item = {"binding": BINDING.to_json(), "lifetime": 3}
    with pytest.raises(ChannelError, match="listed twice"):
        messages.parse_sync({"type": "sync", "bindings": [item, item]})


def test_frames_authenticate_and_refuse_replays():
    frame = messages.seal({"type": "status"}, KEY, now=1000.0, nonce="n1")
    length = messages.frame_length(frame[:4])
    nonces = NonceCache()
    body, nonce = messages.open_frame(frame[4:4 + length], KEY, nonces, now=1001.0)
    assert body == {"type": "status"} and nonce == "n1"
    with pytest.raises(ChannelError) as refused:
        messages.open_frame(frame[4:], KEY, nonces, now=1002.0)
    assert refused.value.reason == "replay"


@pytest.mark.parametrize("mangle, reason", [
    (lambda f: f.replace(b'"status"', b'"sync"'), "bad_mac"),       # altered body
    (lambda f: b"\xff" + f, "malformed"),
    (lambda f: b"[]", "malformed"),
    (lambda f: f.replace(b'"v":1', b'"v":2'), "version"),
    (lambda f: f.replace(b'"nonce":"n1"', b'"nonce":7'), "malformed"),
])
def test_bad_frames(mangle, reason):
    frame = messages.seal({"type": "status"}, KEY, now=1000.0, nonce="n1")[4:]
    with pytest.raises(ChannelError) as refused:
        messages.open_frame(mangle(frame), KEY, NonceCache(), now=1000.0)
    assert refused.value.reason == reason


def test_wrong_key_stale_and_untyped_frames():
    frame = messages.seal({"type": "status"}, KEY, now=1000.0)[4:]
    with pytest.raises(ChannelError) as refused:
        messages.open_frame(frame, b"x" * 32, NonceCache(), now=1000.0)
    assert refused.value.reason == "bad_mac"
    with pytest.raises(ChannelError) as refused:
        messages.open_frame(frame, KEY, NonceCache(), now=1000.0 + messages.MAX_SKEW + 1)
    assert refused.value.reason == "stale"
    untyped = messages.seal({"kind": "x"}, KEY, now=1000.0)[4:]
    with pytest.raises(ChannelError) as refused:
        messages.open_frame(untyped, KEY, NonceCache(), now=1000.0)
    assert refused.value.reason == "bad_request"


def test_frame_length_bounds():
    for length in (0, messages.MAX_FRAME + 1):
        with pytest.raises(ChannelError) as refused:
            messages.frame_length(length.to_bytes(4, "big"))
        assert refused.value.reason == "too_large"


@given(st.binary(max_size=300))
def test_random_bytes_never_pass(data):
    with pytest.raises(ChannelError):
        messages.open_frame(data, KEY, NonceCache(), now=1000.0)


def test_nonce_cache_is_bounded():
    cache = NonceCache(limit=4)
    assert all(cache.check_and_add(f"n{i}", 1000.0) for i in range(4))
    assert not cache.check_and_add("n9", 1000.0)          # full of live nonces: refuse
    assert cache.check_and_add("n9", 1000.0 + 3 * messages.MAX_SKEW)  # old ones forgotten


def test_channel_key_file(tmp_path):
    path = tmp_path / "key"
    path.write_text("# shared with the agents\n" + "ab" * 16 + "\n")
    path.chmod(0o600)
    assert messages.load_key(str(path)) == bytes.fromhex("ab" * 16)
    path.write_text("abcd\n")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        messages.load_key(str(path))
    path.write_text("zz" * 16)
    with pytest.raises(ValueError, match="hex digits"):
        messages.load_key(str(path))
    path.chmod(0o644)
    with pytest.raises(ValueError, match="readable or writable by others"):
        messages.load_key(str(path))
