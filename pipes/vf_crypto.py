"""The built-in `encrypt` (id 5) and `decrypt` (id 6) functions: ChaCha20 between two proxies.

A flow through two proxies, the first running `encrypt`, the second `decrypt`, with the same
key id in the parameter bits of both function addresses:

    client --plain--> P1 (encrypt) --ciphertext--> P2 (decrypt) --plain--> server
    client <--plain-- P1 (encrypt) <--ciphertext-- P2 (decrypt) <--plain-- server

`encrypt` encrypts the up direction (client -> server) and decrypts the down direction;
`decrypt` is its mirror. Any chunking works: each direction is one ChaCha20 stream.

Keys. The parameters' low 8 bits are a key id, looked up in the keyring that `configure()`
loaded (the worker calls it at start and on reload). Keyring file format, text:

    # comments and blank lines are allowed; a `#` also starts a comment after a key
    KEYID HEXKEY        KEYID decimal 0..255, HEXKEY 64 hex digits (a 32-byte key)

Parsing is strict (KeyringError names the file and the line; it never quotes key material),
a key id may appear once, and a file without keys is refused. The file must not be readable
or writable by others, nor writable by its group (like ssh's private keys, but group read is
allowed so that `root:pipes 0640` works): otherwise KeyringError. A flow spawned with no
keyring configured, or with a key id the keyring lacks, is reset (ResetFlow, counted as
vf_resets and in stats()["missing_key"]). A reload swaps the keyring only if the new file
loads; flows already running keep the key they started with.

Wire format of one direction between the proxies:

    salt (16 random bytes) || ChaCha20(k, n, plaintext)
    k || n = HKDF-SHA256(ikm=key, salt=salt, info=INFO_LABEL || key id || client || client
             port || server || server port || direction)   (32-byte key, 12-byte nonce)

The side that encrypts a direction draws the salt from os.urandom when the first plaintext
byte arrives (a direction that carries no byte carries no salt either: it stays empty, and
the decrypting side accepts an empty stream). The decrypting side waits until it holds the
16 salt bytes (it consumes nothing before); a stream that ends inside the salt resets the
flow. Both proxies are transparent, so both see the same client and server addresses and
ports: binding them into the key means ciphertext replayed onto another connection does not
decrypt. Every flow and direction gets its own key and nonce from a fresh random salt, so no
keystream is used twice (the 32-bit block counter starts at 0 and lasts 256 GiB per
direction; OpenSSL carries on into the nonce beyond that, still under the flow's own key).

What it protects: the confidentiality of the payload on the segment between the two proxies
against a passive observer without the key.

What it does NOT protect:
  - integrity and authenticity: there is no MAC. Flipped ciphertext bits flip the same
    plaintext bits undetected; truncation (a FIN or RST on the segment) is not detected;
    an active attacker on the segment can modify traffic at will;
  - forward secrecy: keys are static, in a file; whoever gets the file decrypts every
    recorded flow that used them;
  - metadata: addresses, ports, sizes and timing stay visible (sizes grow by 16 bytes);
  - anything outside the P1..P2 segment, and the proxies themselves: they see plaintext.
Use TLS end to end where any of that matters.
"""
from __future__ import annotations

import ipaddress
import os
import re
import stat
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from srv6pipes import trust
from srv6pipes.vfapi import FlowInfo, Function, ResetFlow

ENCRYPT_ID = 5
DECRYPT_ID = 6
KEY_SIZE = 32
SALT_SIZE = 16
NONCE_SIZE = 12
INFO_LABEL = b"srv6pipes chacha20 v1\0"
KEY_ID_MASK = 0xFF

_KEYRING_LINE = re.compile(r"([0-9]{1,12})\s+([0-9A-Fa-f]+)")


class KeyringError(ValueError):
    """The keyring file is unusable: unreadable, too open, or a line is malformed."""


# Per worker process: the keyring configure() loaded (None: none configured) and counters.
_keyring: dict[int, bytes] | None = None
_keyring_path: str | None = None
_stats = {"flows": 0, "bytes_encrypted": 0, "bytes_decrypted": 0, "missing_key": 0,
          "truncated": 0}


def load_keyring(path: str | os.PathLike) -> dict[int, bytes]:
    """Reads and checks a keyring file: returns {key id: 32-byte key}, or raises
    KeyringError (OSError if the file cannot be opened). The file must be root's alone,
    readable by nobody else, in directories only root can change (trust.py)."""
    path = os.fspath(path)
    try:
        resolved = trust.check_trusted(path, secret=True)
    except trust.UntrustedFile as exc:
        raise KeyringError(f"keyring refused: {exc}") from None
    fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as file:
        st = os.fstat(file.fileno())   # the file we read, not whatever the path names now
        if not stat.S_ISREG(st.st_mode):
            raise KeyringError(f"{path}: not a regular file")
        if st.st_mode & (stat.S_IRWXO | stat.S_IWGRP):
            raise KeyringError(f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets others read "
                               f"or change the keys; chmod 600 (or 640) it")
        raw = file.read()
    keys: dict[int, bytes] = {}
    first_seen: dict[int, int] = {}
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            raise KeyringError(f"{path}:{lineno}: not ASCII") from None
        text = text.split("#", 1)[0].strip()
        if not text:
            continue
        match = _KEYRING_LINE.fullmatch(text)
        if match is None:
            # Never echo the line: it may hold a (mistyped) key.
            raise KeyringError(f"{path}:{lineno}: expected 'KEYID HEXKEY' (a decimal key id "
                               f"and {2 * KEY_SIZE} hex digits)")
        key_id, hexkey = int(match[1]), match[2]
        if key_id > KEY_ID_MASK:
            raise KeyringError(f"{path}:{lineno}: key id {key_id} is not in 0..{KEY_ID_MASK}")
        if len(hexkey) != 2 * KEY_SIZE:
            raise KeyringError(f"{path}:{lineno}: key {key_id} has {len(hexkey)} hex digits, "
                               f"not {2 * KEY_SIZE}")
        if key_id in keys:
            raise KeyringError(f"{path}:{lineno}: key id {key_id} is already defined on line "
                               f"{first_seen[key_id]}")
        keys[key_id] = bytes.fromhex(hexkey)
        first_seen[key_id] = lineno
    if not keys:
        raise KeyringError(f"{path}: no keys")
    return keys


