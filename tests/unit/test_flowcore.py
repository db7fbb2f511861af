"""Playbooks of the relay's flow core (cext/flowcore.h via srv6pipes._flowcore), no sockets.

A hypothesis state machine plays everything around the core: the two peers (sending in
pieces, half-closing, reading slowly, resetting), the kernel's socket buffers, the pipes of
the splice path and their pool, and the function (an identity that holds bytes back at
random and flushes them at EOF, or the in-place xor). Between the peers' moves it pumps the
flow the way relay.pyx's shell does (steps of both directions, rounds until idle, the
SO_ERROR check after an error event), performing each operation the core asks for on the
model, and checks:

  - every flow ends exactly once: closed, reset or connect-failed;
  - the FIN is sent only after everything before it was delivered (the whole transformed
    stream of that direction);
  - a direction that finishes while the other goes on forwards its FIN at once with a
    shutdown (a half-close); only the last FIN is left to the graceful close, which sends
    it (one shutdown per closed flow, never two);
  - what the core holds is bounded by its buffers (and the accounting of every byte read,
    held and delivered adds up);
  - no stall: an idle flow has no data it could move, no EOF it has not read or forwarded;
  - half-close both ways: a direction's FIN never stops the other one;
  - a function that holds bytes back flushes them at EOF;
  - a reset (a peer's, a socket error, the function's) ends the flow as reset;
  - a pipe taken from the pool is empty;
and at the end drives the flow to completion with cooperative peers: everything arrives.
"""
import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

from srv6pipes import _flowcore as fc

KEY = 0x5A
XOR = bytes(i ^ KEY for i in range(256))
MODES = {"identity": fc.IDENTITY, "inplace": fc.INPLACE, "stream": fc.STREAM}
STUCK_ROUNDS = 50    # rounds that "progress" while nothing changes: a livelock


def expected(mode, data):
    return data.translate(XOR) if mode == "inplace" else data


class Peer:
    """One side's peer and its socket in the proxy: what it sent and we have not read, what
    the proxy may still write to it (its receive window), whether it FIN'd or reset."""

    def __init__(self):
        self.queue = bytearray()    # sent by the peer, not yet read by the proxy
        self.sent = bytearray()     # everything it sent
        self.fin = False            # it sent its FIN (after self.sent)
        self.reset = False          # it sent an RST
        self.room = 0               # bytes the proxy may send to it before EAGAIN
        self.received = bytearray() # what the proxy delivered to it
        self.got_fin = False        # the proxy forwarded a FIN to it
        self.fin_by = None          # how: "shutdown", or "close" (the flow's graceful close)


class HoldBack:
    """The stream function: identity that consumes and outputs random amounts, keeps what it
    consumed but did not output, and flushes it at EOF (PIPES_VF_EOF). It never stalls: a
    full input buffer always loses at least a byte, and at EOF it takes everything."""

    def __init__(self, draw, buffer_size):
        self.draw = draw
        self.buffer_size = buffer_size
        self.held = [bytearray(), bytearray()]
        self.reset_next = False

    def process(self, d, data, eof, out_cap):
        if self.reset_next:
            return fc.PROCESS_RESET, b"", 0
        held = self.held[d]
        if eof:
            take = len(data)
        else:
            take = self.draw(st.integers(int(len(data) == self.buffer_size), len(data)))
        held += data[:take]
        give = min(len(held), out_cap)
        if give and (not eof or take):
            # At EOF too, a call may take input and give nothing yet (as compress does):
            # only a call that takes and gives nothing ends the flush.
            give = self.draw(st.integers(0, give))
        out = bytes(held[:give])
        del held[:give]
        return len(out), out, take


