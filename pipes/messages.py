"""Every message pipesd's processes exchange, declared once and validated strictly.

Two conversations use them:

* pipesctl -> master (the control socket, control.py): one JSON object per line, e.g.
  ``{"cmd": "load", "path": "/etc/pipes/mod.so"}``; the reply is one JSON object per line,
  ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.
* master -> worker (a SOCK_SEQPACKET socketpair per worker, workerrpc.py): one JSON object
  per message, with an ``id`` the worker echoes in its reply so that a late reply can never
  be taken for the answer to a later request.

A request is a frozen dataclass; its fields are the message's fields, each with a type and
a bound (`bounded`). `parse` turns untrusted bytes into one of them or raises
`MessageError` naming what is wrong (unknown command, missing or unknown field, wrong type,
too long): nothing a peer sends reaches a handler unchecked.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, Mapping

MAX_MESSAGE = 64 * 1024       # bytes of one request (line or datagram)
MAX_TEXT = 4096               # characters of a text field (a path: PATH_MAX)
MAX_ID = (1 << 53) - 1        # request ids stay exact in JSON numbers
MAX_SLOTS = 256               # entries of a module's {function name: stats slot} map


class MessageError(ValueError):
    """The bytes are not a valid message; the text says why (it goes back to the peer)."""


def bounded(low: int = 0, high: int = MAX_TEXT) -> dict:
    """Field metadata: the range of an int, or the length range of a text."""
    return {"low": low, "high": high}


@dataclasses.dataclass(frozen=True)
class Message:
    """Base of every request. `id` is optional on the control socket, required to workers."""

    command: ClassVar[str] = ""
    id: int = dataclasses.field(default=0, metadata=bounded(0, MAX_ID))


# -- pipesctl -> master -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Ping(Message):
    command: ClassVar[str] = "ping"


@dataclasses.dataclass(frozen=True)
class Stats(Message):
    command: ClassVar[str] = "stats"


@dataclasses.dataclass(frozen=True)
class Functions(Message):
    command: ClassVar[str] = "functions"


@dataclasses.dataclass(frozen=True)
class Load(Message):
    command: ClassVar[str] = "load"
    path: str = dataclasses.field(default="", metadata=bounded(1, MAX_TEXT))


@dataclasses.dataclass(frozen=True)
class Unload(Message):
    command: ClassVar[str] = "unload"
    module: str = dataclasses.field(default="", metadata=bounded(1, 255))


@dataclasses.dataclass(frozen=True)
class Reload(Message):
    command: ClassVar[str] = "reload"


CONTROL_REQUESTS = (Ping, Stats, Functions, Load, Unload, Reload)


# -- master -> worker ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LoadModule(Message):
    """Load the module file at path (the master's checked private copy) into these slots."""

    command: ClassVar[str] = "load"
    path: str = dataclasses.field(default="", metadata=bounded(1, MAX_TEXT))
    slots: Mapping[str, int] = dataclasses.field(default_factory=dict,
                                                 metadata=bounded(0, MAX_SLOTS))


@dataclasses.dataclass(frozen=True)
class UnloadModule(Message):
    command: ClassVar[str] = "unload"
    module: str = dataclasses.field(default="", metadata=bounded(1, 255))


@dataclasses.dataclass(frozen=True)
class ListModules(Message):
    command: ClassVar[str] = "modules"


@dataclasses.dataclass(frozen=True)
class ModuleStats(Message):
    command: ClassVar[str] = "module_stats"


WORKER_REQUESTS = (LoadModule, UnloadModule, ListModules, ModuleStats)


def _check_field(name: str, kind: Any, meta: Mapping, value: Any) -> Any:
    low, high = meta.get("low", 0), meta.get("high", MAX_TEXT)
    if kind in (int, "int"):
        # bool is an int in Python, never in our messages.
        if type(value) is not int or not low <= value <= high:
            raise MessageError(f"field {name!r} must be an integer in [{low}, {high}]")
        return value
    if kind in (str, "str"):
        if type(value) is not str or not low <= len(value) <= high or "\0" in value:
            raise MessageError(f"field {name!r} must be a text of {low}-{high} characters "
                               "without NUL")
        return value
    # Mapping[str, int]: a module's function slots.
    if type(value) is not dict or not low <= len(value) <= high:
        raise MessageError(f"field {name!r} must be an object of at most {high} entries")
    for key, slot in value.items():
        _check_field(f"{name}.{key}", str, bounded(1, 255), key)
        _check_field(f"{name}.{key}", int, bounded(0, MAX_SLOTS - 1), slot)
    return dict(value)


def parse(data: bytes, kinds: tuple[type[Message], ...], need_id: bool = False) -> Message:
    """One request from untrusted bytes: a JSON object whose "cmd" names one of kinds, with
    exactly that kind's fields. Raises MessageError with a reason fit for the peer."""
    if len(data) > MAX_MESSAGE:
        raise MessageError(f"request longer than {MAX_MESSAGE} bytes")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:   # UnicodeDecodeError is a ValueError
        raise MessageError(f"not JSON: {str(exc)[:80]}") from None
    if not isinstance(obj, dict):
        raise MessageError("a request is a JSON object with a \"cmd\"")
    command = obj.get("cmd")
    by_name = {kind.command: kind for kind in kinds}
    if type(command) is not str or command not in by_name:
        shown = repr(command)[:40] if type(command) is str else type(command).__name__
        raise MessageError(f"unknown command {shown}; known: {', '.join(sorted(by_name))}")
    kind = by_name[command]
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = set(obj) - set(fields) - {"cmd"}
    if unknown:
        names = ", ".join(sorted(repr(name)[:40] for name in unknown)[:5])
        raise MessageError(f"{command}: unknown field(s) {names}")
    if need_id and "id" not in obj:
        raise MessageError(f"{command}: missing field 'id'")
    values = {}
    for name, field in fields.items():
        if name not in obj:
            if name != "id":
                raise MessageError(f"{command}: missing field {name!r}")
            continue
        values[name] = _check_field(name, field.type, field.metadata, obj[name])
    return kind(**values)


def encode(message: Message) -> bytes:
    """The JSON form of a request (what `parse` reads back)."""
    body = {"cmd": message.command}
    body.update(dataclasses.asdict(message))
    return json.dumps(body, separators=(",", ":")).encode()


def reply_ok(**fields) -> dict:
    return {"ok": True, **fields}


def reply_error(error: str, **fields) -> dict:
    return {"ok": False, "error": error, **fields}
