"""Bad input at the control plane's edges, without a network: the controller's DNS handler
fed random and mutated packets, the agent's configuration, the route helper's --via."""
import copy
import ipaddress

import dns.message
import dns.rcode
import pytest
from hypothesis import given, settings, strategies as st

from srv6pipes.agent.service import load_config
from srv6pipes.client import Resolution, ResolveError, parse_endpoint
from srv6pipes.controller import dnsquery, model
from srv6pipes.controller.model import ConfigError
from srv6pipes.controller.service import Controller, policy_overhead
from srv6pipes.routehelper import RouteError, parse_via

from tests.unit.controller_config import BASE

A = ipaddress.IPv6Address
STAFF = A("fd00:c1::1")
STUDENT = A("fd00:c2::1")


def make_controller(directory):
    """A controller that has not probed anything yet (every proxy counts as down)."""
    key = directory / "agent.key"
    key.write_text("ab" * 16)
    key.chmod(0o600)
    data = copy.deepcopy(BASE)
    data["controller"]["agent_key"] = str(key)
    data["controller"]["name"] = "fuzz"
    return Controller(model.parse(data))


@pytest.fixture(scope="module")
def controller(tmp_path_factory):
    return make_controller(tmp_path_factory.mktemp("ctl"))


def ask(controller, name, qtype="TXT", client=STAFF):
    wire = dns.message.make_query(name, qtype, use_edns=0).to_wire()
    response = controller.handle_dns(wire, client)
    assert isinstance(response, bytes), response
    return dns.message.from_wire(response)


@given(st.binary(max_size=600))
@settings(max_examples=300)
def test_random_packets_never_raise(controller, data):
    result = controller.handle_dns(data, STAFF)
    assert result is None or isinstance(result, bytes)


VALID = dnsquery.make_query("www.campus.lab", ["dpi"]).to_wire()


@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1,
                max_size=8))
@settings(max_examples=300)
def test_mutated_queries_never_raise(controller, flips):
    data = bytearray(VALID)
    for index, value in flips:
        data[index] = value
    result = controller.handle_dns(bytes(data), STUDENT)
    # A valid query from the student may start a binding (a coroutine): close it unawaited.
    if hasattr(result, "close"):
        result.close()
    assert result is None or isinstance(result, bytes) or hasattr(result, "send")


def test_answers_that_need_no_binding(tmp_path):
    controller = make_controller(tmp_path)
    assert ask(controller, "www.campus.lab.", "AAAA").answer[0][0].address == "fd00:d::1"
    assert ask(controller, "ftp.campus.lab.", "AAAA").rcode() == dns.rcode.NXDOMAIN
    assert ask(controller, "example.org.", "AAAA").rcode() == dns.rcode.REFUSED  # no upstream
    refused = ask(controller, "encrypt.decrypt._pipes.www.campus.lab.", client=STUDENT)
    assert refused.rcode() == dns.rcode.REFUSED
    assert "policy" in refused.options[0].text
    assert ask(controller, "rot13._pipes.www.campus.lab.").rcode() == dns.rcode.NXDOMAIN
    assert ask(controller, "dpi._pipes.www.campus.lab.",
               client=A("fd00:e::1")).rcode() == dns.rcode.REFUSED
    not_ready = ask(controller, "dpi._pipes.intranet.campus.lab.")
    assert not_ready.rcode() == dns.rcode.SERVFAIL and "not reached" in not_ready.options[0].text
    controller.links["a1"].adopted = True   # as if the agent had told us what it holds
    nopath = ask(controller, "dpi._pipes.intranet.campus.lab.")  # nothing probed: all down
    assert nopath.rcode() == dns.rcode.SERVFAIL and "no healthy proxy" in nopath.options[0].text
    response = dns.message.make_response(dns.message.make_query("x.campus.lab.", "A"))
    assert controller.handle_dns(response.to_wire(), STAFF) is None   # a response: dropped
    counters = controller.counters
    assert counters["refused"] == 3 and counters["nxdomain"] == 2 and counters["not_a_query"] == 1
    assert counters["no_path"] == 1 and counters["agent_not_ready"] == 1


def test_policy_overhead():
    assert policy_overhead(2, True) == 8 + 3 * 16 + 40 == 96
    assert policy_overhead(1, False) == 40