def configure(keyring_path: str | os.PathLike | None) -> None:
    """Loads the keyring used by flows spawned from now on (None: no keyring, every
    encrypt/decrypt flow is reset). On error raises and keeps the previous keyring."""
    global _keyring, _keyring_path
    if keyring_path is None:
        _keyring, _keyring_path = None, None
        return
    keys = load_keyring(keyring_path)
    _keyring, _keyring_path = keys, os.fspath(keyring_path)


def stats() -> dict:
    """This worker's counters: flows spawned, plaintext bytes encrypted and decrypted, flows
    reset for a missing key or keyring, flows whose ciphertext ended inside the salt; and
    how many keys are loaded from where."""
    return dict(_stats, keys=len(_keyring or ()), keyring=_keyring_path)


def _flow_cipher(key: bytes, key_id: int, flow: FlowInfo, direction: int, salt: bytes):
    """The ChaCha20 Cipher of one direction of one flow (see the module docstring)."""
    info = b"".join((
        INFO_LABEL, bytes((key_id,)),
        ipaddress.IPv6Address(flow.client).packed, struct.pack("!H", flow.client_port),
        ipaddress.IPv6Address(flow.server).packed, struct.pack("!H", flow.server_port),
        bytes((direction,)),
    ))
    okm = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE + NONCE_SIZE, salt=salt,
               info=info).derive(key)
    # cryptography's ChaCha20 nonce: a 4-byte little-endian block counter, then 12 bytes.
    nonce = b"\0\0\0\0" + okm[KEY_SIZE:]
    return Cipher(algorithms.ChaCha20(okm[:KEY_SIZE], nonce), mode=None)


class _CryptoFlow:
    """One flow's state: per direction, whether this proxy encrypts it, and its cipher
    context once the salt is known (None before)."""

    __slots__ = ("name", "key", "key_id", "flow", "encrypts", "context")

    def __init__(self, name, key, key_id, flow, encrypts):
        self.name = name
        self.key = key
        self.key_id = key_id
        self.flow = flow
        self.encrypts = encrypts        # by direction: (UP, DOWN)
        self.context = [None, None]     # by direction


def _spawner(name: str, encrypts: tuple[bool, bool]):
    def spawn(params: int, flow: FlowInfo) -> _CryptoFlow:
        key_id = params & KEY_ID_MASK
        if _keyring is None:
            _stats["missing_key"] += 1
            raise ResetFlow(f"{name}: no keyring is configured (pipesd --keyring FILE), "
                            f"so there is no key {key_id}")
        key = _keyring.get(key_id)
        if key is None:
            _stats["missing_key"] += 1
            raise ResetFlow(f"{name}: key id {key_id} is not in the keyring {_keyring_path}")
        _stats["flows"] += 1
        return _CryptoFlow(name, key, key_id, flow, encrypts)
    return spawn


def _process(ctx: _CryptoFlow, direction: int, data: bytes, eof: bool):
    context = ctx.context[direction]
    if ctx.encrypts[direction]:
        if context is None:
            if not data:
                return b""                  # an empty direction stays empty: no salt
            salt = os.urandom(SALT_SIZE)
            context = ctx.context[direction] = _flow_cipher(
                ctx.key, ctx.key_id, ctx.flow, direction, salt).encryptor()
            _stats["bytes_encrypted"] += len(data)
            return salt + context.update(data)
        _stats["bytes_encrypted"] += len(data)
        return context.update(data)
    if context is None:
        if len(data) < SALT_SIZE:
            if eof and data:
                _stats["truncated"] += 1
                raise ResetFlow(f"{ctx.name}: the ciphertext ended inside its "
                                f"{SALT_SIZE}-byte salt ({len(data)} bytes)")
            return 0, b""                   # wait for the whole salt (or an empty stream)
        context = ctx.context[direction] = _flow_cipher(
            ctx.key, ctx.key_id, ctx.flow, direction, data[:SALT_SIZE]).decryptor()
        data = data[SALT_SIZE:]
    _stats["bytes_decrypted"] += len(data)
    return context.update(data)


FUNCTIONS = [
    Function(id=ENCRYPT_ID, name="encrypt", spawn=_spawner("encrypt", (True, False)),
             process=_process,
             description="ChaCha20: encrypts client->server, decrypts server->client "
                         "(key id in the low 8 parameter bits)"),
    Function(id=DECRYPT_ID, name="decrypt", spawn=_spawner("decrypt", (False, True)),
             process=_process,
             description="ChaCha20: decrypts client->server, encrypts server->client "
                         "(key id in the low 8 parameter bits)"),
]
