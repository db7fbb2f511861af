"""vfapi: Function validation, FlowInfo, and FlowAdapter behind the relay's streaming contract
(directly, and through tests/support/vfharness.py with the chaos-py test function)."""
from __future__ import annotations

import ipaddress
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from srv6pipes.vfapi import DOWN, UP, FlowAdapter, FlowInfo, Function, ResetFlow
from tests.support.vfharness import (MODULES, ContractError, DirectionPump, chunked, function_by_name,
                       load_module, make_flow, pump_to_end, run_direction, run_flow)

FLOW = make_flow()


def identity(ctx, direction, data, eof):
    return data


def scripted(*results):
    """A function whose process returns the given results in turn, recording its calls."""
    calls = []
    results = list(results)

    def process(ctx, direction, data, eof):
        calls.append((direction, bytes(data), eof))
        return results.pop(0)
    return Function(id=0x200, name="scripted", process=process), calls


# -- Function and FlowInfo ------------------------------------------------------------------

@pytest.mark.parametrize("bad_id", [-1, 2**32, 1.0, "5", True, None])
def test_function_rejects_bad_ids(bad_id):
    with pytest.raises(ValueError, match="function id"):
        Function(id=bad_id, name="f", process=identity)


@pytest.mark.parametrize("bad_name", ["", "two words", "tab\there", "nl\n", None, 5])
def test_function_rejects_bad_names(bad_name):
    with pytest.raises(ValueError, match="function name"):
        Function(id=1, name=bad_name, process=identity)


@pytest.mark.parametrize("callback", ["process", "spawn", "despawn"])
def test_function_rejects_uncallable_callbacks(callback):
    kwargs = {"id": 1, "name": "f", "process": identity, callback: "not callable"}
    with pytest.raises(ValueError, match=f"{callback} is not callable"):
        Function(**kwargs)


def test_function_defaults_and_limits():
    f = Function(id=2**32 - 1, name="chaos-py", process=identity)
    assert f.spawn(7, FLOW) is None and f.despawn(None) is None and f.description == ""
    Function(id=0, name="x", process=identity)


def test_flowinfo_from_wire():
    pack = lambda text: ipaddress.IPv6Address(text).packed  # noqa: E731
    info = FlowInfo.from_wire(pack("2001:db8::1"), 1234, pack("2001:db8::2"), 80,
                              pack("fc00:1::5:0:7"), 7)
    assert info == FlowInfo("2001:db8::1", 1234, "2001:db8::2", 80, "fc00:1::5:0:7", 7)


# -- FlowAdapter ----------------------------------------------------------------------------

def test_spawn_gets_params_and_flow_and_close_despawns_once():
    seen = []
    f = Function(id=1, name="f", process=identity,
                 spawn=lambda params, flow: ("ctx", params, flow),
                 despawn=lambda ctx: seen.append(ctx))
    adapter = FlowAdapter(f, 42, FLOW)
    assert adapter.ctx == ("ctx", 42, FLOW)
    assert seen == []
    adapter.close()
    adapter.close()
    assert seen == [("ctx", 42, FLOW)]


@pytest.mark.parametrize("result, expected", [
    (b"out", (3, b"out")),                 # bytes: everything consumed
    (None, (3, b"")),
    (bytearray(b"ba"), (3, b"ba")),
    (memoryview(b"mv"), (3, b"mv")),
    ((1, b"x"), (1, b"x")),               # partial consumption
    ((0, b""), (0, b"")),
    ((3, None), (3, b"")),
])
def test_step_results(result, expected):
    f, _ = scripted(result)
    consumed, out = FlowAdapter(f, 0, FLOW).step(UP, b"abc", False, 100)
    assert (consumed, out) == expected
    assert type(out) is bytes and type(consumed) is int


@pytest.mark.parametrize("result, error", [
    ((4, b""), ValueError),       # more than offered
    ((-1, b""), ValueError),
    ((1.0, b""), TypeError),      # the relay stores it in a size_t
    ((None, b""), TypeError),
    (5, TypeError),               # bytes(5) would be five zero bytes
    ("text", TypeError),
    ((1, "text"), TypeError),
    ((1, b"", 2), ValueError),    # not a pair
])
def test_step_rejects_broken_results(result, error):
    f, _ = scripted(result)
    with pytest.raises(error):
        FlowAdapter(f, 0, FLOW).step(UP, b"abc", False, 100)


def test_output_over_out_cap_is_handed_out_over_later_calls():
    f, calls = scripted(b"0123456789", b"next")
    adapter = FlowAdapter(f, 0, FLOW)
    assert adapter.step(UP, b"ab", False, 4) == (2, b"0123")
    # While output is pending, new input is not processed (consumed 0), whatever is offered.
    assert adapter.step(UP, b"cd", False, 4) == (0, b"4567")
    assert adapter.step(UP, b"cd", True, 4) == (0, b"89")
    assert len(calls) == 1
    assert adapter.step(UP, b"cd", False, 4) == (2, b"next")
    assert len(calls) == 2
    assert adapter.step(UP, b"", False, 4) == (0, b"")   # nothing held, nothing offered
    assert len(calls) == 2


