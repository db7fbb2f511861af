"""Function lookup: which virtual function (VF) a function address selects.

Called by a worker once per accepted connection, after the SRH lookup: the function bits
of this proxy's segment pick a `Function`, whose `relay_mode` and `relay_key` tell the
relay loop how to move the bytes (splice for identity, the buffer path otherwise).
Each function owns a stats slot so the relay loop can count bytes per function
without any Python object on its hot path.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from . import _relay

# Stats slots per worker; slot 0 is reserved for flows that never got a function.
MAX_FUNCTION_SLOTS = 64
UNASSIGNED_SLOT = 0


class UnknownFunction(LookupError):
    """The function bits name no loaded function; the worker resets the connection."""


@dataclasses.dataclass(frozen=True)
class Function:
    function_id: int
    name: str
    relay_mode: int
    # Maps the address's parameter bits to the relay's per-flow key.
    key_from_params: Callable[[int], int]
    description: str
    slot: int = UNASSIGNED_SLOT

    def relay_key(self, params: int) -> int:
        return self.key_from_params(params)


BUILTIN_FUNCTIONS = (
    Function(0, "identity", _relay.MODE_SPLICE, lambda params: 0,
             "forwards the bytestream unchanged, zero copy through splice()"),
    Function(1, "xor", _relay.MODE_XOR, lambda params: params & 0xFF,
             "xors every byte with the key in the low 8 bits of the parameters"),
)


class FunctionRegistry:
    """Functions by id and by name; assigns each a stats slot at registration."""

    def __init__(self, functions=BUILTIN_FUNCTIONS):
        self._by_id: dict[int, Function] = {}
        self._by_name: dict[str, Function] = {}
        for function in functions:
            self.register(function)

    def register(self, function: Function) -> Function:
        if function.function_id in self._by_id:
            raise ValueError(f"function id {function.function_id} is taken by "
                             f"{self._by_id[function.function_id].name!r}")
        if function.name in self._by_name:
            raise ValueError(f"function name {function.name!r} is taken")
        slot = len(self._by_id) + 1
        if slot >= MAX_FUNCTION_SLOTS:
            raise ValueError(f"at most {MAX_FUNCTION_SLOTS - 1} functions can be loaded")
        function = dataclasses.replace(function, slot=slot)
        self._by_id[function.function_id] = function
        self._by_name[function.name] = function
        return function

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
        names.update({f.slot: f.name for f in self._by_id.values()})
        return names
