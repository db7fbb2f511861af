"""Drives Python VFs (vfapi.FlowAdapter) through the relay's own flow core, without sockets.

A DirectionPump plays the relay's shell around srv6pipes._flowcore (the same C state
machine the relay inlines, cext/flowcore.h) on the stream path of one direction: the
source is a list of arrivals (what each recv would find; every tick a new one may have
come), the destination takes everything at once, and PROCESS calls the adapter's step as
the relay's trampoline does. What is called when, with how much room, and when the FIN would
go is the core's decision, not this file's.

ResetFlow and other exceptions from the function propagate unchanged; a broken contract
(the core resets the flow: stall on a full input buffer, input left at EOF, bad results)
raises ContractError with the core's reason.

    out = run_direction(adapter, UP, [b"he", b"llo"], in_cap=8, out_cap=3)
    up, down = run_flow(function, params, flow, up_chunks, down_chunks)
"""
from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from typing import NamedTuple

from srv6pipes import _flowcore as fc
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
    arrivals (what each recv would find); tick() does one step of the flow core."""

    def __init__(self, adapter: FlowAdapter, direction: int, source, *, in_cap: int,
                 out_cap: int):
        if in_cap < 1 or out_cap < 1:
            raise ValueError("in_cap and out_cap must be positive")
        self.adapter = adapter
        self.direction = direction
        self.source = [bytes(chunk) for chunk in source if chunk]
        self.in_cap = in_cap
        self.out_cap = out_cap
        self.core = fc.FlowCore(fc.STREAM, in_cap, out_cap)
        self.output = bytearray()
        self.calls: list[Call] = []

    @property
    def done(self) -> bool:
        """The FIN would be forwarded."""
        return self.core.direction(self.direction)["done"]

    def tick(self) -> bool:
        """One step of the core (an arrival may have come: the source is readable).
        Returns whether anything progressed."""
        d, core = self.direction, self.core
        core.event(d, readable=True)
        core.event(1 - d, writable=True)
        core.begin(d)
        while (op := core.next(d)) is not None:
            if op.kind == fc.RECV:
                if self.source:
                    head = self.source[0]
                    data, rest = head[:op.size], head[op.size:]
                    if rest:
                        self.source[0] = rest
                    else:
                        del self.source[0]
                    reason = core.done(d, len(data), data)
                else:
                    reason = core.done(d, 0)      # EOF
            elif op.kind == fc.SEND:
                self.output += core.payload(d)
                reason = core.done(d, op.size)
            elif op.kind == fc.PROCESS:
                reason = self._call(op)
            elif op.kind == fc.SHUTDOWN:
                reason = core.done(d, 0)
            else:
                raise AssertionError(f"the stream path asked for {op.name}")
            if reason:
                raise ContractError(core.why)
        return core.progress(d)

    def _call(self, op) -> int:
        d = self.direction
        offered = self.core.payload(d)
        consumed, out = self.adapter.step(d, offered, op.eof, op.out_cap)
        if type(out) is not bytes or type(consumed) is not int:
            raise ContractError(f"step returned ({type(consumed).__name__}, "
                                f"{type(out).__name__}), not (int, bytes)")
        if not 0 <= consumed <= len(offered) or len(out) > op.out_cap:
            raise ContractError(f"step consumed {consumed} of {len(offered)} bytes and "
                                f"produced {len(out)} with out_cap {op.out_cap}")
        self.calls.append(Call(len(offered), op.eof, consumed, len(out)))
        return self.core.done(d, len(out), out, consumed)


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
