"""Path computation: which proxy runs each function of a chain (no I/O).

Called by the controller when it creates a binding, and again for every binding whose
path crosses a proxy that went down. The choice, for a chain f1..fn:

* only healthy proxies offering the service are candidates;
* two consecutive functions never run on the same proxy (pipesd does not relay to its own
  locator: the onward SYN would leave by the output path, where the interception rules
  do not see it);
* the last function runs on a proxy marked ``last_hop`` (the servers' replies cross it;
  a transparent proxy must see the replies of its onward connection);
* among the candidates, the least loaded first, where load = the flows the proxy reported
  active at its last health probe + LOAD_PER_BINDING x the bindings already placed on it
  (bindings that are new have no flows yet; without this term every binding created
  between two probes would land on the same proxy);
* ties are broken by rendezvous hashing of (binding key, proxy name): deterministic, and
  spread over equal proxies.

The search is depth first in that order, so the first complete assignment found is the
one the rules prefer at each step, and a dead end (e.g. the only last-hop proxy already
took the previous function) backtracks instead of failing. Chains are at most 8 long and
proxies few, so the search is small.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Mapping, Optional, Sequence

from .model import Proxy, Service

__all__ = ["LOAD_PER_BINDING", "NoPath", "ProxyLoad", "compute_path"]

# How many active flows one binding placed on a proxy counts for.
LOAD_PER_BINDING = 1


class NoPath(Exception):
    """No assignment satisfies the rules; ``service`` names the function that could not be
    placed (the first one, counting from the end, when it is the last-hop rule)."""

    def __init__(self, service: str, reason: str):
        super().__init__(reason)
        self.service = service


@dataclasses.dataclass(frozen=True)
class ProxyLoad:
    """What the controller knows about a proxy right now."""

    healthy: bool
    active_flows: int = 0
    bindings: int = 0

    @property
    def load(self) -> int:
        return self.active_flows + LOAD_PER_BINDING * self.bindings


def _tie_break(key: str, proxy: str) -> bytes:
    return hashlib.blake2b(f"{key}\0{proxy}".encode(), digest_size=8).digest()


def compute_path(chain: Sequence[Service], proxies: Sequence[Proxy],
                 state: Mapping[str, ProxyLoad], key: str) -> list[Proxy]:
    """One proxy per service of ``chain``, in order. ``state`` maps proxy names to their
    load (a proxy missing from it counts as down); ``key`` identifies the binding (for the
    tie break). Raises :class:`NoPath`."""
    if not chain:
        raise ValueError("an empty chain has no path")

    def candidates(index: int, previous: Optional[Proxy]) -> list[Proxy]:
        service = chain[index]
        last = index == len(chain) - 1
        found = [proxy for proxy in proxies
                 if service.name in proxy.services and state.get(proxy.name, _DOWN).healthy
                 and proxy is not previous and (proxy.last_hop or not last)]
        # Bindings placed earlier in this same path count too (a chain may use a proxy twice).
        return sorted(found, key=lambda p: (state[p.name].load + placed.count(p),
                                            _tie_break(key, p.name)))

    placed: list[Proxy] = []

    def search(index: int) -> bool:
        if index == len(chain):
            return True
        for proxy in candidates(index, placed[-1] if placed else None):
            placed.append(proxy)
            if search(index + 1):
                return True
            placed.pop()
        return False

    if search(0):
        return placed
    raise NoPath(*_explain(chain, proxies, state))


_DOWN = ProxyLoad(healthy=False)


def _explain(chain: Sequence[Service], proxies: Sequence[Proxy],
             state: Mapping[str, ProxyLoad]) -> tuple[str, str]:
    """(service, reason) for the error message and the DNS answer's extended error."""
    for index, service in enumerate(chain):
        offering = [p for p in proxies if service.name in p.services]
        if not offering:
            return service.name, f"no proxy offers {service.name}"
        healthy = [p for p in offering if state.get(p.name, _DOWN).healthy]
        if not healthy:
            return service.name, (f"no healthy proxy offers {service.name} (down: "
                                  f"{', '.join(p.name for p in offering)})")
        if index == len(chain) - 1 and not any(p.last_hop for p in healthy):
            return service.name, (f"no healthy proxy on the servers' return path (last_hop) "
                                  f"offers {service.name}")
    return chain[-1].name, ("no assignment puts consecutive functions on different proxies "
                            f"for {', '.join(s.name for s in chain)}")
