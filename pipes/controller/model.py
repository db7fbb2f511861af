"""The controller's configuration: one TOML file, validated into immutable objects (no I/O
but reading the file).

Sections (every key is listed, with its default, in SETTINGS and in docs/control-plane.md)::

    [controller]                    # how the controller runs (SETTINGS)
    [services]                      # what clients ask for, by name: function id + params
    encrypt = { function = 5, params = 1 }
    [[proxy]]                       # every pipesd: locator, address plan, services, health
    [[router]]                      # every access router: client prefixes, binding block, agent
    [zone]                          # the server names the controller answers for
    [[grant]]                       # policy: which client prefixes may use which chains

A *service* is what a client names in a query ("encrypt"); the operator decides which
function id and parameters it stands for (the paper's key id for encrypt, the zlib level
for compress), so clients never choose parameters. Policy is default deny: a chain is
allowed for a client only if a grant whose prefixes contain the client, and whose
servers include the server's name, lists exactly that chain.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from typing import Any, Callable, Optional

from ..addressplan import AddressError, AddressPlan
from ..system import STATE_DIR

__all__ = ["ConfigError", "ControllerConfig", "Grant", "Proxy", "Router", "Service", "load",
           "parse"]

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")        # services, proxies, routers
LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")  # a DNS label
MAX_CHAIN = 8


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the section and key."""


def endpoint(value: Any) -> tuple[str, int]:
    """``[addr]:port`` -> (addr, port)."""
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})", str(value))
    if not match or not 1 <= int(match.group(2)) <= 65535:
        raise ValueError(f"must be [IPv6 address]:port, got {value!r}")
    ipaddress.IPv6Address(match.group(1))
    return match.group(1), int(match.group(2))


