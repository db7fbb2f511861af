"""The DNS query convention of the SRv6Pipes controller, both ways, without I/O.

A client asks for server ``www.campus.lab`` through ``encrypt`` then ``decrypt`` by
looking up::

    encrypt.decrypt._pipes.www.campus.lab.      (functions in travel order, then the
                                                 label _pipes, then the server's name)

``_pipes`` cannot clash with a host name (underscore labels are reserved for such uses,
as in ``_tcp``); function labels are service names of the controller (``[services]``).
Any resolver or tool can send it; the answer depends on the query type:

=============  ============================================================================
type           answer section
=============  ============================================================================
TXT            ``"v=srv6pipes1" "bsid=BSID" "server=S" "chain=f1,f2" "lifetime=N"
               "overhead=B"``: the binding segment, the server's address, the chain, the
               seconds the binding lives after this lookup and the bytes the access
               router's SRH adds to every packet (lower the MTU by this plus your own SRH)
AAAA           the server's address (so ``getaddrinfo`` of the composed name works); the
               same TXT record goes in the additional section
TYPE65280      the SRH to put on the socket, as raw RDATA (``\\# 40 ...``): SRH[S, BSID]
               with the BSID active, ready for IPV6_RTHDR (the private type the SRN
               prototype used, RFC 6895's private range)
anything else  no data (NOERROR, empty answer)
=============  ============================================================================

Errors: a refused policy is REFUSED, an unknown function or server name NXDOMAIN, no
healthy proxy or a full binding block SERVFAIL; when the query carried EDNS, an Extended
DNS Error (RFC 8914) says why in words (``dig`` prints it). Queries that cannot be parsed
are dropped by the server (and counted), not answered.
"""
from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
from typing import Optional

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rdtypes.IN.AAAA
import dns.rrset

from ..srh import SRH

__all__ = ["PIPES_LABEL", "TYPE_SRH", "Answer", "PipesQuery", "QueryError", "answer",
           "error", "make_query", "parse_answer", "parse_query"]

PIPES_LABEL = b"_pipes"
TYPE_SRH = 65280
TXT_VERSION = "v=srv6pipes1"
FUNCTION_RE = re.compile(rb"^[a-z0-9][a-z0-9-]{0,30}$")


class QueryError(Exception):
    """A pipes query that is well-formed DNS but not a valid request: answered with
    ``rcode`` and an explanation."""

    def __init__(self, rcode: int, ede: int, text: str):
        super().__init__(text)
        self.rcode = rcode
        self.ede = ede


@dataclasses.dataclass(frozen=True)
class PipesQuery:
    """A decoded request: the chain (service names, travel order), the server's name
    (absolute) and the query type asked."""

    chain: tuple[str, ...]
    server: dns.name.Name
    qtype: int


@dataclasses.dataclass(frozen=True)
class Answer:
    """What the controller answers a granted request with."""

    server: ipaddress.IPv6Address
    bsid: ipaddress.IPv6Address
    chain: tuple[str, ...]
    lifetime: int
    overhead: int

    def txt_strings(self) -> list[str]:
        return [TXT_VERSION, f"bsid={self.bsid}", f"server={self.server}",
                f"chain={','.join(self.chain)}", f"lifetime={self.lifetime}",
                f"overhead={self.overhead}"]

    def srh(self) -> SRH:
        """The client's SRH: [BSID, S] in travel order, the BSID active."""
        return SRH.from_path([self.bsid, self.server])


def parse_query(message: dns.message.Message) -> Optional[PipesQuery]:
    """The request in ``message``, or None when its name has no ``_pipes`` label (an
    ordinary query). Raises QueryError for a pipes name that is not a valid request, and
    for a message that is not one IN question of opcode QUERY."""
    if message.opcode() != dns.opcode.QUERY:
        raise QueryError(dns.rcode.NOTIMP, dns.edns.EDECode.OTHER, "only QUERY is served")
    if len(message.question) != 1:
        raise QueryError(dns.rcode.FORMERR, dns.edns.EDECode.OTHER, "exactly one question")
    question = message.question[0]
    if question.rdclass != dns.rdataclass.IN:
        raise QueryError(dns.rcode.REFUSED, dns.edns.EDECode.NOT_SUPPORTED, "class IN only")
    labels = [label.lower() for label in question.name.labels]
    if PIPES_LABEL not in labels:
        return None
    at = labels.index(PIPES_LABEL)
    functions = labels[:at]
    server = dns.name.Name(question.name.labels[at + 1:])
    if not functions:
        raise QueryError(dns.rcode.NXDOMAIN, dns.edns.EDECode.OTHER,
                         "no function before _pipes (ask f1.f2._pipes.SERVER)")
    for label in functions:
        if not FUNCTION_RE.match(label):
            raise QueryError(dns.rcode.NXDOMAIN, dns.edns.EDECode.OTHER,
                             f"{label.decode(errors='replace')!r} is not a function name")
    if len(server.labels) <= 1:
        raise QueryError(dns.rcode.NXDOMAIN, dns.edns.EDECode.OTHER, "no server name after _pipes")
    return PipesQuery(tuple(label.decode() for label in functions), server.canonicalize(),
                      question.rdtype)