class FlowPlaybook(RuleBasedStateMachine):
    """One flow at a time; when it ends, the next starts (sharing the pipe pool)."""

    def __init__(self):
        super().__init__()
        self.pool = []          # pooled pipes: bytearrays that must be empty
        self.flows = 0

    @initialize(mode=st.sampled_from(["identity", "identity", "inplace", "stream"]),
                data=st.data())
    def start(self, mode, data):
        self.mode_name = mode
        self.data = data
        self.new_flow()

    def new_flow(self):
        draw = self.data.draw
        self.flows += 1
        self.buffer_size = draw(st.sampled_from([1, 4, 16, 64]), label="buffer_size")
        out_size = draw(st.sampled_from([1, 8, 64]), label="out_size")
        self.pipe_cap = draw(st.sampled_from([8, 64]), label="pipe_cap")
        connecting = draw(st.booleans(), label="connecting")
        self.core = fc.FlowCore(MODES[self.mode_name], self.buffer_size, out_size, connecting)
        self.peers = [Peer(), Peer()]
        self.pipes = [None, None]
        self.pipes_fail = draw(st.integers(0, 3), label="pipes_fail") == 0
        self.function = HoldBack(draw, self.buffer_size)
        self.read = [bytearray(), bytearray()]  # what the proxy read from each side
        self.ended = []         # how the flow ended: each end recorded (exactly once)
        self.interrupt = False

    # -- the shell: operations, steps, rounds --------------------------------------------------
    @property
    def live(self):
        return not self.ended

    def perform(self, d, op):
        """Performs op of direction d on the model; returns what core.done needs."""
        src, dst = self.peers[d], self.peers[1 - d]
        if self.interrupt and op.kind in (fc.RECV, fc.SEND, fc.SPLICE_IN, fc.SPLICE_OUT):
            self.interrupt = False
            return (fc.INTR,)
        if op.kind in (fc.RECV, fc.SPLICE_IN, fc.BOUNCE):
            if src.reset:
                return (fc.FAILED,)
            room = op.size
            if op.kind == fc.SPLICE_IN:
                pipe = self.pipes[d]
                assert pipe is not None, "SPLICE_IN without a pipe"
                room = min(room, self.pipe_cap - len(pipe))
            n = min(room, len(src.queue))
            if n == 0:
                return (0,) if src.fin and not src.queue else (fc.AGAIN,)
            chunk = bytes(src.queue[:n])
            del src.queue[:n]
            self.read[d] += chunk
            if op.kind == fc.RECV:
                return (n, chunk)
            self.pipes[d] += chunk
            return (n,)
        if op.kind in (fc.SEND, fc.SPLICE_OUT):
            assert not dst.got_fin, "bytes sent after the FIN"
            if dst.reset:
                return (fc.FAILED,)
            if op.kind == fc.SPLICE_OUT:
                pipe = self.pipes[d]
                assert pipe is not None and len(pipe) == op.size, "the core miscounts the pipe"
                payload = bytes(pipe)
            else:
                payload = self.core.payload(d)
                assert len(payload) == op.size
            n = min(op.size, dst.room)
            if n == 0:
                return (fc.AGAIN,)
            dst.room -= n
            dst.received += payload[:n]
            if op.kind == fc.SPLICE_OUT:
                del self.pipes[d][:n]
            return (n,)
        if op.kind == fc.PROCESS:
            payload = self.core.payload(d)
            if self.mode_name == "inplace":
                assert not op.eof, "an INPLACE function called at EOF"
                return (len(payload), payload.translate(XOR), len(payload))
            assert len(payload) == op.size
            return self.function.process(d, payload, op.eof, op.out_cap)
        if op.kind == fc.GET_PIPE:
            assert self.mode_name == "identity"
            if self.pipes_fail:
                return (fc.FAILED,)
            pipe = self.pool.pop() if self.pool else bytearray()
            assert not pipe, f"a pooled pipe holds {len(pipe)} bytes of another flow"
            self.pipes[d] = pipe
            return (self.pipe_cap,)
        if op.kind == fc.SHUTDOWN:
            if dst.reset:
                return (fc.FAILED,)
            assert not self.core.direction(1 - d)["done"], \
                "a shutdown for the last FIN: the close that follows sends it"
            self.forward_fin(d, "shutdown")
            return (0,)
        raise AssertionError(f"unknown operation {op}")

    def forward_fin(self, d, how):
        """Direction d's FIN reaches its destination (by a shutdown or the close)."""
        src, dst = self.peers[d], self.peers[1 - d]
        # The FIN may only follow everything the source sent, transformed, delivered.
        assert not dst.got_fin, "FIN forwarded twice"
        assert src.fin and not src.queue, "FIN forwarded before the source's FIN was read"
        assert bytes(dst.received) == expected(self.mode_name, bytes(src.sent)), \
            "FIN forwarded before every byte before it was delivered"
        dst.got_fin = True
        dst.fin_by = how

    def close(self):
        """relay.pyx's graceful close (FC_CLOSE): it sends the FIN the core left to it, the
        last one; the other one was a shutdown, when the other direction still went on."""
        last = [d for d in (0, 1) if self.core.direction(d)["fin_at_close"]]
        assert len(last) == 1, f"FINs left to the close: {last} (exactly the last one)"
        self.forward_fin(last[0], "close")
        assert self.peers[last[0]].fin_by == "shutdown", "the first FIN was not a shutdown"

    def step(self, d):
        return drive(self.core, d, lambda op: self.perform(d, op))

    def end(self, how):
        first = self.core.end()
        assert first == (not self.ended), "a flow ended twice (or never began)"
        self.ended.append(how)
        for d in (0, 1):
            if self.pipes[d] is not None and self.core.pipe_reusable(d):
                self.pool.append(self.pipes[d])
            self.pipes[d] = None

    def pump(self):
        """relay.pyx's _pump: rounds until idle, closed or reset."""
        if self.core.state != fc.OPEN:
            return
        stuck, last = 0, None
        while stuck < STUCK_ROUNDS:
            a = self.step(0)
            b = self.step(1) if a >= 0 else 0
            verdict = self.core.round(a, b)
            if verdict == fc.IDLE:
                self.check_not_stalled()
                return
            if verdict == fc.CLOSE:
                self.close()
                self.end("closed")
                return
            if verdict < 0:
                # Only a peer's reset or the function's asking resets a flow here: the
                # model's peers and function never break the contract otherwise.
                assert (verdict == fc.SOCKET_ERROR and any(p.reset for p in self.peers)) or \
                    (verdict == fc.VF_RESET and self.function.reset_next), \
                    (verdict, self.core.why)
                self.last_reason = verdict
                self.end("reset")
                return
            now = self.signature()
            stuck = stuck + 1 if now == last else 0
            last = now
        raise AssertionError("the pump never goes idle, yet nothing changes")

    def signature(self):
        """Everything a round can change: bytes read, held, delivered, each direction's state."""
        return (tuple(len(r) for r in self.read),
                tuple(len(peer.received) for peer in self.peers),
                tuple(len(h) for h in self.function.held),
                tuple(tuple(sorted(self.core.direction(d).items())) for d in (0, 1)))

    def event(self, side, **kind):
        """An epoll event and what the shell does with it (relay.pyx _handle)."""
        if not self.live:
            return
        what = self.core.event(side, **kind)
        if what == fc.EV_CONNECT_FAILED:
            self.end("connect-failed")
        elif what == fc.EV_RESET:
            self.end("reset")
        elif what == fc.EV_PUMP:
            self.pump()
            if self.live and kind.get("error") and self.peers[side].reset:
                self.end("reset")   # SO_ERROR the pump did not meet

    # -- the peers' moves ------------------------------------------------------------------
    @precondition(lambda self: self.live)
    @rule(side=st.sampled_from([0, 1]), size=st.integers(1, 150))
    def peer_sends(self, side, size):
        peer = self.peers[side]
        if peer.fin or peer.reset:
            return
        chunk = self.data.draw(st.binary(min_size=size, max_size=size), label="chunk")
        peer.queue += chunk
        peer.sent += chunk
        self.event(side, readable=True)

    @precondition(lambda self: self.live)
    @rule(side=st.sampled_from([0, 1]))
    def peer_fins(self, side):
        peer = self.peers[side]
        if peer.fin or peer.reset:
            return
        peer.fin = True
        self.event(side, rdhup=True)

    @precondition(lambda self: self.live)
    @rule(side=st.sampled_from([0, 1]), size=st.integers(1, 200))
    def peer_reads(self, side, size):
        peer = self.peers[side]
        if peer.reset:
            return
        peer.room += size
        self.event(side, writable=True)

    @precondition(lambda self: self.live)
    @rule(side=st.sampled_from([0, 1]), rarely=st.integers(0, 3))
    def peer_resets(self, side, rarely):
        if rarely:
            return      # resets end the flow: keep most flows running longer
        self.peers[side].reset = True
        connecting = self.core.state == fc.CONNECTING
        self.event(side, error=True, so_error=104)
        if connecting and side == 1:
            assert self.ended == ["connect-failed"]
        else:
            assert self.ended == ["reset"], "a peer's reset did not reset the flow"

    @precondition(lambda self: self.live and self.core.state == fc.CONNECTING)
    @rule(fails=st.integers(0, 3))
    def connect_completes(self, fails):
        if fails == 0:
            self.event(1, error=True, so_error=111)
            assert self.ended == ["connect-failed"]
        else:
            self.event(1, writable=True)
            assert self.core.state in (fc.OPEN, fc.FREE)

    @precondition(lambda self: self.live and self.mode_name == "stream")
    @rule(rarely=st.integers(0, 3))
    def function_resets(self, rarely):
        if rarely:
            return
        self.function.reset_next = True
        for side in (0, 1):     # give it something to be called on
            peer = self.peers[side]
            if not peer.fin and not peer.reset:
                peer.queue += b"!"
                peer.sent += b"!"
                self.event(side, readable=True)
                break

    @precondition(lambda self: self.live)
    @rule()
    def next_call_is_interrupted(self):
        self.interrupt = True

    @precondition(lambda self: not self.live)
    @rule()
    def next_flow(self):
        self.new_flow()

    # -- invariants ------------------------------------------------------------------------
    @invariant()
    def ends_at_most_once(self):
        assert len(self.ended) <= 1

    @invariant()
    def half_close_is_forwarded_at_once(self):
        """A live flow's finished direction has sent its FIN (shutdown): the peer may wait
        for it before it answers or closes its own side."""
        if not self.live:
            return
        for d in (0, 1):
            x = self.core.direction(d)
            if x["done"]:
                assert not x["fin_at_close"] and self.peers[1 - d].fin_by == "shutdown", \
                    f"direction {d} finished without forwarding its FIN"

    @invariant()
    def bounded_and_accounted(self):
        if not self.live:
            return
        for d in (0, 1):
            x = self.core.direction(d)
            assert x["pending"] <= (x["pipe_cap"] if x["path"] == fc.PATH_PIPE else x["cap"])
            assert x["olen"] <= x["ocap"]
            held = x["pending"] + x["olen"]
            if self.mode_name == "stream":
                held += len(self.function.held[d])
            delivered = len(self.peers[1 - d].received)
            assert len(self.read[d]) == delivered + held, "bytes lost or duplicated"
            if x["path"] == fc.PATH_PIPE:
                assert len(self.pipes[d]) == x["pending"]

    def check_not_stalled(self):
        """An idle flow: nothing it could move now."""
        for d in (0, 1):
            x = self.core.direction(d)
            src, dst = self.peers[d], self.peers[1 - d]
            if x["done"] or src.reset or dst.reset:
                continue
            if dst.room and (x["olen"] or (self.mode_name != "stream" and x["pending"])):
                raise AssertionError(f"stall: direction {d} holds bytes and {dst.room} "
                                     f"bytes of room")
            if src.queue and x["pending"] == 0 and x["olen"] == 0:
                raise AssertionError(f"stall: direction {d} has room and data to read")
            room = x["pending"] == 0 or (self.mode_name == "stream" and x["pending"] < x["cap"])
            if src.fin and not src.queue and not x["eof"] and room:
                raise AssertionError(f"stall: direction {d} did not read the FIN")
            if self.mode_name != "stream" and x["eof"] and x["pending"] == 0:
                raise AssertionError(f"stall: direction {d} did not forward the FIN")

    def teardown(self):
        """Cooperative peers from here: the live flow must deliver everything and close."""
        if not hasattr(self, "core") or not self.live:
            return
        if self.core.state == fc.CONNECTING:
            self.event(1, writable=True)
        idle = 0
        while self.live and idle < 3:
            before = [len(peer.received) for peer in self.peers]
            for side in (0, 1):
                peer = self.peers[side]
                if not peer.fin:
                    peer.fin = True
                    self.event(side, rdhup=True)
                if self.live:
                    peer.room += 256
                    self.event(side, writable=True)
            idle = idle + 1 if [len(peer.received) for peer in self.peers] == before else 0
        if any(peer.reset for peer in self.peers):
            assert self.ended == ["reset"]
            return
        if self.ended == ["reset"] and self.function.reset_next:
            return
        assert self.ended == ["closed"], f"the flow ended {self.ended}, not closed"
        for d in (0, 1):
            assert bytes(self.peers[1 - d].received) == expected(
                self.mode_name, bytes(self.peers[d].sent))
            assert self.peers[1 - d].got_fin