def test_pending_output_is_per_direction():
    f, calls = scripted(b"up-output", b"down")
    adapter = FlowAdapter(f, 0, FLOW)
    assert adapter.step(UP, b"u", False, 2) == (1, b"up")
    assert adapter.step(DOWN, b"d", False, 2) == (1, b"do")
    assert adapter.step(UP, b"", False, 100) == (0, b"-output")
    assert adapter.step(DOWN, b"", False, 100) == (0, b"wn")
    assert [c[0] for c in calls] == [UP, DOWN]


def test_pending_output_is_a_snapshot():
    buffer = bytearray(b"abcdef")
    f, _ = scripted((1, buffer))
    adapter = FlowAdapter(f, 0, FLOW)
    assert adapter.step(UP, b"x", False, 2) == (1, b"ab")
    buffer[:] = b"XXXXXX"          # the function reuses its buffer
    assert adapter.step(UP, b"", False, 10) == (0, b"cdef")


def test_process_not_called_without_data_or_eof():
    f, calls = scripted()
    adapter = FlowAdapter(f, 0, FLOW)
    assert adapter.step(UP, b"", False, 10) == (0, b"")
    assert calls == []


def test_eof_flush_then_finished():
    f, calls = scripted(b"tail")
    adapter = FlowAdapter(f, 0, FLOW)
    assert adapter.step(UP, b"", True, 10) == (0, b"tail")
    assert calls == [(UP, b"", True)]
    # Finished: the relay's next eof call ends the direction; process is not called again.
    assert adapter.step(UP, b"", True, 10) == (0, b"")
    assert len(calls) == 1


def test_eof_with_leftover_is_called_again_until_all_consumed():
    f, calls = scripted((2, b"ab"), (1, b"c"), (1, b"d" * 5), b"never")
    adapter = FlowAdapter(f, 0, FLOW)
    assert adapter.step(UP, b"abcd", True, 10) == (2, b"ab")
    assert adapter.step(UP, b"cd", True, 10) == (1, b"c")
    # The last byte's output exceeds out_cap: handed out first, then finished.
    assert adapter.step(UP, b"d", True, 3) == (1, b"ddd")
    assert adapter.step(UP, b"", True, 3) == (0, b"dd")
    assert adapter.step(UP, b"", True, 3) == (0, b"")
    assert [c[1] for c in calls] == [b"abcd", b"cd", b"d"]
    assert all(c[2] for c in calls)


def test_eof_is_per_direction():
    f, calls = scripted(b"", b"down")
    adapter = FlowAdapter(f, 0, FLOW)
    assert adapter.step(UP, b"", True, 10) == (0, b"")
    assert adapter.step(DOWN, b"x", False, 10) == (1, b"down")


@pytest.mark.parametrize("exc", [ResetFlow("blocked"), RuntimeError("bug")])
def test_exceptions_from_process_propagate(exc):
    def process(ctx, direction, data, eof):
        raise exc
    adapter = FlowAdapter(Function(id=1, name="f", process=process), 0, FLOW)
    with pytest.raises(type(exc)):
        adapter.step(UP, b"x", False, 10)


def test_exceptions_from_spawn_propagate():
    def spawn(params, flow):
        raise ResetFlow("no")
    with pytest.raises(ResetFlow):
        FlowAdapter(Function(id=1, name="f", process=identity, spawn=spawn), 0, FLOW)


# -- the harness itself ---------------------------------------------------------------------

def test_harness_waits_for_more_input_when_starved():
    # Frames of 4 bytes: consumes only whole frames (partial consumption, starving between).
    def frames(ctx, direction, data, eof):
        n = len(data) // 4 * 4
        if eof and n < len(data):
            raise ResetFlow("truncated frame")
        return n, data[:n].upper()
    f = Function(id=1, name="frames", process=frames)
    adapter = FlowAdapter(f, 0, FLOW)
    pump = DirectionPump(adapter, UP, [b"ab", b"cdef", b"gh"], in_cap=8, out_cap=8)
    pump_to_end([pump])
    assert bytes(pump.output) == b"ABCDEFGH"
    assert pump.calls[0] == (2, False, 0, 0)     # starved on 2 bytes


def test_harness_detects_stall_on_full_buffer():
    f = Function(id=1, name="f", process=lambda ctx, d, data, eof: (0, b""))
    with pytest.raises(ContractError, match="full input buffer"):
        run_direction(FlowAdapter(f, 0, FLOW), UP, [b"x" * 10], in_cap=4, out_cap=4)


