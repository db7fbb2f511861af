"""Step 4 of a flow: the onward connection, as the client (C:sport) toward the next segment.

Why more than one connect() call: a transparent proxy splits one TCP connection in two,
and the two halves close at different times. When the server closes first, the client's
leg ends as soon as this host has acknowledged the client's FIN; our onward connection
(C:sport -> S:port) then still sends its own FIN and waits one round trip for S's ACK
(LAST_ACK). A client that reuses its port at once (load generators and busy NAT gateways
do: its own socket is already closed) finds the server leg's 4-tuple still taken here, and
connect() fails with EADDRNOTAVAIL. Without a proxy that cannot happen: the client's socket
would be closing for as long as the server's. (A TIME_WAIT socket on the tuple is no
obstacle: the kernel lets a bound connect reuse it when the connection had timestamps.)

So on EADDRNOTAVAIL the worker parks the flow and retries every RETRY_INTERVAL for up to
RETRY_FOR seconds (the close takes one round trip), then gives up and resets the client.
The client already holds an established connection meanwhile; it only waits for data.
"""
from __future__ import annotations

import errno
from typing import Optional

from ._sockops import connect_onward

RETRY_INTERVAL = 0.01    # seconds between attempts while the old connection closes
RETRY_FOR = 0.5          # then the flow is reset (onward_failed)
MAX_PARKED = 1024        # flows waiting at once; beyond, new ones are reset


class TupleBusy(Exception):
    """The onward 4-tuple is still held by a previous connection that is closing."""


def connect(client_addr: bytes, client_port: int, dest_addr: bytes, dest_port: int,
            rthdr: Optional[bytes]) -> int:
    """Returns the onward socket (non-blocking connect started). Raises TupleBusy when a
    previous connection on this tuple is still closing (retry later), OSError for any
    other failure (the socket is closed then)."""
    try:
        return connect_onward(client_addr, client_port, dest_addr, dest_port, rthdr)
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            raise TupleBusy() from None
        raise