FlowPlaybook.TestCase.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
test_flow_playbook = FlowPlaybook.TestCase


# -- single scenarios, spelled out -------------------------------------------------------------

def drive(core, d, perform):
    """One step of direction d with perform(op) -> done()'s arguments."""
    core.begin(d)
    while (op := core.next(d)) is not None:
        reason = core.done(d, *perform(op))
        if reason:
            return reason
    return int(core.progress(d))


def blocked_destination(ops):
    """A performer whose source gives 5 bytes, then its FIN, and whose destination takes
    nothing (AGAIN); records each op's name in `ops`."""
    def perform(op):
        ops.append(op.name)
        if op.kind == fc.RECV:
            return (5, b"hello") if ops.count("RECV") == 1 else (0,)
        if op.kind == fc.SEND:
            return (fc.AGAIN,)
        raise AssertionError(op)
    return perform


def test_fin_waits_for_the_buffered_bytes():
    """Identity: the source's FIN arrives with bytes still buffered (the destination is
    full): no SHUTDOWN until they are sent."""
    core = fc.FlowCore(fc.IDENTITY, 16)
    ops = []
    blocked_dst = blocked_destination(ops)
    core.event(0, rdhup=True)
    while drive(core, 0, blocked_dst) == 1:
        pass
    assert "SHUTDOWN" not in ops and core.direction(0)["eof"]
    core.event(1, writable=True)
    assert drive(core, 0, lambda op: (op.size,) if op.kind == fc.SEND else (0,)) == 1
    assert core.direction(0)["done"]