def test_agent_configuration(tmp_path):
    path = tmp_path / "agent.toml"
    good = ('[agent]\nname = "a1"\nlisten = "[fd00:a1::1]:7200"\nkey = "/k"\n'
            'block = "fd00:a1::b:0/112"\nclient_interfaces = ["eth1"]\n')
    path.write_text(good)
    config = load_config(str(path))
    assert config["control"] == "/run/srv6pipes/agent-a1.sock" and config["behaviour"] == "End.B6"
    for text, message in [
        (good.replace('name = "a1"', 'name = "a-1"'), r"name must be 1-24 letters"),
        (good.replace("[fd00:a1::1]:7200", "fd00:a1::1:7200"), r"listen must be"),
        (good + 'hmac_keyring = "/x"\n', r"hmac_keyring and hmac_key_id go together"),
        (good + "hmac_key_id = 0\nhmac_keyring = \"/x\"\n", r"go together|key id"),
        (good + 'behaviour = "End.X"\n', r"End.B6 or End.B6.Encaps"),
        (good + "extra = 1\n", r"unknown keys extra"),
        (good.replace("client_interfaces = [\"eth1\"]\n", ""), r"client_interfaces is required"),
        ("[agent\n", r"cannot read"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(str(path))


def test_route_helper_via_forms():
    assert parse_via("fc00:1::/80:xor:42") == A("fc00:1::1:0:2a")
    assert parse_via("fc00:1::/80:3:0x6") == A("fc00:1::3:0:6")
    assert parse_via("fc00:1::/80:identity") == A("fc00:1::")
    assert parse_via("fc00:1::1:0:2a") == A("fc00:1::1:0:2a")
    for text, message in [("fc00:1::/80", "expected LOCATOR:FUNCTION"),
                          ("fc00:1::/80:nosuch", "no built-in function"),
                          ("fc00:1::/80:xor:0x100000000", "does not fit"),
                          ("fc00:1::/130:xor", "--via")]:
        with pytest.raises(RouteError, match=message):
            parse_via(text)


def test_client_mss_and_endpoints():
    answer = dnsquery.Answer(A("fd00:d::1"), A("fd00:a1::b:1"), ("dpi",), 300, 96)
    resolution = Resolution(answer, 30, 0.0)
    assert resolution.mss(1500) == 1500 - 40 - 20 - 40 - 96
    assert parse_endpoint("[fd00:e::1]:53") == ("fd00:e::1", 53)
    with pytest.raises(ResolveError, match="expected"):
        parse_endpoint("fd00:e::1:53")


def test_repeated_questions_are_answered_from_the_cache_while_the_binding_lives(tmp_path):
    import time

    from srv6pipes.controller.bindings import BindingKey

    controller = make_controller(tmp_path)
    controller.links["a1"].adopted = True
    key = BindingKey("a1", ipaddress.IPv6Network("fd00:c1::/64"), A("fd00:d::1"), ("xor", "xor"))
    entry = controller.table.create(key, [A("fc00:1::1:0:2a"), A("fc00:3::1:0:2a")], ["p1", "p3"],
                                    "t", time.monotonic() + 1)
    entry.confirmed = True
    query = dnsquery.make_query("www.campus.lab", ["xor", "xor"])
    first = controller.handle_dns(query.to_wire(), STAFF)
    query.id = (query.id + 1) & 0xFFFF
    second = controller.handle_dns(query.to_wire(), STAFF)
    assert controller.counters["answered_from_cache"] == 1
    assert second[:2] == query.to_wire()[:2] and second[2:] == first[2:]
    assert dnsquery.parse_answer(dns.message.from_wire(second))[0].bsid == entry.binding.bsid
    assert entry.expires_at > time.monotonic() + 100          # the lookup refreshed it
    # Another client, or the binding rerouted: not from the cache.
    controller.handle_dns(query.to_wire(), A("fd00:c1::2"))
    entry.generation += 1
    controller.handle_dns(query.to_wire(), STAFF)
    assert controller.counters["answered_from_cache"] == 1
    # Gone (expired or revoked): the question is decided again, and refused here (p1 down).
    controller.table.remove(entry)
    again = dns.message.from_wire(controller.handle_dns(query.to_wire(), STAFF))
    assert again.rcode() == dns.rcode.SERVFAIL
