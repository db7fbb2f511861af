"""The controller's configuration (pipes/controller/model.py), policy (policy.py) and
path computation (pathcomp.py): pure logic."""
import copy
import ipaddress

import pytest
from hypothesis import given, strategies as st

from srv6pipes.controller import model, policy
from srv6pipes.controller.model import ConfigError
from srv6pipes.controller.pathcomp import NoPath, ProxyLoad, compute_path

from tests.unit.controller_config import BASE, config

A = ipaddress.IPv6Address


@pytest.fixture
def cfg():
    return model.parse(copy.deepcopy(BASE))


def test_parse_fills_defaults(cfg):
    assert cfg.settings["control"] == "/run/srv6pipes/controller-unit.sock"
    assert cfg.settings["probe_failures"] == 2
    assert cfg.origin == "campus.lab."
    assert cfg.names["www"] == A("fd00:d::1")
    p1 = cfg.proxies[0]
    assert p1.address(cfg.services["encrypt"]) == A("fc00:1::5:0:1")
    assert not p1.last_hop and cfg.proxies[2].last_hop
    assert cfg.routers[0].hmac and not cfg.routers[1].hmac
    assert cfg.grants[1].servers == frozenset({"www"}) and cfg.grants[0].servers is None


@pytest.mark.parametrize("change, message", [
    ({"controller": {"dns": ["[::1]:53"], "agent_key": "k", "ttl": 0}}, r"ttl must be positive"),
    ({"controller": {"dns": ["::1:53"], "agent_key": "k"}}, r"dns must be \[IPv6 address\]:port"),
    ({"controller": {"agent_key": "k"}}, r"\[controller\]: dns is required"),
    ({"controller": {"dns": "[::1]:53", "agent_key": "k", "bogus": 1}}, r"unknown keys bogus"),
    ({"controller": {"dns": "[::1]:53", "agent_key": "k", "ttl": 60, "binding_lifetime": 30}},
     r"binding_lifetime must be at least ttl"),
    ({"services": {"Bad Name": {"function": 1}}}, r"\[services\] Bad Name: the name must be"),
    ({"services": {"x": {"function": -1}}}, r"function must be an integer >= 0"),
    ({"services": {}}, r"at least one service"),
    ({"proxy": [{**BASE["proxy"][0], "services": ["nope"]}]}, r"service 'nope' is not in"),
    ({"proxy": [{**BASE["proxy"][0], "locator": "fc00:1::/130"}]}, r"\[\[proxy\]\] p1: locator"),
    ({"proxy": [BASE["proxy"][0], {**BASE["proxy"][1], "locator": "fc00:1::/64"}]},
     r"fc00:1::/64 \(p2\) overlaps|overlaps fc00:1::/64"),
    ({"proxy": [BASE["proxy"][0], BASE["proxy"][0]]}, r"name 'p1' is used twice"),
    ({"proxy": [{**BASE["proxy"][0], "function_bits": 1}]}, r"does not fit its address plan"),
    ({"router": [{**BASE["router"][0], "block": "fd00:a1::b:0/128"}]}, r"holds no binding"),
    ({"router": [BASE["router"][0], {**BASE["router"][1], "clients": ["fd00:c1::/48"]}]},
     r"client prefixes: .* overlaps"),
    ({"zone": {"origin": "campus.lab", "names": {"_pipes": "fd00::1"}}}, r"is not a host name"),
    ({"zone": {"names": {"www": "fd00::1"}}}, r"names need an origin"),
    ({"grant": [{"name": "g", "clients": ["fd00::/8"], "chains": [["nope"]]}]},
     r"names service 'nope'"),
    ({"grant": [{"name": "g", "clients": ["fd00::/8"], "servers": ["ftp"], "chains": [["dpi"]]}]},
     r"server 'ftp' is not in \[zone\] names"),
    ({"grant": [{"name": "g", "clients": ["fd00::/8"], "chains": [[]]}]}, r"1..8 service names"),
    ({"extra": {}}, r"unknown keys extra"),
])
def test_configuration_errors_name_the_key(change, message):
    with pytest.raises(ConfigError, match=message):
        model.parse(config(**change))


