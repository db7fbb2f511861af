"""SRH HMAC (RFC 8754 section 2.1.2) exactly as Linux computes it, without I/O.

Who calls it: the access-router agent never does (the kernel signs the SRH its End.B6
binding inserts, with the key the agent installed through ``ip sr hmac``); pipesd's SYN
capture calls :func:`verify` on the SRH that names this proxy when it runs with
``--require-hmac``, and :func:`sign` on the flattened SRH it stores for the onward
connection (``pipes/srhstack.py``), so the next proxy can verify it in turn.

The TLV, as Linux declares it (include/uapi/linux/seg6_hmac.h, include/uapi/linux/seg6.h)::

    struct sr6_tlv_hmac {
        struct sr6_tlv tlvhdr;   /* type 5, len 38                                 */
        __u16   reserved;        /* RFC 8754's D flag is the top bit; Linux sends 0 */
        __be32  hmackeyid;
        __u8    hmac[SEG6_HMAC_FIELD_LEN];   /* 32 bytes                             */
    };
    #define SR6_FLAG1_HMAC (1 << 3)   /* SRH flags: Linux looks for the TLV only if set */

The text Linux authenticates (net/ipv6/seg6_hmac.c, seg6_hmac_compute)::

    source address (16) | last entry (1) | flags (1) | key id (4, big endian) | segments

Segments-left is not covered (it changes at every segment endpoint), nor is the
destination address: a proxy may forward a signed SRH with segments-left decremented and
the signature stays valid. Linux expects the HMAC TLV to be the last 40 bytes of the SRH
(seg6_get_tlv_hmac); :func:`sign` puts it last. Only SHA-256 is used here (Linux also
offers SHA-1, which we do not accept).

Keys (:class:`HmacKeyring`) are the same secrets the access routers hold: a key id (32 bits,
nonzero) and a secret of 1-64 bytes (Linux's SEG6_HMAC_SECRET_LEN).
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac as _hmac
import os
import stat
import struct
from typing import Mapping, NamedTuple, Optional, Union

from .srh import SRH, TLV
from . import trust

__all__ = [
    "HMAC_FLAG",
    "HMAC_TLV",
    "HmacError",
    "HmacKeyring",
    "HmacRefused",
    "compute",
    "hmac_field",
    "sign",
    "verify",
]

HMAC_TLV = 5
HMAC_VALUE_LENGTH = 38          # reserved (2) + key id (4) + HMAC (32)
HMAC_DIGEST_LENGTH = 32         # SEG6_HMAC_FIELD_LEN
HMAC_FLAG = 0x08                # SR6_FLAG1_HMAC
MAX_SECRET_LENGTH = 64          # SEG6_HMAC_SECRET_LEN
MAX_KEY_ID = 0xFFFFFFFF
_VALUE = struct.Struct("!HI32s")
_TEXT_HEAD = struct.Struct("!16sBBI")


class HmacError(ValueError):
    """A keyring that cannot be used, or an HMAC that cannot be built."""


class HmacRefused(Exception):
    """An SRH's HMAC is missing, names an unknown key or does not match. ``reason`` is one
    of ``missing``, ``unknown_key``, ``mismatch``, ``malformed``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class HmacField(NamedTuple):
    """The HMAC TLV of an SRH: which key signed it and the 32-byte HMAC it carries."""

    key_id: int
    digest: bytes