def _positive(kind: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def validate(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"must be a number, got {value!r}")
        number = kind(value)
        if number <= 0:
            raise ValueError(f"must be positive, got {value!r}")
        return number
    return validate


def short_name(value: Any) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValueError(f"must be 1-31 characters a-z, 0-9, '-', got {value!r}")
    return value


def _endpoints(value: Any) -> tuple[tuple[str, int], ...]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("needs at least one [address]:port")
    return tuple(endpoint(item) for item in items)


def log_level(value: Any) -> str:
    if value not in ("debug", "info", "warning", "error"):
        raise ValueError(f"must be debug, info, warning or error, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Setting:
    """One key of [controller]: its default (None: required) and validator."""

    name: str
    default: Any
    validator: Callable[[Any], Any]
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("name", "controller", short_name, "instance name (control socket, logs)"),
    Setting("dns", None, _endpoints,
            "[address]:port list the DNS front end answers on, UDP and TCP"),
    Setting("control", "", str, "control socket (default /run/srv6pipes/controller-NAME.sock)"),
    Setting("agent_key", None, str,
            "file with the key shared with the access-router agents (hex, >= 16 bytes)"),
    Setting("ttl", 30, _positive(int), "TTL (seconds) of DNS answers"),
    Setting("binding_lifetime", 300, _positive(float),
            "seconds a binding lives after the last lookup that used it (>= ttl)"),
    Setting("probe_interval", 0.5, _positive(float), "seconds between health probes"),
    Setting("probe_timeout", 1.0, _positive(float), "seconds a probe may take"),
    Setting("probe_failures", 2, _positive(int),
            "consecutive failed probes before a proxy counts as down"),
    Setting("sync_interval", 5.0, _positive(float),
            "seconds between full binding syncs to every agent (changes go at once)"),
    Setting("agent_timeout", 3.0, _positive(float), "seconds an agent request may take"),
    Setting("max_queries_per_second", 20000, _positive(int),
            "DNS queries handled per second before more are dropped and counted"),
    Setting("log_level", "info", log_level, "log verbosity"),
)


@dataclasses.dataclass(frozen=True)
class Service:
    """A function clients may ask for by name: which function id, with which parameters."""

    name: str
    function_id: int
    params: int


@dataclasses.dataclass(frozen=True)
class Proxy:
    """One pipesd. ``last_hop``: the servers' replies to clients cross it, so it may be the
    last proxy of a chain (a transparent proxy must see the replies of its onward
    connections; pipesd's on-path mode relies on routing for that)."""

    name: str
    plan: AddressPlan
    services: frozenset[str]
    health: tuple[str, int]
    last_hop: bool

    def address(self, service: Service):
        return self.plan.encode(service.function_id, service.params)


@dataclasses.dataclass(frozen=True)
class Router:
    """One access router and its agent. ``hmac``: it signs the SRHs it inserts (40 bytes
    more per packet, and proxies can require it)."""

    name: str
    clients: tuple[ipaddress.IPv6Network, ...]
    block: ipaddress.IPv6Network
    agent: tuple[str, int]
    hmac: bool


@dataclasses.dataclass(frozen=True)
class Grant:
    """Policy: clients in ``clients`` may reach ``servers`` (names; None: any) through
    exactly the chains listed."""

    name: str
    clients: tuple[ipaddress.IPv6Network, ...]
    servers: Optional[frozenset[str]]
    chains: frozenset[tuple[str, ...]]


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    settings: dict[str, Any]
    services: dict[str, Service]
    proxies: tuple[Proxy, ...]
    routers: tuple[Router, ...]
    grants: tuple[Grant, ...]
    origin: str                                  # the zone, e.g. "campus.lab."
    names: dict[str, ipaddress.IPv6Address]       # relative name -> server address
    upstream: Optional[tuple[str, int]]
    path: Optional[str] = None


def _section(data: dict, key: str, kind: type) -> Any:
    value = data.get(key, kind())
    if not isinstance(value, kind):
        raise ConfigError(f"[{key}] must be a {'table' if kind is dict else 'list of tables'}")
    return value


def field_value(where: str, table: dict, key: str, validate: Callable[[Any], Any],
           default: Any = ...) -> Any:
    if key not in table:
        if default is ...:
            raise ConfigError(f"{where}: {key} is required")
        return default
    try:
        return validate(table[key])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {key} {exc}") from None


def _prefixes(value: Any) -> tuple[ipaddress.IPv6Network, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list of IPv6 prefixes")
    return tuple(ipaddress.IPv6Network(item) for item in value)


def reject_unknown(where: str, table: dict, known: set[str]) -> None:
    extra = set(table) - known
    if extra:
        raise ConfigError(f"{where}: unknown keys {', '.join(sorted(extra))}")


def parse(data: dict, path: Optional[str] = None) -> ControllerConfig:
    """Validates a parsed TOML document. Raises ConfigError naming what is wrong."""
    reject_unknown("configuration", data, {"controller", "services", "proxy", "router", "zone",
                                     "grant"})
    raw = _section(data, "controller", dict)
    reject_unknown("[controller]", raw, {s.name for s in SETTINGS})
    settings = {}
    for setting in SETTINGS:
        required = setting.default is None
        settings[setting.name] = field_value("[controller]", raw, setting.name, setting.validator,
                                        ... if required else setting.default)
    if not settings["control"]:
        settings["control"] = str(STATE_DIR / f"controller-{settings['name']}.sock")
    if settings["binding_lifetime"] < settings["ttl"]:
        raise ConfigError("[controller]: binding_lifetime must be at least ttl (a client "
                          "may use an answer for ttl seconds)")

    services = {}
    for name, table in _section(data, "services", dict).items():
        where = f"[services] {name}"
        try:
            short_name(name)
        except ValueError as exc:
            raise ConfigError(f"{where}: the name {exc}") from None
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: must be {{ function = ID, params = N }}")
        reject_unknown(where, table, {"function", "params"})
        function_id = field_value(where, table, "function", _nonnegative)
        params = field_value(where, table, "params", _nonnegative, 0)
        services[name] = Service(name, function_id, params)
    if not services:
        raise ConfigError("[services]: at least one service is needed")

    proxies = []
    for index, table in enumerate(_section(data, "proxy", list)):
        where = f"[[proxy]] #{index + 1}"
        reject_unknown(where, table, {"name", "locator", "function_bits", "param_bits", "services",
                                "health", "last_hop"})
        name = field_value(where, table, "name", short_name)
        where = f"[[proxy]] {name}"
        try:
            plan = AddressPlan(field_value(where, table, "locator", str),
                               field_value(where, table, "function_bits", int, 16),
                               field_value(where, table, "param_bits", int, 32))
        except AddressError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        offered = field_value(where, table, "services", _string_list)
        for service in offered:
            if service not in services:
                raise ConfigError(f"{where}: service {service!r} is not in [services]")
            try:
                plan.encode(services[service].function_id, services[service].params)
            except AddressError as exc:
                raise ConfigError(f"{where}: service {service!r} does not fit its address "
                                  f"plan: {exc}") from None
        proxies.append(Proxy(name, plan, frozenset(offered),
                             field_value(where, table, "health", endpoint),
                             field_value(where, table, "last_hop", _bool, True)))
    _unique("[[proxy]]", [p.name for p in proxies])
    _disjoint("[[proxy]] locators", [(p.name, p.plan.locator) for p in proxies])

    routers = []
    for index, table in enumerate(_section(data, "router", list)):
        where = f"[[router]] #{index + 1}"
        reject_unknown(where, table, {"name", "clients", "block", "agent", "hmac"})
        name = field_value(where, table, "name", short_name)
        where = f"[[router]] {name}"
        block = field_value(where, table, "block", ipaddress.IPv6Network)
        if block.num_addresses < 2:
            raise ConfigError(f"{where}: block {block} holds no binding (its first address "
                              "is never handed out)")
        routers.append(Router(name, field_value(where, table, "clients", _prefixes), block,
                              field_value(where, table, "agent", endpoint),
                              field_value(where, table, "hmac", _bool, True)))
    _unique("[[router]]", [r.name for r in routers])
    _disjoint("[[router]] client prefixes", [(r.name, c) for r in routers for c in r.clients])
    _disjoint("[[router]] blocks", [(r.name, r.block) for r in routers])

    zone = _section(data, "zone", dict)
    reject_unknown("[zone]", zone, {"origin", "names", "upstream"})
    origin = field_value("[zone]", zone, "origin", _origin, "")
    names = {}
    for name, address in field_value("[zone]", zone, "names", _table, {}).items():
        labels = name.split(".")
        if not all(LABEL_RE.match(label) for label in labels) or "_pipes" in labels:
            raise ConfigError(f"[zone] names: {name!r} is not a host name")
        try:
            names[name.lower()] = ipaddress.IPv6Address(address)
        except ValueError:
            raise ConfigError(f"[zone] names: {name} = {address!r} is not an IPv6 address") from None
    if names and not origin:
        raise ConfigError("[zone]: names need an origin (the zone they are in)")
    upstream = field_value("[zone]", zone, "upstream", endpoint, None)

    grants = []
    for index, table in enumerate(_section(data, "grant", list)):
        where = f"[[grant]] #{index + 1}"
        reject_unknown(where, table, {"name", "clients", "servers", "chains"})
        name = field_value(where, table, "name", short_name)
        where = f"[[grant]] {name}"
        servers = field_value(where, table, "servers", _string_list, ["*"])
        chains = field_value(where, table, "chains", _chains)
        for chain in chains:
            for service in chain:
                if service not in services:
                    raise ConfigError(f"{where}: chain {list(chain)} names service "
                                      f"{service!r}, which is not in [services]")
        for server in servers:
            if server != "*" and server.lower() not in names:
                raise ConfigError(f"{where}: server {server!r} is not in [zone] names")
        grants.append(Grant(name, field_value(where, table, "clients", _prefixes),
                            None if "*" in servers else frozenset(s.lower() for s in servers),
                            frozenset(chains)))
    return ControllerConfig(settings, services, tuple(proxies), tuple(routers), tuple(grants),
                            origin, names, upstream, path)


def load(path: str) -> ControllerConfig:
    """Reads and validates the TOML file; raises ConfigError (also for I/O and syntax)."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    config = parse(data, os.path.abspath(path))
    return config


def _nonnegative(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"must be an integer >= 0, got {value!r}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _table(value: Any) -> dict:
    if not isinstance(value, dict):
        raise ValueError("must be a table")
    return value


def _string_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError("must be a list of strings")
    return value


def _chains(value: Any) -> list[tuple[str, ...]]:
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list of chains (lists of service names)")
    chains = []
    for chain in value:
        if not isinstance(chain, list) or not 1 <= len(chain) <= MAX_CHAIN \
                or not all(isinstance(item, str) for item in chain):
            raise ValueError(f"each chain is a list of 1..{MAX_CHAIN} service names, "
                             f"got {chain!r}")
        chains.append(tuple(chain))
    return chains


def _origin(value: Any) -> str:
    text = str(value).strip(".").lower()
    if not text or not all(LABEL_RE.match(label) for label in text.split(".")):
        raise ValueError(f"must be a domain name, got {value!r}")
    return text + "."


def _unique(where: str, names: list[str]) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"{where}: name {name!r} is used twice")
        seen.add(name)


def _disjoint(where: str, prefixes: list[tuple[str, ipaddress.IPv6Network]]) -> None:
    for i, (name_a, a) in enumerate(prefixes):
        for name_b, b in prefixes[i + 1:]:
            if a.overlaps(b):
                raise ConfigError(f"{where}: {a} ({name_a}) overlaps {b} ({name_b})")
