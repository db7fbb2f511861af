"""The control and worker messages: declared once, parsed strictly (pure logic)."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from srv6pipes import messages

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                       children, max_size=4),
    max_leaves=12)


def test_every_control_request_round_trips():
    for kind in messages.CONTROL_REQUESTS:
        fields = {"path": "/etc/pipes/mod.so"} if kind is messages.Load else (
            {"module": "mod"} if kind is messages.Unload else {})
        request = kind(id=7, **fields)
        assert messages.parse(messages.encode(request), messages.CONTROL_REQUESTS) == request


def test_worker_requests_need_an_id_and_keep_their_slots():
    request = messages.LoadModule(id=3, path="/run/x/mod.so", slots={"caesar": 9})
    assert messages.parse(messages.encode(request), messages.WORKER_REQUESTS,
                          need_id=True) == request
    with pytest.raises(messages.MessageError, match="missing field 'id'"):
        messages.parse(b'{"cmd": "modules"}', messages.WORKER_REQUESTS, need_id=True)


@pytest.mark.parametrize("line, reason", [
    (b'{"cmd": [1]}', "unknown command list"),               # the one that killed the master
    (b'{"cmd": {"a": 1}}', "unknown command dict"),
    (b'{"cmd": "nope"}', "unknown command 'nope'"),
    (b'[1, 2]', "JSON object"),
    (b'"stats"', "JSON object"),
    (b'{"cmd": "stats", "extra": 1}', "unknown field"),
    (b'{"cmd": "load"}', "missing field 'path'"),
    (b'{"cmd": "load", "path": 5}', "'path' must be a text"),
    (b'{"cmd": "load", "path": ""}', "'path' must be a text"),
    (b'{"cmd": "load", "path": "a\\u0000b"}', "without NUL"),
    (b'{"cmd": "unload", "module": "' + b"m" * 300 + b'"}', "'module' must be a text"),
    (b'{"cmd": "ping", "id": true}', "'id' must be an integer"),
    (b'{"cmd": "ping", "id": -1}', "'id' must be an integer"),
    (b'{"cmd": "ping", "id": 1e3}', "'id' must be an integer"),
    (b'\xff\xfe', "not JSON"),
    (b'{"cmd": "ping"', "not JSON"),
    (b'[' * 50000, "not JSON"),   # deep nesting: RecursionError inside json
    (b'{"cmd": "stats"}' + b" " * messages.MAX_MESSAGE, "longer than"),
], ids=lambda value: value[:20] if isinstance(value, bytes) else None)
def test_bad_requests_are_refused_with_a_reason(line, reason):
    with pytest.raises(messages.MessageError) as refused:
        messages.parse(line, messages.CONTROL_REQUESTS)
    assert reason.split()[-1] in str(refused.value)


def test_worker_slot_maps_are_checked():
    bad = [{"x": "1"}, {"x": -1}, {"x": 1000}, {"": 1}, ["x"], {str(i): 1 for i in range(300)}]
    for slots in bad:
        line = json.dumps({"cmd": "load", "id": 1, "path": "/p.so", "slots": slots}).encode()
        with pytest.raises(messages.MessageError):
            messages.parse(line, messages.WORKER_REQUESTS, need_id=True)


@settings(max_examples=400, deadline=None)
@given(JSON)
def test_any_json_is_a_request_or_a_message_error(value):
    data = json.dumps(value).encode()
    try:
        request = messages.parse(data, messages.CONTROL_REQUESTS)
    except messages.MessageError as exc:
        assert str(exc)
    else:
        assert isinstance(request, messages.CONTROL_REQUESTS)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_a_request_or_a_message_error(data):
    try:
        messages.parse(data, messages.CONTROL_REQUESTS + messages.WORKER_REQUESTS)
    except messages.MessageError:
        pass
