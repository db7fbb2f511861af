"""Drives Python VFs (vfapi.FlowAdapter) the way the relay's stream path does, without sockets.

Mirrors `_step_stream` in cext/relay.pyx, per direction:
  - an input buffer of `in_cap` bytes holds what the function has not consumed yet; reads
    append at most the room left (an arrival larger than the room is read in pieces);
  - the function is called once its previous output is written (here: at once) when the
    source reached EOF, or its last output filled `out_cap` ("more", call again even with
    no new input), or there is input and the last call did not starve;
  - a call that consumes nothing and outputs nothing: at EOF with input left, or with a full
    input buffer, is a broken contract (vf_errors, the relay resets); at EOF with no input
    it ends the direction (the FIN is forwarded); otherwise the direction is "starved" and
    waits for new input;
  - after EOF the function is called with eof=True until such a call ends the direction.
ResetFlow and other exceptions from the function propagate unchanged; a broken contract
raises ContractError.

    out = run_direction(adapter, UP, [b"he", b"llo"], in_cap=8, out_cap=3)
    up, down = run_flow(function, params, flow, up_chunks, down_chunks)
"""
from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from typing import NamedTuple

from srv6pipes.vfapi import DOWN, UP, FlowAdapter, FlowInfo, Function

MODULES = Path(__file__).resolve().parents[1] / "modules"


class ContractError(AssertionError):
    """The function broke the streaming contract: the relay would reset the flow."""


class Call(NamedTuple):
    """One process call as the relay saw it."""

    offered: int        # bytes in the input buffer
    eof: bool
    consumed: int
    produced: int


class DirectionPump:
    """One direction of one flow through the relay's stream path. `source` is the list of
    arrivals (what each recv would find); tick() does one relay step."""

    def __init__(self, adapter: FlowAdapter, direction: int, source, *, in_cap: int,
                 out_cap: int):
        if in_cap < 1 or out_cap < 1:
            raise ValueError("in_cap and out_cap must be positive")
        self.adapter = adapter
        self.direction = direction
        self.source = [bytes(chunk) for chunk in source if chunk]
        self.in_cap = in_cap
        self.out_cap = out_cap
        self.inbuf = bytearray()
        self.output = bytearray()
        self.calls: list[Call] = []
        self.eof = False
        self.more = False
        self.starved = False
        self.done = False       # the FIN would be forwarded

    def tick(self) -> bool:
        """One step: read once (or see EOF), then call the function if the relay would.
        Returns whether anything progressed."""
        if self.done:
            return False
        progress = False
        if not self.eof:
            room = self.in_cap - len(self.inbuf)
            if not self.source:
                self.eof = True
                progress = True
            elif room:
                head = self.source[0]
                self.inbuf += head[:room]
                if len(head) > room:
                    self.source[0] = head[room:]
                else:
                    del self.source[0]
                self.starved = False
                progress = True
        if self.eof or self.more or (self.inbuf and not self.starved):
            progress |= self._call()
        return progress

    def _call(self) -> bool:
        offered = len(self.inbuf)
        consumed, out = self.adapter.step(self.direction, bytes(self.inbuf), self.eof,
                                          self.out_cap)
        if type(out) is not bytes or type(consumed) is not int:
            raise ContractError(f"step returned ({type(consumed).__name__}, "
                                f"{type(out).__name__}), not (int, bytes)")
        if not 0 <= consumed <= offered or len(out) > self.out_cap:
            raise ContractError(f"step consumed {consumed} of {offered} bytes and produced "
                                f"{len(out)} with out_cap {self.out_cap}")
        self.calls.append(Call(offered, self.eof, consumed, len(out)))
        del self.inbuf[:consumed]
        self.output += out
        self.more = len(out) == self.out_cap
        if out or consumed:
            return True
        if self.eof:
            if self.inbuf:
                raise ContractError(f"at EOF the function will not take the last "
                                    f"{len(self.inbuf)} bytes")
            self.done = True
            return True
        if len(self.inbuf) == self.in_cap:
            raise ContractError(f"the function stalls on a full input buffer ({self.in_cap})")
        self.starved = True
        return False


def run_direction(adapter: FlowAdapter, direction: int, source, *, in_cap: int = 65536,
                  out_cap: int = 65536) -> bytes:
    """Pumps one direction to its end; returns everything the function output."""
    pump = DirectionPump(adapter, direction, source, in_cap=in_cap, out_cap=out_cap)
    pump_to_end([pump])
    return bytes(pump.output)


def pump_to_end(pumps, rng: random.Random | None = None) -> None:
    """Ticks the pumps (in a random interleaving with rng) until all are done."""
    idle = 0
    while not all(p.done for p in pumps):
        live = [p for p in pumps if not p.done]
        order = rng.sample(live, len(live)) if rng else live
        progress = False
        for pump in order:
            progress |= pump.tick()
        idle = 0 if progress else idle + 1
        if idle > 2:   # cannot happen with a correct harness: every idle tick reaches EOF
            raise ContractError("no progress")


def make_flow(client: str = "2001:db8:1::10", client_port: int = 40000,
              server: str = "2001:db8:2::20", server_port: int = 80,
              function_address: str = "fc00:1::5:0:1", params: int = 1) -> FlowInfo:
    return FlowInfo(client, client_port, server, server_port, function_address, params)


def run_flow(function: Function, params: int, flow: FlowInfo, up_source, down_source, *,
             in_cap: int = 65536, out_cap: int = 65536,
             rng: random.Random | None = None) -> tuple[bytes, bytes]:
    """Spawns one flow, pumps both directions to their ends (interleaved by rng), despawns.
    Returns (up output, down output)."""
    adapter = FlowAdapter(function, params, flow)
    try:
        pumps = [DirectionPump(adapter, UP, up_source, in_cap=in_cap, out_cap=out_cap),
                 DirectionPump(adapter, DOWN, down_source, in_cap=in_cap, out_cap=out_cap)]
        pump_to_end(pumps, rng)
    finally:
        adapter.close()
    return bytes(pumps[0].output), bytes(pumps[1].output)


def chunked(data: bytes, sizes) -> list[bytes]:
    """Cuts data into arrivals of the given sizes (cycled; the last takes the rest)."""
    sizes = [max(1, s) for s in sizes] or [len(data) or 1]
    out, at, i = [], 0, 0
    while at < len(data):
        out.append(data[at:at + sizes[i % len(sizes)]])
        at += sizes[i % len(sizes)]
        i += 1
    return out


def load_module(path: str | Path, name: str | None = None):
    """Imports a VF module from a file, as pipesctl load would (a fresh module object)."""
    path = Path(path)
    name = name or f"vfmodule_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def function_by_name(module, name: str) -> Function:
    return next(f for f in module.FUNCTIONS if f.name == name)


def text_like(size, seed=7):
    """Words and punctuation: compresses about 3:1, like HTML or JSON."""
    rng = random.Random(seed)
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9)))
             for _ in range(2000)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + rng.choice([b" ", b" ", b", ", b".\n", b"\": \""])
    return bytes(out[:size])