def test_harness_detects_leftover_at_eof():
    f = Function(id=1, name="f", process=lambda ctx, d, data, eof: (0, b""))
    with pytest.raises(ContractError, match="at EOF"):
        run_direction(FlowAdapter(f, 0, FLOW), UP, [b"xy"], in_cap=4, out_cap=4)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=3000), sizes=st.lists(st.integers(1, 700), max_size=8),
       in_cap=st.integers(1, 600), out_cap=st.integers(1, 600), factor=st.integers(0, 4),
       seed=st.integers(0, 2**32 - 1))
def test_expanding_function_through_the_harness(data, sizes, in_cap, out_cap, factor, seed):
    """A function with random partial consumption whose output is `factor` copies of each
    consumed byte (so output exceeds out_cap often): nothing lost, nothing reordered."""
    rng = random.Random(seed)

    def process(ctx, direction, chunk, eof):
        n = rng.randint(1, len(chunk)) if chunk else 0
        return n, bytes(b for b in chunk[:n] for _ in range(factor))
    f = Function(id=1, name="expand", process=process)
    out = run_direction(FlowAdapter(f, 0, FLOW), UP, chunked(data, sizes), in_cap=in_cap,
                        out_cap=out_cap)
    assert out == bytes(b for b in data for _ in range(factor))


# -- chaos-py -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chaos():
    return load_module(MODULES / "chaos.py")


def test_chaos_declares_itself(chaos):
    (f,) = chaos.FUNCTIONS
    assert (f.id, f.name) == (0x7F00, "chaos-py")


@settings(max_examples=200, deadline=None)
@given(up=st.binary(max_size=5000), down=st.binary(max_size=5000),
       up_sizes=st.lists(st.integers(1, 2000), max_size=6),
       down_sizes=st.lists(st.integers(1, 2000), max_size=6),
       in_cap=st.integers(1, 1024), out_cap=st.integers(1, 1024),
       port=st.integers(1, 65535), params=st.integers(0, 2**32 - 1),
       seed=st.integers(0, 2**32 - 1))
def test_chaos_is_identity_through_the_relay_contract(chaos, up, down, up_sizes, down_sizes,
                                                      in_cap, out_cap, port, params, seed):
    f = function_by_name(chaos, "chaos-py")
    params &= ~chaos.STARVE     # starving is safe only with room to spare (test below)
    flow = make_flow(client_port=port, params=params)
    out_up, out_down = run_flow(f, params, flow, chunked(up, up_sizes),
                                chunked(down, down_sizes), in_cap=in_cap, out_cap=out_cap,
                                rng=random.Random(seed))
    assert out_up == up and out_down == down


def test_chaos_consumes_partially_and_replays(chaos):
    f = function_by_name(chaos, "chaos-py")
    data = bytes(range(256)) * 400

    def calls(flow):
        pump = DirectionPump(FlowAdapter(f, 0, flow), UP, [data], in_cap=4096, out_cap=4096)
        pump_to_end([pump])
        assert bytes(pump.output) == data
        return pump.calls
    first = calls(make_flow(client_port=1111))
    assert any(0 < c.consumed < c.offered for c in first)
    assert all(c.consumed > 0 for c in first if c.offered)          # never starves
    assert calls(make_flow(client_port=1111)) == first              # seeded by the flow
    assert calls(make_flow(client_port=2222)) != first


@settings(max_examples=100, deadline=None)
@given(data=st.binary(min_size=1, max_size=2000), port=st.integers(1, 65535))
def test_chaos_starve_mode_never_starves_twice_or_at_eof(chaos, data, port):
    f = function_by_name(chaos, "chaos-py")
    adapter = FlowAdapter(f, chaos.STARVE, make_flow(client_port=port, params=chaos.STARVE))
    previous_zero = False
    rest, out = data, b""
    while rest:
        # Offered the same bytes again (no new input): a starve must be followed by progress.
        consumed, chunk = adapter.step(UP, rest, False, 4096)
        assert consumed or not previous_zero
        previous_zero = consumed == 0
        rest, out = rest[consumed:], out + chunk
    assert out == data
    adapter2 = FlowAdapter(f, chaos.STARVE, make_flow(client_port=port, params=chaos.STARVE))
    for _ in range(20):
        consumed, _ = adapter2.step(DOWN, data, True, 4096)
        assert consumed > 0
        data = data[consumed:]
        if not data:
            break


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=20000), sizes=st.lists(st.integers(1, 3000), min_size=1,
                                                      max_size=6),
       in_cap=st.integers(1025, 8192), port=st.integers(1, 65535))
def test_chaos_starve_mode_through_the_harness(chaos, data, sizes, in_cap, port):
    f = function_by_name(chaos, "chaos-py")
    flow = make_flow(client_port=port, params=chaos.STARVE)
    out = run_direction(FlowAdapter(f, chaos.STARVE, flow), UP, chunked(data, sizes),
                        in_cap=in_cap, out_cap=in_cap)
    assert out == data