def test_only_the_last_fin_is_left_to_the_close_and_only_after_the_buffered_bytes():
    """Identity. The server's FIN goes to the client at once with a shutdown (a half-close:
    the client still sends). The client's FIN then arrives with bytes it sent still
    buffered (the server side is full): nothing until they are sent; then the direction
    finishes without a SHUTDOWN and the round says CLOSE, whose close() sends that FIN."""
    core = fc.FlowCore(fc.IDENTITY, 16)
    ops = []

    def perform(op):
        ops.append(op.name)
        if op.kind == fc.RECV:
            return (0,)
        if op.kind == fc.SHUTDOWN:
            return (0,)
        raise AssertionError(op)
    core.event(1, rdhup=True)
    assert drive(core, 1, perform) == 1
    assert ops == ["RECV", "SHUTDOWN"] and core.direction(1)["done"]
    assert not core.direction(1)["fin_at_close"]
    assert core.round(0, 1) == fc.AGAIN_ROUND

    ops.clear()
    blocked_dst = blocked_destination(ops)
    core.event(0, rdhup=True)
    while drive(core, 0, blocked_dst) == 1:
        pass
    assert "SHUTDOWN" not in ops and core.direction(0)["eof"]
    assert not core.direction(0)["done"] and core.round(0, 0) == fc.IDLE

    ops.clear()
    core.event(1, writable=True)
    assert drive(core, 0, lambda op: ops.append(op.name) or (op.size,)) == 1
    assert ops == ["SEND"]
    assert core.direction(0)["done"] and core.direction(0)["fin_at_close"]
    assert core.round(1, 0) == fc.CLOSE