def _respond(query: dns.message.Message) -> dns.message.Message:
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    response.flags &= ~dns.flags.RA
    return response


@functools.lru_cache(maxsize=4096)
def _rdatas(result: Answer) -> tuple:
    """(TXT, AAAA, TYPE65280) rdata of an answer, built once per binding: a repeated
    lookup is the common case, and dnspython's text parsers cost most of a query."""
    txt = dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT,
                                  [s.encode() for s in result.txt_strings()])
    aaaa = dns.rdtypes.IN.AAAA.AAAA(dns.rdataclass.IN, dns.rdatatype.AAAA, str(result.server))
    srh = dns.rdata.GenericRdata(dns.rdataclass.IN, TYPE_SRH, result.srh().to_bytes())
    return txt, aaaa, srh


def answer(query: dns.message.Message, request: PipesQuery, result: Answer,
           ttl: int) -> dns.message.Message:
    """The response to a granted request (see the module docstring for the layout)."""
    response = _respond(query)
    name = query.question[0].name
    txt, aaaa, srh = _rdatas(result)
    if request.qtype == dns.rdatatype.TXT:
        response.answer.append(dns.rrset.from_rdata(name, ttl, txt))
    elif request.qtype == dns.rdatatype.AAAA:
        response.answer.append(dns.rrset.from_rdata(name, ttl, aaaa))
        response.additional.append(dns.rrset.from_rdata(name, ttl, txt))
    elif request.qtype == TYPE_SRH:
        response.answer.append(dns.rrset.from_rdata(name, ttl, srh))
    return response


def error(query: dns.message.Message, rcode: int, ede: Optional[int] = None,
          text: str = "") -> dns.message.Message:
    """A response with ``rcode`` and, if the query had EDNS, an Extended DNS Error."""
    response = _respond(query)
    response.set_rcode(rcode)
    if query.edns >= 0 and ede is not None:
        response.use_edns(0, options=[dns.edns.EDEOption(ede, text[:200] or None)])
    return response


# -- the client side -------------------------------------------------------------------


def query_name(server: str, chain: tuple[str, ...] | list[str]) -> dns.name.Name:
    """``f1.f2._pipes.SERVER.``; raises ValueError for a function that is not a label."""
    for function in chain:
        if not FUNCTION_RE.match(function.encode()):
            raise ValueError(f"{function!r} is not a function name ([a-z0-9-], 1-31 characters)")
    if not chain:
        raise ValueError("ask for at least one function")
    return dns.name.from_text(".".join([*chain, PIPES_LABEL.decode(), server.rstrip(".")]) + ".")


def make_query(server: str, chain, qtype: int = dns.rdatatype.TXT) -> dns.message.Message:
    return dns.message.make_query(query_name(server, chain), qtype, use_edns=0)


class AnswerError(Exception):
    """The controller refused the request or answered something unusable. ``rcode`` is
    the DNS rcode (or None for an unusable answer), ``reason`` its explanation."""

    def __init__(self, rcode: Optional[int], reason: str):
        super().__init__(reason)
        self.rcode = rcode
        self.reason = reason


def parse_answer(response: dns.message.Message) -> tuple[Answer, int]:
    """The controller's (Answer, TTL) from a TXT or AAAA response; raises AnswerError."""
    if response.rcode() != dns.rcode.NOERROR:
        reasons = [option.text for option in response.options
                   if isinstance(option, dns.edns.EDEOption) and option.text]
        name = dns.rcode.to_text(response.rcode())
        raise AnswerError(response.rcode(), f"{name}: {'; '.join(reasons)}" if reasons else name)
    for rrset in (*response.answer, *response.additional):
        if rrset.rdtype != dns.rdatatype.TXT:
            continue
        for rdata in rrset:
            fields = [s.decode() for s in rdata.strings]
            if TXT_VERSION not in fields:
                continue
            values = dict(f.split("=", 1) for f in fields if "=" in f)
            try:
                return Answer(ipaddress.IPv6Address(values["server"]),
                              ipaddress.IPv6Address(values["bsid"]),
                              tuple(filter(None, values.get("chain", "").split(","))),
                              int(values.get("lifetime", rrset.ttl)),
                              int(values.get("overhead", 0))), rrset.ttl
            except (KeyError, ValueError) as exc:
                raise AnswerError(None, f"malformed srv6pipes TXT record: {exc}") from None
    raise AnswerError(None, "the answer holds no srv6pipes TXT record")
