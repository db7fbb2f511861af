"""Address plan: how a proxy's function addresses carry a function id and its parameters.

Every proxy owns a locator prefix. Each address inside it names one virtual function (VF)
and the parameters that function receives for this connection (paper section IV-C, Fig. 2).
With the default widths (a /80 locator, 16 function bits, 32 parameter bits) the 128 bits
of an address are laid out as::

     0                                       79 80           95 96                   127
    +------------------------------------------+---------------+-----------------------+
    |               locator (/80)              |   function    |      parameters       |
    |                                          |   (16 bits)   |      (32 bits)        |
    +------------------------------------------+---------------+-----------------------+

    fc00:1::/80, function 1, parameters 0x2a  ->  fc00:1:0:0:0:1:0:2a  (fc00:1::1:0:2a)

The widths are configurable. The function field always follows the locator and the
parameters always take the low ``param_bits`` bits; when the three widths add up to less
than 128 the bits in between (the gap) must be zero, so that one function address has
exactly one spelling::

    | locator (prefixlen) | function (function_bits) | gap (zero) | parameters (param_bits) |

The plan is pure computation (no I/O): the worker calls :meth:`AddressPlan.decode` on the
destination address of each intercepted SYN, a controller or a test calls
:meth:`AddressPlan.encode` to build the segments of a path.
"""
from __future__ import annotations

import ipaddress
from typing import NamedTuple, Union

__all__ = ["AddressError", "AddressField", "AddressPlan", "FunctionAddress"]

ADDRESS_BITS = 128

# Limits on the field widths. A function id must fit the 32-bit slot ids used by the
# function registry and stats; parameters are handed to functions as one 64-bit integer.
MIN_FUNCTION_BITS = 1
MAX_FUNCTION_BITS = 32
MIN_PARAM_BITS = 0
MAX_PARAM_BITS = 64

AddressLike = Union[str, ipaddress.IPv6Address]


class AddressError(ValueError):
    """Raised for an invalid plan, an out-of-range field, or an address the plan rejects."""


class FunctionAddress(NamedTuple):
    """What a function address means: which function, with which parameters."""

    function_id: int
    params: int


class AddressField(NamedTuple):
    """One field of the address layout: bit offset from the most significant bit, width."""

    name: str
    offset: int
    width: int