def test_stream_fin_waits_for_the_eof_flush():
    core = fc.FlowCore(fc.STREAM, 8, 8)
    calls = []

    def perform(op):
        if op.kind == fc.RECV:
            return (0,)
        if op.kind == fc.PROCESS:
            calls.append(op.eof)
            out = b"tail" if len(calls) == 1 else b""
            return (len(out), out, 0)
        if op.kind == fc.SEND:
            assert core.payload(0) == b"tail"
            return (op.size,)
        assert op.kind == fc.SHUTDOWN and calls == [True, True]
        return (0,)
    while not core.direction(0)["done"]:
        assert drive(core, 0, perform) == 1


def bulk_reads(core, answer, rounds=6):
    """Direction 0 made readable `rounds` times by a bulk sender: every other RECV fills the
    16-byte buffer, the next finds the socket empty. answer(op) answers the other
    operations. Returns the names of every operation asked for, in order."""
    seen = []

    def perform(op):
        seen.append(op.name)
        if op.kind == fc.RECV:
            return (16, b"x" * 16) if seen.count("RECV") % 2 else (fc.AGAIN,)
        return answer(op)
    for _ in range(rounds):
        core.event(0, readable=True)
        drive(core, 0, perform)
    return seen


def test_identity_moves_to_splice_only_with_an_empty_buffer():
    core = fc.FlowCore(fc.IDENTITY, 16)

    def answer(op):
        if op.kind == fc.SEND:
            return (op.size,)
        if op.kind == fc.GET_PIPE:
            assert core.direction(0)["pending"] == 0
            return (64,)
        if op.kind == fc.SPLICE_IN:
            return (fc.AGAIN,)
        raise AssertionError(op)
    seen = bulk_reads(core, answer)
    assert "GET_PIPE" in seen and core.direction(0)["path"] == fc.PATH_PIPE


