"""The controller <-> access-router agent protocol, declared once (no I/O).

The controller is the client: for every request it opens a TCP connection to the agent
(``[address]:port`` from the topology), sends one frame, reads one frame back and closes.
A frame is a 4-byte big-endian length, then that many bytes of UTF-8 JSON::

    {"v": 1, "ts": 1764650000.25, "nonce": "<32 hex>", "body": {...}, "mac": "<64 hex>"}

``mac`` = HMAC-SHA256(shared key, MAC_LABEL + canonical JSON of {"body", "nonce", "ts"}),
canonical meaning sorted keys and no spaces. The receiver refuses (and counts) a frame that
is too long, not JSON, of another version, whose MAC does not match (compared in constant
time), whose timestamp is more than MAX_SKEW seconds away from its clock, or whose nonce
it has already seen within that window (a replay). Replies are sealed the same way and
name the request's nonce in ``re``, so an old reply cannot be passed off as a new one.
Both ends hold the same key (``agent_key`` file: at least 16 bytes of secret, hex).

Bodies (``type`` first):

=========  =====================================================  ===================
request    fields                                                  reply
=========  =====================================================  ===================
sync       router, generation, bindings: [{binding, lifetime}]     synced
status     router                                                  status
=========  =====================================================  ===================

``sync`` is level-triggered: it lists *every* binding the router should have, each with
the seconds it may live without another sync; the agent installs what is new or
changed, refreshes the rest and removes what is not listed. ``synced`` says how many of
each and which failed. An agent that restarted is therefore repaired by the next sync.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import json
import os
import struct
import time
from typing import Any, Optional

__all__ = [
    "Binding",
    "ChannelError",
    "MAX_FRAME",
    "NonceCache",
    "load_key",
    "open_frame",
    "seal",
]

PROTOCOL_VERSION = 1
MAX_FRAME = 1 << 20             # a sync of a few thousand bindings fits
MAX_SKEW = 30.0                 # seconds of clock difference tolerated
MIN_KEY_BYTES = 16
MAC_LABEL = b"srv6pipes agent channel v1\0"
LENGTH = struct.Struct("!I")
MAX_SEGMENTS = 16               # a policy longer than this is a configuration error
MAX_LIFETIME = 86400.0


class ChannelError(Exception):
    """A frame refused. ``reason`` names the counter: too_large, malformed, version,
    bad_mac, stale, replay, bad_request."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _address(value: Any, what: str) -> ipaddress.IPv6Address:
    try:
        return ipaddress.IPv6Address(value)
    except (ipaddress.AddressValueError, TypeError, ValueError):
        raise ChannelError("bad_request", f"{what}: {value!r} is not an IPv6 address") from None


def _network(value: Any, what: str) -> ipaddress.IPv6Network:
    try:
        return ipaddress.IPv6Network(value)
    except (ipaddress.AddressValueError, ipaddress.NetmaskValueError, TypeError, ValueError):
        raise ChannelError("bad_request", f"{what}: {value!r} is not an IPv6 prefix") from None


@dataclasses.dataclass(frozen=True)
class Binding:
    """One binding segment: what the access router expands ``bsid`` into.

    ``segments`` are the function addresses in travel order (the first proxy first);
    ``server`` is the final destination the client puts under the BSID; ``clients`` the
    prefixes allowed to use it (the edge filter's elements); ``chain`` the service names
    it stands for and ``label`` what it is for (the agent only stores them: a restarted
    controller reads them back to adopt the binding).
    """

    bsid: ipaddress.IPv6Address
    segments: tuple[ipaddress.IPv6Address, ...]
    server: ipaddress.IPv6Address
    clients: tuple[ipaddress.IPv6Network, ...]
    label: str = ""
    chain: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"bsid": str(self.bsid), "segments": [str(s) for s in self.segments],
                "server": str(self.server), "clients": [str(c) for c in self.clients],
                "label": self.label, "chain": list(self.chain)}

    @classmethod
    def from_json(cls, data: Any) -> "Binding":
        """Raises ChannelError('bad_request') naming the field at fault."""
        if not isinstance(data, dict):
            raise ChannelError("bad_request", "a binding must be an object")
        segments = data.get("segments")
        clients = data.get("clients")
        if not isinstance(segments, list) or not 1 <= len(segments) <= MAX_SEGMENTS:
            raise ChannelError("bad_request", f"binding segments: a list of 1..{MAX_SEGMENTS} "
                                              "addresses")
        if not isinstance(clients, list) or not clients:
            raise ChannelError("bad_request", "binding clients: a non-empty list of prefixes")
        label = data.get("label", "")
        if not isinstance(label, str) or len(label) > 200:
            raise ChannelError("bad_request", "binding label: a string of at most 200 characters")
        chain = data.get("chain", [])
        if not isinstance(chain, list) or len(chain) > MAX_SEGMENTS or not all(
                isinstance(name, str) and 0 < len(name) < 32 for name in chain):
            raise ChannelError("bad_request", "binding chain: a list of service names")
        return cls(_address(data.get("bsid"), "bsid"),
                   tuple(_address(s, "segment") for s in segments),
                   _address(data.get("server"), "server"),
                   tuple(_network(c, "client prefix") for c in clients), label, tuple(chain))


