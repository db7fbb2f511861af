"""The DNS query convention (pipes/controller/dnsquery.py): parsing requests, building
answers and errors, and the client-side parser, on real dnspython messages."""
import ipaddress

import dns.edns
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import given, strategies as st

from srv6pipes.controller import dnsquery
from srv6pipes.controller.dnsquery import Answer, QueryError
from srv6pipes.srh import SRH

A = ipaddress.IPv6Address
RESULT = Answer(A("fd00:d::1"), A("fd00:a1::b:1"), ("encrypt", "decrypt"), 300, 96)


def query(name, qtype="TXT", **kw):
    return dns.message.make_query(name, qtype, **kw)


def test_parse_request():
    request = dnsquery.parse_query(query("Encrypt.decrypt._PIPES.www.campus.lab."))
    assert request.chain == ("encrypt", "decrypt")
    assert request.server == dns.name.from_text("www.campus.lab.")
    assert request.qtype == dns.rdatatype.TXT
    assert dnsquery.parse_query(query("www.campus.lab.", "AAAA")) is None


@pytest.mark.parametrize("name, rcode, text", [
    ("_pipes.www.campus.lab.", dns.rcode.NXDOMAIN, "no function"),
    ("bad_label._pipes.www.campus.lab.", dns.rcode.NXDOMAIN, "not a function name"),
    ("encrypt._pipes.", dns.rcode.NXDOMAIN, "no server name"),
])
def test_invalid_requests(name, rcode, text):
    with pytest.raises(QueryError, match=text) as invalid:
        dnsquery.parse_query(query(name))
    assert invalid.value.rcode == rcode


def test_not_a_query_or_not_in():
    message = query("dpi._pipes.www.campus.lab.")
    message.set_opcode(dns.opcode.UPDATE)
    with pytest.raises(QueryError) as invalid:
        dnsquery.parse_query(message)
    assert invalid.value.rcode == dns.rcode.NOTIMP
    chaos = dns.message.make_query("dpi._pipes.www.campus.lab.", "TXT", "CH")
    with pytest.raises(QueryError) as invalid:
        dnsquery.parse_query(chaos)
    assert invalid.value.rcode == dns.rcode.REFUSED


@pytest.mark.parametrize("qtype", ["TXT", "AAAA"])
def test_answers_round_trip_through_the_client_parser(qtype):
    q = dnsquery.make_query("www.campus.lab", ["encrypt", "decrypt"], dns.rdatatype.from_text(qtype))
    request = dnsquery.parse_query(q)
    wire = dnsquery.answer(q, request, RESULT, 30).to_wire()
    response = dns.message.from_wire(wire)
    assert response.flags & dns.flags.AA
    parsed, ttl = dnsquery.parse_answer(response)
    assert parsed == RESULT and ttl == 30
    if qtype == "AAAA":
        assert [str(r) for r in response.answer[0]] == ["fd00:d::1"]


def test_private_type_carries_the_client_srh():
    q = query("encrypt.decrypt._pipes.www.campus.lab.", dnsquery.TYPE_SRH)
    response = dnsquery.answer(q, dnsquery.parse_query(q), RESULT, 30)
    rdata = dns.message.from_wire(response.to_wire()).answer[0][0]
    srh = SRH.parse(rdata.data)
    assert srh.path == [A("fd00:a1::b:1"), A("fd00:d::1")] and srh.segments_left == 1


def test_other_types_get_no_data():
    q = query("encrypt.decrypt._pipes.www.campus.lab.", "MX")
    response = dnsquery.answer(q, dnsquery.parse_query(q), RESULT, 30)
    assert response.rcode() == dns.rcode.NOERROR and not response.answer


def test_errors_explain_themselves_when_edns_allows():
    q = query("encrypt._pipes.www.campus.lab.", use_edns=0)
    response = dns.message.from_wire(dnsquery.error(q, dns.rcode.REFUSED,
                                                    dns.edns.EDECode.PROHIBITED,
                                                    "policy: no grant").to_wire())
    assert response.rcode() == dns.rcode.REFUSED
    with pytest.raises(dnsquery.AnswerError, match="REFUSED: policy: no grant") as refused:
        dnsquery.parse_answer(response)
    assert refused.value.rcode == dns.rcode.REFUSED
    plain = dnsquery.error(query("encrypt._pipes.www.campus.lab."), dns.rcode.NXDOMAIN, 0, "x")
    assert plain.edns < 0 and plain.rcode() == dns.rcode.NXDOMAIN


def test_query_name_validation():
    assert str(dnsquery.query_name("www.campus.lab.", ["dpi"])) == "dpi._pipes.www.campus.lab."
    with pytest.raises(ValueError, match="not a function name"):
        dnsquery.query_name("www", ["Bad Name"])
    with pytest.raises(ValueError, match="at least one"):
        dnsquery.query_name("www", [])


def test_client_parser_refuses_unusable_answers():
    q = query("dpi._pipes.www.campus.lab.")
    empty = dns.message.make_response(q)
    with pytest.raises(dnsquery.AnswerError, match="no srv6pipes TXT"):
        dnsquery.parse_answer(empty)
    broken = dns.message.make_response(q)
    broken.answer.append(dns.rrset.from_text(q.question[0].name, 5, "IN", "TXT",
                                             '"v=srv6pipes1" "bsid=nope"'))
    with pytest.raises(dnsquery.AnswerError, match="malformed"):
        dnsquery.parse_answer(broken)


@given(st.lists(st.from_regex(r"[a-z0-9][a-z0-9-]{0,30}", fullmatch=True), min_size=1,
                max_size=8))
def test_any_valid_chain_round_trips(chain):
    request = dnsquery.parse_query(dnsquery.make_query("www.campus.lab", chain))
    assert request.chain == tuple(chain)