@dataclasses.dataclass(frozen=True)
class HmacKeyring:
    """Key id -> secret. ``HmacKeyring.load(path)`` reads a key file; see :func:`parse`."""

    keys: Mapping[int, bytes]

    def __post_init__(self) -> None:
        for key_id, secret in self.keys.items():
            _check_key(key_id, secret)
        object.__setattr__(self, "keys", dict(self.keys))

    def secret(self, key_id: int) -> Optional[bytes]:
        return self.keys.get(key_id)

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def parse(cls, text: str, where: str = "key file") -> "HmacKeyring":
        """One key per line: ``KEYID SECRET``; ``#`` starts a comment.

        KEYID is a decimal or 0x-hex number in 1..2^32-1. SECRET is the key as text
        (1-64 printable ASCII characters, no spaces): the same string
        ``ip sr hmac set KEYID sha256`` reads, whose bytes are the HMAC key. Raises
        :class:`HmacError` naming the line at fault.
        """
        keys: dict[int, bytes] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            words = line.split()
            if len(words) != 2:
                raise HmacError(f"{where} line {number}: expected 'KEYID SECRET', got "
                                f"{len(words)} words")
            try:
                key_id = int(words[0], 0)
            except ValueError:
                raise HmacError(f"{where} line {number}: key id {words[0]!r} is not a "
                                "number") from None
            secret = words[1]
            if not secret.isascii() or not secret.isprintable():
                raise HmacError(f"{where} line {number}: the secret must be printable ASCII")
            try:
                _check_key(key_id, secret.encode())
            except HmacError as exc:
                raise HmacError(f"{where} line {number}: {exc}") from None
            if key_id in keys:
                raise HmacError(f"{where} line {number}: key id {key_id} given twice")
            keys[key_id] = secret.encode()
        return cls(keys)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "HmacKeyring":
        """Reads a key file, refusing one that others can read or write (it holds secrets),
        or that sits where others could swap it (trust.py)."""
        try:
            resolved = trust.check_trusted(os.fspath(path), secret=True)
            info = os.stat(resolved)
            if info.st_mode & (stat.S_IRWXO | stat.S_IWGRP):
                raise HmacError(f"HMAC key file {path} is readable or writable by others "
                                f"(mode {stat.S_IMODE(info.st_mode):o}); chmod 600 it")
            with open(resolved, encoding="ascii") as handle:
                text = handle.read()
        except trust.UntrustedFile as exc:
            raise HmacError(f"HMAC key file refused: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise HmacError(f"cannot read HMAC key file {path}: {exc}") from None
        keyring = cls.parse(text, where=str(path))
        if not keyring.keys:
            raise HmacError(f"HMAC key file {path} holds no key")
        return keyring


def _check_key(key_id: int, secret: bytes) -> None:
    if not isinstance(key_id, int) or isinstance(key_id, bool) or not 1 <= key_id <= MAX_KEY_ID:
        raise HmacError(f"key id must be in 1..{MAX_KEY_ID}, got {key_id!r}")
    if not isinstance(secret, bytes) or not 1 <= len(secret) <= MAX_SECRET_LENGTH:
        raise HmacError(f"key {key_id}: the secret must be 1..{MAX_SECRET_LENGTH} bytes")


def _text(source: bytes, srh: SRH, key_id: int, flags: int) -> bytes:
    return (_TEXT_HEAD.pack(source, srh.last_entry, flags, key_id)
            + b"".join(segment.packed for segment in srh.segments))


def compute(secret: bytes, source: bytes, srh: SRH, key_id: int) -> bytes:
    """The 32-byte HMAC-SHA256 Linux puts in (or expects in) ``srh`` sent from ``source``
    (16 bytes) with ``key_id``. ``srh.flags`` must already carry HMAC_FLAG, as on the wire."""
    if len(source) != 16:
        raise HmacError(f"source address must be 16 bytes, got {len(source)}")
    return _hmac.digest(secret, _text(source, srh, key_id, srh.flags), hashlib.sha256)


def hmac_field(srh: SRH) -> Optional[HmacField]:
    """The SRH's HMAC TLV, or None when it has none. Raises :class:`HmacRefused`
    ('malformed') for an HMAC TLV of the wrong length or several of them."""
    found = [tlv for tlv in srh.tlvs if tlv.type == HMAC_TLV]
    if not found:
        return None
    if len(found) > 1:
        raise HmacRefused("malformed", f"{len(found)} HMAC TLVs in one SRH")
    value = found[0].value
    if len(value) != HMAC_VALUE_LENGTH:
        raise HmacRefused("malformed", f"HMAC TLV value is {len(value)} bytes, expected "
                                       f"{HMAC_VALUE_LENGTH}")
    _reserved, key_id, digest = _VALUE.unpack(value)
    return HmacField(key_id, digest)


def sign(srh: SRH, source: bytes, key_id: int, secret: bytes) -> SRH:
    """Returns ``srh`` with the HMAC flag set and a valid HMAC TLV (replacing any), placed
    after the other TLVs as Linux expects. ``source`` is the packet's source address (16
    bytes): for a transparent proxy's onward connection, the client's."""
    _check_key(key_id, secret)
    others = tuple(tlv for tlv in srh.tlvs if tlv.type != HMAC_TLV)
    flagged = dataclasses.replace(srh, flags=srh.flags | HMAC_FLAG, tlvs=others)
    digest = compute(secret, source, flagged, key_id)
    return dataclasses.replace(flagged, tlvs=others + (TLV(HMAC_TLV, _VALUE.pack(0, key_id, digest)),))


def verify(srh: SRH, source: bytes, keyring: HmacKeyring) -> int:
    """Checks the HMAC of ``srh`` sent from ``source`` (16 bytes); returns the key id.

    Raises :class:`HmacRefused` when the TLV is missing ('missing'), names a key id the
    keyring lacks ('unknown_key'), or does not match ('mismatch', compared in constant
    time). The HMAC flag is not required (RFC 8754 dropped it), but it is part of the
    authenticated text, so a signature made with it set only verifies with it set.
    """
    field = hmac_field(srh)
    if field is None:
        raise HmacRefused("missing", "the SRH carries no HMAC TLV")
    secret = keyring.secret(field.key_id)
    if secret is None:
        raise HmacRefused("unknown_key", f"HMAC key id {field.key_id} is not in the keyring")
    expected = compute(secret, source, srh, field.key_id)
    if not _hmac.compare_digest(expected, field.digest):
        raise HmacRefused("mismatch", f"HMAC (key id {field.key_id}) does not match")
    return field.key_id
