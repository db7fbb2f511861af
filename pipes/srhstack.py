"""The SRH a proxy acts on, when an access router's binding stacked a second one (no I/O).

A client steered through a binding segment (BSID) sends ``SRH[S, BSID]`` with the BSID
active. Its access router expands the BSID with the seg6local action End.B6, which on
Linux *inserts* the policy's SRH in front of the client's without advancing it. Observed
on Linux 6.18 (tests/e2e/test_binding.py), for a policy P1 then P3::

    IPv6 src C, dst P1::f1
    SRH (outer, the policy's)  segments [BSID, P3::f3, P1::f1], segments-left 2
    SRH (inner, the client's)  segments [S, BSID],               segments-left 1
    TCP SYN

The outer header's last segment (index 0) is the BSID again: after the policy the
packet would come back to the binding node, which would expand it again. A proxy must
not forward it there. What the path means is the policy spliced into the client's path in
place of the BSID: C -> P1 -> P3 -> S. :func:`flatten` builds that one SRH::

    segments = inner[:SL_in] + outer[1:] + inner[SL_in + 1:]   (wire order, BSID dropped)
    segments-left = SL_in + SL_out - 1                         (still this proxy's segment)

so the proxy's worker needs nothing new: the table holds one ordinary SRH, and its
onward header (segments-left - 1) carries the rest of the policy, then the client's
remaining segments. The segments before the BSID stay (visited, reverse return paths use
them), the BSID itself does not (a reply must not be expanded by the binding again).

The kernel's End.VNF emulation on the proxy (mark + local table, see kernel/README.md)
walks both headers down to segments-left 0 and delivers the SYN to S; so does
TCP_SAVED_SYN show both, both at segments-left 0. :func:`flatten` handles that copy too:
it finds the BSID in the client's header by value.

HMAC (``srhhmac.py``): the access router signs the outer SRH with the client's address as
source. With a keyring, :func:`syn_route` verifies it (or requires it) and signs the
flattened SRH again with the same key id and the same source, because the onward
connection of a transparent proxy also leaves with the client's address: the next proxy
verifies the header it receives exactly like the first one did.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from . import srhhmac
from .srh import SRH, PacketInfo, SRHError

__all__ = ["SynRoute", "flatten", "syn_route"]


class SynRoute(NamedTuple):
    """What the capture stores for one SYN: the SRH this proxy acts on, as wire bytes,
    and its segments-left (this proxy's segment), plus facts for the counters."""

    segments_left: int
    wire: bytes
    srh: SRH                 # the same header, parsed (final destination, return paths)
    stacked: bool            # a binding's SRH was flattened into the client's
    hmac_key_id: Optional[int]  # the key that verified the SRH (None: not checked)


def _binding_index(outer: SRH, inner: SRH) -> int:
    """Index in the client's SRH of the binding segment the outer SRH returns to."""
    bsid = outer.segments[0]
    if inner.segments_left and inner.active_segment == bsid:
        return inner.segments_left
    # After the kernel's loop (TCP_SAVED_SYN) every segments-left is 0: find it by value.
    for index in range(inner.last_entry, 0, -1):
        if inner.segments[index] == bsid:
            return index
    raise SRHError(f"stacked SRHs: the outer SRH ends at {bsid}, which is not a segment "
                   f"of the inner SRH {[str(s) for s in inner.segments]}")


def flatten(outer: SRH, inner: SRH) -> SRH:
    """The single SRH equivalent to ``outer`` inserted by End.B6 in front of ``inner``.

    Its segments-left points at the outer header's active segment (0 when the outer
    header is exhausted, as in a TCP_SAVED_SYN copy). Flags and tag come from the outer
    (policy) header, HMAC flag cleared; TLVs from the inner (client) header, its HMAC TLV
    dropped (the segments changed: :func:`syn_route` signs the result again). Raises
    :class:`SRHError` when the outer header's last segment is not a segment of the inner
    one, or when the result would be too long.
    """
    index = _binding_index(outer, inner)
    segments = inner.segments[:index] + outer.segments[1:] + inner.segments[index + 1:]
    segments_left = index + outer.segments_left - 1 if outer.segments_left else 0
    tlvs = tuple(tlv for tlv in inner.tlvs if tlv.type != srhhmac.HMAC_TLV)
    return SRH(segments, segments_left, outer.flags & ~srhhmac.HMAC_FLAG, outer.tag, tlvs,
               inner.next_header)


def syn_route(info: PacketInfo, keyring: Optional[srhhmac.HmacKeyring] = None,
              require_hmac: bool = False) -> SynRoute:
    """The SRH this proxy acts on for a SYN parsed by :func:`srh.find_srh`.

    Called by the capture's Python path (and by the worker on a TCP_SAVED_SYN copy). With
    ``require_hmac`` the outer SRH (the one that names this proxy) must carry a valid
    HMAC of ``keyring``; with a keyring but without ``require_hmac`` an HMAC present is
    still checked (a wrong one is refused: the kernel would do the same). Raises
    :class:`srhhmac.HmacRefused` for an HMAC refused, :class:`SRHError` for stacked
    headers that do not fit together; ``info.srh`` must not be None.
    """
    outer = info.srh
    if outer is None:
        raise SRHError("the SYN carries no SRH")
    source = info.src.packed
    key_id = None
    if require_hmac or (keyring is not None and srhhmac.hmac_field(outer) is not None):
        if keyring is None:
            raise srhhmac.HmacRefused("unknown_key", "HMAC required but no keyring loaded")
        key_id = srhhmac.verify(outer, source, keyring)
    if info.inner_srh is None:
        wire = info.srh_wire if info.srh_wire is not None else outer.to_bytes()
        return SynRoute(outer.segments_left, wire, outer, False, key_id)
    flat = flatten(outer, info.inner_srh)
    if key_id is not None:
        flat = srhhmac.sign(flat, source, key_id, keyring.secret(key_id))
    return SynRoute(flat.segments_left, flat.to_bytes(), flat, True, key_id)