def test_load_reports_syntax_errors(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[controller\n")
    with pytest.raises(ConfigError, match="cannot read"):
        model.load(str(path))


def test_access_router_and_grants(cfg):
    access = policy.access_router(cfg.routers, A("fd00:c1::7"))
    assert access.router.name == "a1" and access.prefix == ipaddress.IPv6Network("fd00:c1::/64")
    assert policy.access_router(cfg.routers, A("fd00:e::1")) is None
    staff, students = A("fd00:c1::7"), A("fd00:c2::7")
    assert policy.authorize(cfg.grants, staff, "www", ("encrypt", "decrypt")).name == "staff"
    assert policy.authorize(cfg.grants, staff, "intranet", ("dpi",)).name == "staff"
    # Default deny: another chain, order matters, another server, another prefix.
    assert policy.authorize(cfg.grants, staff, "www", ("decrypt", "encrypt")) is None
    assert policy.authorize(cfg.grants, students, "www", ("encrypt", "decrypt")) is None
    assert policy.authorize(cfg.grants, students, "intranet", ("dpi",)) is None
    assert policy.authorize(cfg.grants, students, "www", ("count", "dpi")).name == "students"
    assert policy.authorize(cfg.grants, A("fd00:e::1"), "www", ("dpi",)) is None


def loads(**flows):
    state = {name: ProxyLoad(True) for name in ("p1", "p2", "p3")}
    for name, value in flows.items():
        state[name] = ProxyLoad(value is not None, value or 0)
    return state


def chain(cfg, *names):
    return [cfg.services[name] for name in names]


def test_path_prefers_the_least_loaded_and_respects_last_hop(cfg):
    path = compute_path(chain(cfg, "encrypt", "decrypt"), cfg.proxies, loads(p1=5, p2=1), "k")
    assert [p.name for p in path] == ["p2", "p3"]
    path = compute_path(chain(cfg, "encrypt", "decrypt"), cfg.proxies, loads(p1=0, p2=9), "k")
    assert [p.name for p in path] == ["p1", "p3"]
    # Only p3 may end a chain: [xor, xor] puts the first xor elsewhere even if p3 is idle.
    path = compute_path(chain(cfg, "xor", "xor"), cfg.proxies, loads(p1=9, p2=9, p3=0), "k")
    assert [p.name for p in path][1] == "p3" and path[0].name in ("p1", "p2")


def test_failover_and_no_path(cfg):
    path = compute_path(chain(cfg, "encrypt", "decrypt"), cfg.proxies, loads(p1=None), "k")
    assert [p.name for p in path] == ["p2", "p3"]
    with pytest.raises(NoPath, match="no healthy proxy offers encrypt") as nopath:
        compute_path(chain(cfg, "encrypt", "decrypt"), cfg.proxies, loads(p1=None, p2=None), "k")
    assert nopath.value.service == "encrypt"
    with pytest.raises(NoPath, match="on the servers' return path"):
        compute_path(chain(cfg, "count"), cfg.proxies, loads(), "k")
    with pytest.raises(NoPath, match="no proxy offers"):
        compute_path([model.Service("ghost", 99, 0)], cfg.proxies, loads(), "k")
    with pytest.raises(NoPath, match="consecutive functions"):
        compute_path(chain(cfg, "dpi", "dpi"), cfg.proxies, loads(), "k")


@given(p1=st.integers(0, 50), p2=st.integers(0, 50), key=st.text(max_size=20))
def test_path_is_deterministic_and_picks_a_minimum(p1, p2, key):
    cfg = model.parse(copy.deepcopy(BASE))
    first = compute_path(chain(cfg, "encrypt", "decrypt"), cfg.proxies, loads(p1=p1, p2=p2), key)
    again = compute_path(chain(cfg, "encrypt", "decrypt"), cfg.proxies, loads(p1=p1, p2=p2), key)
    assert first == again
    chosen = {"p1": p1, "p2": p2}[first[0].name]
    assert chosen == min(p1, p2)


def test_equal_load_spreads_by_key(cfg):
    chosen = {compute_path(chain(cfg, "encrypt", "decrypt"), cfg.proxies, loads(), f"k{i}")[0].name
              for i in range(40)}
    assert chosen == {"p1", "p2"}


def test_bindings_count_as_load(cfg):
    state = loads()
    state["p1"] = ProxyLoad(True, 0, bindings=3)
    path = compute_path(chain(cfg, "encrypt", "decrypt"), cfg.proxies, state, "k")
    assert path[0].name == "p2"


def test_binding_prefix_is_the_narrowest_grant(cfg):
    access = policy.access_router(cfg.routers, A("fd00:c1::7"))
    grant = model.Grant("lab", (ipaddress.IPv6Network("fd00:c1::/112"),), None,
                        frozenset({("dpi",)}))
    assert policy.binding_prefix(access, grant, A("fd00:c1::7")) == \
        ipaddress.IPv6Network("fd00:c1::/112")
    wide = model.Grant("all", (ipaddress.IPv6Network("fd00::/16"),), None, frozenset())
    assert policy.binding_prefix(access, wide, A("fd00:c1::7")) == access.prefix
