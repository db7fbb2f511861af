"""The controller's bindings: which BSID of which access router stands for which path,
and until when (no I/O; the clock is passed in).

A binding is shared by every client of one prefix of one router asking for the same
server through the same chain: the key is (router, client prefix, server address, chain).
Each lookup that uses it pushes its expiry to ``now + lifetime``; :meth:`expire` drops the
ones nobody asked for in that time. BSIDs are allocated in the router's block, lowest free
address first, never the block's first address (the subnet-router anycast address);
a full block raises :class:`BlockExhausted`.

A binding's segments change only when a proxy on its path goes down (:meth:`reroute`):
every packet of a flow follows the binding, so moving a binding off a live proxy would
reset its established connections. That is also why a proxy that comes back does not get
its old bindings back.
"""
from __future__ import annotations

import dataclasses
import ipaddress
from collections import Counter
from typing import Callable, Iterable, Optional

from .messages import Binding

__all__ = ["BindingEntry", "BindingKey", "BindingTable", "BlockExhausted"]


class BlockExhausted(Exception):
    """Every BSID of a router's block is in use."""


@dataclasses.dataclass(frozen=True)
class BindingKey:
    router: str
    prefix: ipaddress.IPv6Network
    server: ipaddress.IPv6Address
    chain: tuple[str, ...]

    def text(self) -> str:
        """A stable string for tie-breaking and logs."""
        return f"{self.router} {self.prefix} {self.server} {','.join(self.chain)}"


@dataclasses.dataclass
class BindingEntry:
    key: BindingKey
    binding: Binding
    proxies: tuple[str, ...]     # proxy names, one per segment
    expires_at: float
    generation: int              # bumped when its segments change (rerouted)
    confirmed: bool = False      # its router's agent acknowledged it at least once


class BindingTable:
    """Bindings per router. ``blocks`` maps router names to their binding blocks."""

    def __init__(self, blocks: dict[str, ipaddress.IPv6Network]):
        self.blocks = dict(blocks)
        self.by_key: dict[BindingKey, BindingEntry] = {}
        self.by_bsid: dict[ipaddress.IPv6Address, BindingEntry] = {}

    def __len__(self) -> int:
        return len(self.by_key)

    def get(self, key: BindingKey) -> Optional[BindingEntry]:
        return self.by_key.get(key)

    def create(self, key: BindingKey, segments: Iterable[ipaddress.IPv6Address],
               proxies: Iterable[str], label: str, expires_at: float) -> BindingEntry:
        """A new binding for ``key`` (which must not exist). Raises BlockExhausted."""
        if key in self.by_key:
            raise KeyError(f"binding for {key.text()} exists")
        bsid = self._allocate(key.router)
        binding = Binding(bsid, tuple(segments), key.server, (key.prefix,), label, key.chain)
        entry = BindingEntry(key, binding, tuple(proxies), expires_at, 1)
        self.by_key[key] = entry
        self.by_bsid[bsid] = entry
        return entry

    def adopt(self, key: BindingKey, binding: Binding, proxies: Iterable[str],
              expires_at: float) -> Optional[BindingEntry]:
        """Takes back a binding an agent still holds (the controller restarted). Returns
        None, changing nothing, when its key or BSID is already in use or the BSID is
        outside the router's block."""
        block = self.blocks.get(key.router)
        if block is None or binding.bsid not in block or binding.bsid == block[0] \
                or key in self.by_key or binding.bsid in self.by_bsid:
            return None
        entry = BindingEntry(key, binding, tuple(proxies), expires_at, 1, confirmed=True)
        self.by_key[key] = entry
        self.by_bsid[binding.bsid] = entry
        return entry

    def touch(self, entry: BindingEntry, expires_at: float) -> None:
        entry.expires_at = max(entry.expires_at, expires_at)

    def _allocate(self, router: str) -> ipaddress.IPv6Address:
        block = self.blocks[router]
        base = int(block.network_address)
        # Lowest free first. Blocks are small (a /112 holds 65535 bindings) and allocation
        # happens once per new binding, not per lookup.
        for offset in range(1, block.num_addresses):
            bsid = ipaddress.IPv6Address(base + offset)
            if bsid not in self.by_bsid:
                return bsid
        raise BlockExhausted(f"the binding block {block} of {router} is full "
                             f"({block.num_addresses - 1} bindings)")

    def expire(self, now: float) -> list[BindingEntry]:
        """Removes and returns the bindings whose expiry has passed."""
        gone = [entry for entry in self.by_key.values() if entry.expires_at <= now]
        for entry in gone:
            self.remove(entry)
        return gone

    def remove(self, entry: BindingEntry) -> None:
        self.by_key.pop(entry.key, None)
        self.by_bsid.pop(entry.binding.bsid, None)

    def reroute(self, needs: Callable[[BindingEntry], bool],
                recompute: Callable[[BindingEntry], tuple[list, list[str]]]) -> tuple[
                    list[BindingEntry], list[tuple[BindingEntry, Exception]]]:
        """Gives every binding for which ``needs(entry)`` is true (its path crosses a dead
        proxy, or no longer matches the configuration) the path ``recompute(entry)``
        returns as (segments, proxy names). Returns (rerouted, failed): a binding that
        cannot be rerouted keeps its path (the flows through the dead proxy are lost
        either way) and is retried at the next call."""
        rerouted, failed = [], []
        for entry in list(self.by_key.values()):
            if not needs(entry):
                continue
            try:
                segments, proxies = recompute(entry)
            except Exception as exc:  # noqa: BLE001 - NoPath, reported by the caller
                failed.append((entry, exc))
                continue
            entry.binding = dataclasses.replace(entry.binding, segments=tuple(segments))
            entry.proxies = tuple(proxies)
            entry.generation += 1
            rerouted.append(entry)
        return rerouted, failed

    def for_router(self, router: str) -> list[BindingEntry]:
        return [entry for entry in self.by_key.values() if entry.key.router == router]

    def per_proxy(self) -> Counter:
        """How many bindings place a function on each proxy (a proxy used twice in one
        path counts twice)."""
        counts: Counter = Counter()
        for entry in self.by_key.values():
            counts.update(entry.proxies)
        return counts