def test_no_pipe_keeps_both_directions_on_the_buffer_path():
    core = fc.FlowCore(fc.IDENTITY, 16)

    def answer(op):
        if op.kind == fc.SEND:
            return (op.size,)
        if op.kind == fc.GET_PIPE:
            return (fc.FAILED,)
        raise AssertionError(op)
    bulk_reads(core, answer)
    assert not core.use_pipes and core.direction(0)["path"] == fc.PATH_BUFFER
    # Direction 1 then never asks for a pipe either.
    seen = []

    def perform(op):
        seen.append(op.name)
        if op.kind == fc.RECV:
            return (16, b"x" * 16) if seen.count("RECV") % 2 else (fc.AGAIN,)
        return answer(op)
    for _ in range(6):
        core.event(1, readable=True)
        drive(core, 1, perform)
    assert "GET_PIPE" not in seen and core.direction(1)["path"] == fc.PATH_BUFFER


def test_a_reset_flows_dirty_pipe_is_not_reusable():
    core = fc.FlowCore(fc.IDENTITY, 16)
    bulk_reads(core, lambda op: {fc.SEND: (16,), fc.GET_PIPE: (64,),
                                 fc.SPLICE_IN: (min(40, op.size),),
                                 fc.SPLICE_OUT: (fc.AGAIN,)}[op.kind])
    assert core.direction(0)["path"] == fc.PATH_PIPE
    assert 0 < core.direction(0)["pending"] <= 64
    assert not core.pipe_reusable(0)
    assert core.end() and not core.end()


def test_a_drained_pipe_is_reusable():
    core = fc.FlowCore(fc.IDENTITY, 16)
    bulk_reads(core, lambda op: {fc.SEND: (16,), fc.GET_PIPE: (64,),
                                 fc.SPLICE_IN: (min(40, op.size),),
                                 fc.SPLICE_OUT: (op.size,)}[op.kind])
    assert core.direction(0)["path"] == fc.PATH_PIPE and not core.pipe_reusable(0)
    # The destination takes what the pipe still holds; the source has nothing more.
    core.event(1, writable=True)
    drive(core, 0, lambda op: {fc.SPLICE_IN: (fc.AGAIN,), fc.RECV: (fc.AGAIN,),
                               fc.SPLICE_OUT: (op.size,)}[op.kind])
    assert core.direction(0)["pending"] == 0 and core.pipe_reusable(0)


@pytest.mark.parametrize("outcome, expected, why", [
    ((fc.PROCESS_RESET, b"", 0), fc.VF_RESET, "reset the flow"),
    ((fc.PROCESS_ERROR, b"", 0), fc.VF_ERROR, "PIPES_VF_ERROR"),
    ((9, b"123456789", 0), fc.VF_ERROR, "out of range"),
])
def test_function_results_that_reset_the_flow(outcome, expected, why):
    core = fc.FlowCore(fc.STREAM, 8, 8)

    def perform(op):
        return (3, b"abc") if op.kind == fc.RECV else outcome
    reason = drive(core, 0, perform)
    assert reason in (fc.VF_RESET, fc.VF_ERROR) and why in core.why
    assert reason == expected  # the relay counts vf_resets / vf_errors from it
    assert core.round(reason, 0) == reason


def test_connecting_flow_waits_for_the_server():
    core = fc.FlowCore(fc.IDENTITY, 16, connecting=True)
    assert core.event(0, readable=True) == fc.EV_NOTHING    # read once connected
    assert core.event(1, writable=True, so_error=111) == fc.EV_CONNECT_FAILED
    core = fc.FlowCore(fc.IDENTITY, 16, connecting=True)
    assert core.event(0, error=True) == fc.EV_RESET          # the client gave up
    core = fc.FlowCore(fc.IDENTITY, 16, connecting=True)
    assert core.event(1, writable=True) == fc.EV_PUMP and core.state == fc.OPEN
