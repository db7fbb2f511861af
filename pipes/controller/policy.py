"""Who may ask for what (paper III-E), without I/O.

Called by the controller for every query, after the query was decoded and before any
path is computed. Two questions:

* :func:`access_router` - which access router serves the client (the router whose client
  prefixes contain its address; the most specific prefix wins). A client behind no known
  router gets no binding: there would be nobody to expand it.
* :func:`authorize` - default deny: the chain is allowed when at least one grant whose
  client prefixes contain the client, and whose servers include the server's name, lists
  exactly this chain (same services, same order).
"""
from __future__ import annotations

import ipaddress
from typing import Iterable, NamedTuple, Optional

from .model import Grant, Router

__all__ = ["Access", "access_router", "authorize", "binding_prefix"]


class Access(NamedTuple):
    """The client's access router and the client prefix (of that router) it is in."""

    router: Router
    prefix: ipaddress.IPv6Network


def access_router(routers: Iterable[Router], client: ipaddress.IPv6Address) -> Optional[Access]:
    best: Optional[Access] = None
    for router in routers:
        for prefix in router.clients:
            if client in prefix and (best is None or prefix.prefixlen > best.prefix.prefixlen):
                best = Access(router, prefix)
    return best


def authorize(grants: Iterable[Grant], client: ipaddress.IPv6Address, server: str,
              chain: tuple[str, ...]) -> Optional[Grant]:
    """The first grant allowing ``client`` to reach ``server`` (a name relative to the
    zone, lower case) through ``chain``; None: refused."""
    for grant in grants:
        if chain not in grant.chains:
            continue
        if grant.servers is not None and server not in grant.servers:
            continue
        if any(client in prefix for prefix in grant.clients):
            return grant
    return None


def binding_prefix(access: Access, grant: Grant,
                   client: ipaddress.IPv6Address) -> ipaddress.IPv6Network:
    """The client prefix a binding for ``client`` is granted to: the router's prefix, or
    the grant's prefix containing the client when that one is narrower (a grant for part
    of a router's prefix must not open the binding to the rest of it)."""
    narrowest = access.prefix
    for prefix in grant.clients:
        if client in prefix and prefix.prefixlen > narrowest.prefixlen:
            narrowest = prefix
    return narrowest