class AddressPlan:
    """The layout of the function addresses inside one locator prefix.

    ``AddressPlan(locator, function_bits=16, param_bits=32)``: ``locator`` is an
    ``IPv6Network`` or its text form; its host bits must be zero. Raises
    :class:`AddressError` when the widths do not fit in 128 bits or are out of range.
    """

    __slots__ = (
        "locator",
        "function_bits",
        "param_bits",
        "gap_bits",
        "fields",
        "_function_shift",
        "_function_mask",
        "_gap_mask",
        "_param_mask",
        "_locator_int",
        "_locator_shift",
    )

    def __init__(self, locator: str | ipaddress.IPv6Network, function_bits: int = 16,
                 param_bits: int = 32) -> None:
        self.locator = _parse_locator(locator)
        _check_width("function_bits", function_bits, MIN_FUNCTION_BITS, MAX_FUNCTION_BITS)
        _check_width("param_bits", param_bits, MIN_PARAM_BITS, MAX_PARAM_BITS)
        prefixlen = self.locator.prefixlen
        used = prefixlen + function_bits + param_bits
        if used > ADDRESS_BITS:
            raise AddressError(
                f"address plan does not fit in {ADDRESS_BITS} bits: locator /{prefixlen} + "
                f"function_bits {function_bits} + param_bits {param_bits} = {used}"
            )
        self.function_bits = function_bits
        self.param_bits = param_bits
        self.gap_bits = ADDRESS_BITS - used
        self.fields = (
            AddressField("locator", 0, prefixlen),
            AddressField("function", prefixlen, function_bits),
            AddressField("gap", prefixlen + function_bits, self.gap_bits),
            AddressField("params", ADDRESS_BITS - param_bits, param_bits),
        )
        # Precomputed shifts and masks: decode() runs once per intercepted SYN.
        self._function_shift = self.gap_bits + param_bits
        self._function_mask = (1 << function_bits) - 1
        self._gap_mask = (1 << self.gap_bits) - 1
        self._param_mask = (1 << param_bits) - 1
        self._locator_shift = ADDRESS_BITS - prefixlen
        self._locator_int = int(self.locator.network_address) >> self._locator_shift

    def encode(self, function_id: int, params: int = 0) -> ipaddress.IPv6Address:
        """Return the function address for ``function_id`` with ``params``.

        Raises :class:`AddressError` if either value does not fit its field.
        """
        _check_field("function_id", function_id, self.function_bits)
        _check_field("params", params, self.param_bits)
        value = (
            int(self.locator.network_address)
            | (function_id << self._function_shift)
            | params
        )
        return ipaddress.IPv6Address(value)

    def decode(self, addr: AddressLike) -> FunctionAddress:
        """Return the function id and parameters carried by ``addr``.

        Called by the worker on the SYN's destination address. Raises
        :class:`AddressError` when ``addr`` is not an IPv6 address, lies outside the
        locator, or has nonzero gap bits.
        """
        value = _address_int(addr)
        if value >> self._locator_shift != self._locator_int:
            raise AddressError(f"address {ipaddress.IPv6Address(value)} is outside the "
                               f"locator {self.locator}")
        gap = (value >> self.param_bits) & self._gap_mask
        if gap:
            raise AddressError(
                f"address {ipaddress.IPv6Address(value)} has nonzero bits ({gap:#x}) in the "
                f"{self.gap_bits}-bit gap between the function field and the parameters"
            )
        return FunctionAddress(
            (value >> self._function_shift) & self._function_mask,
            value & self._param_mask,
        )

    def contains(self, addr: AddressLike) -> bool:
        """Return True if ``addr`` lies inside the locator (gap bits are not checked).

        Raises :class:`AddressError` if ``addr`` is not an IPv6 address at all.
        """
        return _address_int(addr) >> self._locator_shift == self._locator_int

    def __repr__(self) -> str:
        return (f"AddressPlan({str(self.locator)!r}, function_bits={self.function_bits}, "
                f"param_bits={self.param_bits})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AddressPlan):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple:
        return (self.locator, self.function_bits, self.param_bits)


def _parse_locator(locator: str | ipaddress.IPv6Network) -> ipaddress.IPv6Network:
    if isinstance(locator, ipaddress.IPv6Network):
        return locator
    if isinstance(locator, ipaddress.IPv4Network):
        raise AddressError(f"locator {locator} is an IPv4 prefix; an IPv6 prefix is needed")
    try:
        return ipaddress.IPv6Network(locator)
    except ipaddress.AddressValueError as exc:
        raise AddressError(f"locator {locator!r} is not an IPv6 prefix: {exc}") from None
    except ipaddress.NetmaskValueError as exc:
        raise AddressError(f"locator {locator!r} has an invalid prefix length: {exc}") from None
    except ValueError:
        # ipaddress raises a bare ValueError only for host bits set.
        loose = ipaddress.IPv6Network(locator, strict=False)
        raise AddressError(
            f"locator {locator!r} has host bits set; did you mean {loose}?"
        ) from None
    except TypeError as exc:
        raise AddressError(f"locator {locator!r} is not an IPv6 prefix: {exc}") from None


def _address_int(addr: AddressLike) -> int:
    """The address as an integer; 16 raw bytes (the worker's hot path) need no parsing."""
    if isinstance(addr, bytes) and len(addr) == 16:
        return int.from_bytes(addr, "big")
    return int(_parse_address(addr))


def _parse_address(addr: AddressLike) -> ipaddress.IPv6Address:
    if isinstance(addr, ipaddress.IPv6Address):
        return addr
    try:
        return ipaddress.IPv6Address(addr)
    except (ipaddress.AddressValueError, TypeError) as exc:
        raise AddressError(f"{addr!r} is not an IPv6 address: {exc}") from None


def _check_width(name: str, value: int, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise AddressError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise AddressError(f"{name} must be between {low} and {high}, got {value}")


def _check_field(name: str, value: int, width: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise AddressError(f"{name} must be an integer, got {value!r}")
    if not 0 <= value < (1 << width):
        raise AddressError(
            f"{name} {value} does not fit in {width} bits (0..{(1 << width) - 1})"
        )
