"""chaos-py (id 0x7f00): a TEST function that forwards bytes unchanged in random pieces.

Each process call consumes a random part of what it is offered and outputs exactly the bytes
it consumed, so the relay holds the rest and offers it again followed by newer bytes: the
output must equal the input whatever the pieces. It shakes out offset bugs in the relay's
input buffer (partial consumption, the move to the front, EOF with leftovers). The pieces
come from a random.Random seeded from the flow's ports, the parameters and the direction, so
a failing flow replays the same way.

It always makes progress: given bytes it consumes at least one, unless parameter bit 0x1
("starve") is set. Then it sometimes consumes nothing, never twice in a row, never at EOF,
and never when offered STARVE_BELOW bytes or more (the relay resets a function that stalls
on a full input buffer; its buffer is 64 KiB, a harness's must exceed STARVE_BELOW). The
relay takes such a call as "waiting for more input" and calls again only when new bytes
arrive (or EOF), so use starve only on flows whose sender keeps sending (bulk uploads): a
request/response exchange would wait forever on a request it sat on.

    pipesctl load tests/modules/chaos.py
"""
from __future__ import annotations

import random

from srv6pipes.vfapi import FlowInfo, Function

CHAOS_ID = 0x7F00
STARVE = 0x1
STARVE_BELOW = 1024

_stats = {"flows": 0, "calls": 0, "bytes": 0, "partial": 0, "starved": 0}


class _Chaos:
    __slots__ = ("rng", "starve", "starved_last")

    def __init__(self, params: int, flow: FlowInfo):
        seed = f"chaos-py/{flow.client_port}/{flow.server_port}/{params}"
        self.rng = [random.Random(f"{seed}/up"), random.Random(f"{seed}/down")]
        self.starve = bool(params & STARVE)
        self.starved_last = [False, False]


def spawn(params: int, flow: FlowInfo) -> _Chaos:
    _stats["flows"] += 1
    return _Chaos(params, flow)


def process(ctx: _Chaos, direction: int, data: bytes, eof: bool):
    if not data:
        return 0, b""
    rng = ctx.rng[direction]
    _stats["calls"] += 1
    if ctx.starve and not eof and not ctx.starved_last[direction] \
            and len(data) < STARVE_BELOW and rng.random() < 0.25:
        ctx.starved_last[direction] = True
        _stats["starved"] += 1
        return 0, b""
    ctx.starved_last[direction] = False
    roll = rng.random()
    if roll < 0.25:
        n = len(data)                                   # all of it
    elif roll < 0.5:
        n = rng.randint(1, min(len(data), 7))           # a few bytes
    else:
        n = rng.randint(1, len(data))                   # anything
    if n < len(data):
        _stats["partial"] += 1
    _stats["bytes"] += n
    return n, data[:n]


def stats() -> dict:
    return dict(_stats)


FUNCTIONS = [Function(id=CHAOS_ID, name="chaos-py", spawn=spawn, process=process,
                      description="TEST: forwards unchanged, consuming random partial lengths")]
