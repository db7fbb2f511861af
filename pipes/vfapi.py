"""The Python interface of virtual functions (VFs): what a Python module declares.

A VF module is a Python file that pipesd loads at run time (`pipesctl load PATH.py`) into
every worker. It declares its functions in a module-level list `FUNCTIONS`:

    from srv6pipes.vfapi import Function, ResetFlow

    def spawn(params, flow):            # once per flow: returns the flow's context
        return {"seen": 0}

    def process(ctx, direction, data, eof):
        ctx["seen"] += len(data)        # direction: UP (client -> server) or DOWN
        return data.upper()             # bytes out (all of data consumed), or
                                        # (consumed, bytes out) to keep the rest for later

    FUNCTIONS = [Function(id=0x200, name="upper", spawn=spawn, process=process)]

Callbacks by lifetime:
  module `init()` / `deinit()`   optional functions of the module, run once in every worker
                                 process when the module is loaded / unloaded there;
  module `stats()`               optional, returns a JSON-able dict shown per worker by
                                 `pipesctl stats`;
  Function.spawn(params, flow)   per flow, with the address's parameter bits and a FlowInfo;
  Function.process(ctx, direction, data, eof)
                                 per chunk of one direction; `eof=True` once the source has
                                 sent its FIN (data may be empty): flush what you hold. If a
                                 call with eof=True leaves bytes unconsumed it is called again
                                 with them;
  Function.despawn(ctx)          per flow, when both connections are closed (also on reset).

Raising ResetFlow in spawn or process resets the flow (counted as vf_resets: a decision,
e.g. a DPI block); any other exception resets it too and is counted as vf_errors and logged.
Either way only that flow is affected.

Python functions pay for a Python call and a bytes object per chunk; the built-in functions
and C modules (cext/srv6pipes_vf.h) do not.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import operator
from typing import Any, Callable

UP = 0     # client -> server
DOWN = 1   # server -> client


class ResetFlow(Exception):
    """Raised by a function to reset its flow on purpose (both sides get an RST)."""


@dataclasses.dataclass(frozen=True)
class FlowInfo:
    """What a function may know about its flow, given to spawn()."""

    client: str
    client_port: int
    server: str
    server_port: int
    function_address: str
    params: int

    @classmethod
    def from_wire(cls, client: bytes, client_port: int, server: bytes, server_port: int,
                  function_address: bytes, params: int) -> "FlowInfo":
        text = lambda packed: str(ipaddress.IPv6Address(packed))  # noqa: E731
        return cls(text(client), client_port, text(server), server_port,
                   text(function_address), params)


def _no_context(params: int, flow: FlowInfo) -> Any:
    return None


def _nothing(ctx: Any) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Function:
    """One function a Python module offers. id = the function bits of its addresses."""

    id: int
    name: str
    process: Callable[[Any, int, bytes, bool], Any]
    spawn: Callable[[int, FlowInfo], Any] = _no_context
    despawn: Callable[[Any], None] = _nothing
    description: str = ""

    def __post_init__(self):
        # The C ABI and the address plan carry function ids in 32 bits.
        if type(self.id) is not int or not 0 <= self.id <= 0xFFFFFFFF:
            raise ValueError(f"function id must be an int in 0..2**32-1, not {self.id!r}")
        if not isinstance(self.name, str) or not self.name or not self.name.isprintable() \
                or " " in self.name:
            raise ValueError(f"function name must be a non-empty word, not {self.name!r}")
        for callback in ("process", "spawn", "despawn"):
            if not callable(getattr(self, callback)):
                raise ValueError(f"function {self.name!r}: {callback} is not callable")


class FlowAdapter:
    """Runs one flow of a Python function behind the relay's C streaming contract.

    The relay calls `step()` with the bytes it holds for a direction and how much output room
    it has; step returns (consumed, output) with len(output) <= out_cap. Output beyond out_cap
    is kept here and handed out on the next calls (bounded per call, as the C ABI requires).
    Pure logic: unit tested without a network.
    """

    __slots__ = ("function", "ctx", "pending", "finished", "closed")

    def __init__(self, function: Function, params: int, flow: FlowInfo):
        self.function = function
        self.ctx = function.spawn(params, flow)
        # Output not handed out yet, per direction. A memoryview so that handing out a large
        # output in out_cap pieces costs one copy per piece, not a copy of the rest each time.
        self.pending = [memoryview(b""), memoryview(b"")]
        self.finished = [False, False]   # process saw eof=True and consumed everything
        self.closed = False

    def step(self, direction: int, data: bytes, eof: bool, out_cap: int) -> tuple[int, bytes]:
        """One call of the C process(): returns (consumed, output), output a bytes object of
        at most out_cap bytes. Raises what process raises, ValueError or TypeError if process
        broke the contract (the relay resets the flow either way)."""
        pending = self.pending[direction]
        if pending:
            self.pending[direction] = pending[out_cap:]
            return 0, bytes(pending[:out_cap])
        if self.finished[direction] or (not data and not eof):
            return 0, b""
        result = self.function.process(self.ctx, direction, data, eof)
        if isinstance(result, tuple):
            consumed, output = result
            # The relay stores consumed into a size_t: it must be a real int.
            consumed = operator.index(consumed)
            if not 0 <= consumed <= len(data):
                raise ValueError(f"{self.function.name}: consumed {consumed} of {len(data)} bytes")
        else:
            consumed, output = len(data), result
        if output is None:
            output = b""
        elif type(output) is not bytes:
            if not isinstance(output, (bytes, bytearray, memoryview)):
                # bytes(5) would be five zero bytes, not an error.
                raise TypeError(f"{self.function.name}: process returned "
                                f"{type(output).__name__}, not bytes")
            output = bytes(output)   # a snapshot: the function may reuse its buffer
        if eof and consumed == len(data):
            self.finished[direction] = True
        if len(output) <= out_cap:
            return consumed, output
        self.pending[direction] = memoryview(output)[out_cap:]
        return consumed, output[:out_cap]

    def close(self) -> None:
        """Despawns the flow's context, once (later calls do nothing)."""
        if not self.closed:
            self.closed = True
            self.function.despawn(self.ctx)


HEADER = "srv6pipes_vf.h"


def include_dir() -> str:
    """The folder holding the C module header (srv6pipes_vf.h): inside the installed
    package (setup.py copies it to srv6pipes/include/), else the source tree's cext/.
    `pipesctl module-cflags` prints it as -I for a module author's compiler."""
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.join(here, "include"), os.path.join(os.path.dirname(here), "cext")):
        if os.path.isfile(os.path.join(folder, HEADER)):
            return folder
    raise FileNotFoundError(f"{HEADER} is not installed with srv6pipes ({here})")
