"""Function lookup: which virtual function (VF) a function address selects.

Called by a worker once per accepted connection, after the SRH lookup: the function bits of
this proxy's segment pick a `Function`, which tells the relay loop how to run the flow:

  splice   identity: no function code at all; recv/send for small exchanges, zero copy
           through splice() once a direction is bulk (cext/relay.pyx, splice-auto);
  c        a C `pipes_func_desc` (built in, cext/vf_builtin.h, or from a loaded C module),
           called by the relay through its address with no Python per chunk;
  python   a vfapi.Function, run by the relay through a C trampoline.

Each function owns a stats slot so the relay loop counts bytes per function without any
Python object on its hot path. Slots are never handed to another function while pipesd runs
(counters are cumulative); a function loaded again gets its old slot back.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Optional

from . import vfapi

# Stats slots per worker; slot 0 is reserved for flows that never got a function.
MAX_FUNCTION_SLOTS = 256
UNASSIGNED_SLOT = 0
BUILTIN_MODULE = "builtin"

KIND_SPLICE = "splice"
KIND_C = "c"
KIND_PYTHON = "python"


class UnknownFunction(LookupError):
    """The function bits name no loaded function; the worker resets the connection."""


class FunctionConflict(ValueError):
    """A function id, name or slot is taken: the load is refused."""


@dataclasses.dataclass(frozen=True)
class Function:
    function_id: int
    name: str
    kind: str
    module: str = BUILTIN_MODULE
    description: str = ""
    address: int = 0                          # kind c: the descriptor's address
    python: Optional[vfapi.Function] = None   # kind python
    slot: int = UNASSIGNED_SLOT

    def describe(self) -> dict:
        return {"id": self.function_id, "name": self.name, "module": self.module,
                "kind": self.kind, "description": self.description}


def builtin_functions() -> list[Function]:
    """identity, the C built-ins (srv6pipes._vf) and the Python built-ins (vf_crypto)."""
    from . import _vf, vf_crypto

    functions = [Function(0, "identity", KIND_SPLICE,
                          description="forwards the bytestream unchanged, zero copy (splice) in bulk")]
    functions += [Function(d["id"], d["name"], KIND_C, description=d["description"] or "",
                           address=d["address"]) for d in _vf.BUILTIN_FUNCTIONS]
    functions += [Function(f.id, f.name, KIND_PYTHON, description=f.description, python=f)
                  for f in vf_crypto.FUNCTIONS]
    return functions


class FunctionRegistry:
    """Functions by id and by name, and the stats slot each id/name pair was given."""

    def __init__(self, functions: Optional[Iterable[Function]] = None):
        self._by_id: dict[int, Function] = {}
        self._by_name: dict[str, Function] = {}
        self._slots: dict[tuple[int, str], int] = {}
        for function in builtin_functions() if functions is None else functions:
            self.register(function)

    def slot_for(self, function_id: int, name: str) -> int:
        """The slot of (id, name): the one it had before, else the next unused one."""
        key = (function_id, name)
        if key not in self._slots:
            slot = len(self._slots) + 1
            if slot >= MAX_FUNCTION_SLOTS:
                raise FunctionConflict(f"no stats slot left for {name!r}: at most "
                                       f"{MAX_FUNCTION_SLOTS - 1} distinct functions per run")
            self._slots[key] = slot
        return self._slots[key]

    def check_free(self, functions: Iterable[Function]) -> None:
        """Raises FunctionConflict unless every id and name is free (and unique in the set)."""
        ids, names = set(), set()
        for function in functions:
            if function.function_id in self._by_id or function.function_id in ids:
                holder = self._by_id.get(function.function_id)
                raise FunctionConflict(
                    f"function id {function.function_id:#x} ({function.name}) is taken"
                    + (f" by {holder.name!r} of module {holder.module!r}" if holder else ""))
            if function.name in self._by_name or function.name in names:
                raise FunctionConflict(f"function name {function.name!r} is taken")
            ids.add(function.function_id)
            names.add(function.name)

    def register(self, function: Function, slot: Optional[int] = None) -> Function:
        """Adds function with its slot: the given one (a worker follows the master's
        choice), else slot_for()."""
        self.check_free([function])
        if slot is None:
            slot = self.slot_for(function.function_id, function.name)
        elif not 0 < slot < MAX_FUNCTION_SLOTS:
            raise FunctionConflict(f"stats slot {slot} out of range")
        else:
            self._slots[(function.function_id, function.name)] = slot
        function = dataclasses.replace(function, slot=slot)
        self._by_id[function.function_id] = function
        self._by_name[function.name] = function
        return function

    def unregister_module(self, module: str) -> list[Function]:
        """Removes every function of module; returns them (their slots stay reserved)."""
        gone = [f for f in self._by_id.values() if f.module == module]
        for function in gone:
            del self._by_id[function.function_id]
            del self._by_name[function.name]
        return gone

    def by_id(self, function_id: int) -> Function:
        try:
            return self._by_id[function_id]
        except KeyError:
            raise UnknownFunction(f"no function with id {function_id}") from None

    def resolve(self, name_or_id: str | int) -> Function:
        """Accepts a function name or a decimal/hex id (as typed on the command line)."""
        if isinstance(name_or_id, int):
            return self.by_id(name_or_id)
        if name_or_id in self._by_name:
            return self._by_name[name_or_id]
        try:
            return self.by_id(int(name_or_id, 0))
        except ValueError:
            raise UnknownFunction(f"no function named {name_or_id!r}") from None

    def __iter__(self):
        return iter(sorted(self._by_id.values(), key=lambda f: f.function_id))

    def slot_names(self) -> dict[int, str]:
        names = {UNASSIGNED_SLOT: "(none)"}
        names.update({slot: name for (_, name), slot in self._slots.items()})
        return names


def load_dpi_patterns(path: Optional[str]) -> list[bytes]:
    """The dpi function's pattern file: one pattern per line; `\\xHH` and `\\\\` escapes;
    blank lines and lines starting with '#' are skipped. Raises ValueError naming the line.
    The file decides what is blocked, so only root may be able to change it (trust.py)."""
    from . import trust

    if not path:
        return []
    patterns = []
    resolved = trust.check_trusted(path)    # UntrustedFile is a ValueError
    with open(os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as handle:
        for number, raw in enumerate(handle, 1):
            line = raw.rstrip(b"\r\n")
            if not line.strip() or line.lstrip().startswith(b"#"):
                continue
            try:
                pattern = line.decode("ascii").encode("latin-1").decode("unicode_escape").encode("latin-1")
            except (UnicodeError, ValueError) as exc:
                raise ValueError(f"{path}:{number}: bad pattern: {exc}") from None
            if not 1 <= len(pattern) <= 255:
                raise ValueError(f"{path}:{number}: a pattern has 1 to 255 bytes")
            patterns.append(pattern)
    return patterns


def configure_builtins(config) -> None:
    """Gives the built-in functions their files (keyring, dpi patterns). Called in every
    worker at boot; the master calls check_builtin_files first so bad files stop the start
    (or the reload) instead of every worker."""
    from . import _vf, vf_crypto

    vf_crypto.configure(config.keyring)
    _vf.set_dpi_patterns(load_dpi_patterns(config.dpi_patterns))


def check_builtin_files(config) -> None:
    """Raises ValueError/OSError if the keyring or the pattern file cannot be used."""
    from . import vf_crypto

    if config.keyring:
        vf_crypto.load_keyring(config.keyring)
    load_dpi_patterns(config.dpi_patterns)
    if config.hmac_keyring:  # the SRH HMAC keys (srhhmac.py)
        from .srhhmac import HmacKeyring

        HmacKeyring.load(config.hmac_keyring)