def parse_sync(body: dict) -> list[tuple[Binding, float]]:
    """The (binding, lifetime) pairs of a sync body; raises ChannelError('bad_request')."""
    items = body.get("bindings")
    if not isinstance(items, list):
        raise ChannelError("bad_request", "sync: bindings must be a list")
    result = []
    seen = set()
    for item in items:
        if not isinstance(item, dict):
            raise ChannelError("bad_request", "sync: each item is {binding, lifetime}")
        binding = Binding.from_json(item.get("binding"))
        lifetime = item.get("lifetime")
        if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)) \
                or not 0 < lifetime <= MAX_LIFETIME:
            raise ChannelError("bad_request", f"sync: lifetime must be in (0, {MAX_LIFETIME}]")
        if binding.bsid in seen:
            raise ChannelError("bad_request", f"sync: {binding.bsid} listed twice")
        seen.add(binding.bsid)
        result.append((binding, float(lifetime)))
    return result


def load_key(path: str) -> bytes:
    """The shared channel key: a file holding at least 16 bytes as hex (comments with #).
    Refused when others can read it. Raises ValueError naming the problem."""
    import stat

    info = os.stat(path)
    if info.st_mode & (stat.S_IRWXO | stat.S_IWGRP):
        raise ValueError(f"agent key file {path} is readable or writable by others; chmod 600 it")
    with open(path, encoding="ascii") as handle:
        text = "".join(line.split("#", 1)[0].strip() for line in handle)
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"agent key file {path}: the key must be hex digits") from None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"agent key file {path}: at least {MIN_KEY_BYTES} bytes of key, "
                         f"got {len(key)}")
    return key


def _canonical(body: dict, ts: float, nonce: str) -> bytes:
    return json.dumps({"body": body, "nonce": nonce, "ts": ts}, sort_keys=True,
                      separators=(",", ":")).encode()


def _mac(key: bytes, body: dict, ts: float, nonce: str) -> str:
    return hmac.new(key, MAC_LABEL + _canonical(body, ts, nonce), hashlib.sha256).hexdigest()


def seal(body: dict, key: bytes, now: Optional[float] = None,
         nonce: Optional[str] = None) -> bytes:
    """One frame (length prefix included) carrying ``body``, authenticated with ``key``."""
    ts = time.time() if now is None else now
    nonce = os.urandom(16).hex() if nonce is None else nonce
    envelope = {"v": PROTOCOL_VERSION, "ts": ts, "nonce": nonce, "body": body,
                "mac": _mac(key, body, ts, nonce)}
    data = json.dumps(envelope, separators=(",", ":")).encode()
    if len(data) > MAX_FRAME:
        raise ChannelError("too_large", f"frame of {len(data)} bytes; at most {MAX_FRAME}")
    return LENGTH.pack(len(data)) + data


class NonceCache:
    """Nonces seen within MAX_SKEW: a frame replayed inside the window is refused, one
    replayed later is refused as stale. Bounded: at most ``limit`` entries."""

    def __init__(self, limit: int = 65536):
        self.limit = limit
        self.seen: dict[str, float] = {}
        self.next_purge = 0.0

    def check_and_add(self, nonce: str, now: float) -> bool:
        if now >= self.next_purge or len(self.seen) >= self.limit:
            # Frames older than the window are refused as stale anyway: forget them.
            self.seen = {n: t for n, t in self.seen.items() if now - t <= 2 * MAX_SKEW}
            self.next_purge = now + MAX_SKEW
            if len(self.seen) >= self.limit:
                return False  # flooded with valid frames: refuse rather than forget
        if nonce in self.seen:
            return False
        self.seen[nonce] = now
        return True


def frame_length(header: bytes) -> int:
    """The length announced by a 4-byte header; raises ChannelError('too_large')."""
    (length,) = LENGTH.unpack(header)
    if not 0 < length <= MAX_FRAME:
        raise ChannelError("too_large", f"frame length {length}; 1..{MAX_FRAME} accepted")
    return length


def open_frame(data: bytes, key: bytes, nonces: Optional[NonceCache],
               now: Optional[float] = None) -> tuple[dict, str]:
    """Checks one frame's JSON (after the length prefix); returns (body, nonce).

    Raises ChannelError with the reason to count. With ``nonces`` None the replay check
    is skipped (the controller reading a reply checks ``re`` instead).
    """
    now = time.time() if now is None else now
    try:
        envelope = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ChannelError("malformed", "frame is not JSON") from None
    if not isinstance(envelope, dict):
        raise ChannelError("malformed", "frame is not a JSON object")
    if envelope.get("v") != PROTOCOL_VERSION:
        raise ChannelError("version", f"protocol version {envelope.get('v')!r}; "
                                      f"{PROTOCOL_VERSION} expected")
    body, ts, nonce, mac = (envelope.get(k) for k in ("body", "ts", "nonce", "mac"))
    if not isinstance(body, dict) or not isinstance(nonce, str) or not isinstance(mac, str) \
            or isinstance(ts, bool) or not isinstance(ts, (int, float)) or len(nonce) > 64:
        raise ChannelError("malformed", "frame needs body (object), ts, nonce and mac")
    if not hmac.compare_digest(_mac(key, body, ts, nonce), mac):
        raise ChannelError("bad_mac", "frame MAC does not match (wrong key or altered)")
    if abs(now - ts) > MAX_SKEW:
        raise ChannelError("stale", f"frame timestamp {now - ts:+.1f}s from our clock; "
                                    f"at most {MAX_SKEW}s accepted")
    if nonces is not None and not nonces.check_and_add(nonce, now):
        raise ChannelError("replay", "frame nonce already seen (a replay)")
    if not isinstance(body.get("type"), str):
        raise ChannelError("bad_request", "body has no type")
    return body, nonce
