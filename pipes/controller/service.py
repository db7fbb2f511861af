"""``pipes-controller``: the SRv6Pipes controller and its DNS front end, in the foreground.

What it does, per query (:meth:`Controller.handle_dns`), for ``f1.f2._pipes.NAME``:

1. decode (dnsquery.py); a packet that is not DNS is dropped and counted;
2. find the client's access router (policy.py) and check the grants: REFUSED if none;
3. reuse the binding of (router, client prefix, server, chain) if there is one, pushing
   its expiry back; else compute a path (pathcomp.py), allocate a BSID (bindings.py),
   have the router's agent install it (agentlink.py) and only then answer, so the
   client can use the BSID at once;
4. answer with the server's address and the BSID (dnsquery.py).

Ordinary names: the zone's names are answered with their address, other names are
relayed to ``[zone] upstream`` when there is one, else REFUSED.

In the background: health probes (health.py) every ``probe_interval``; when a proxy goes
down every binding through it gets a new path at once and the routers concerned are
synced, with no change on the clients (the BSID stays); expired bindings are dropped
and their routers synced; every router is synced every ``sync_interval`` anyway.
Failover events are kept with their timings for the statistics.

Signals: SIGTERM/SIGINT stop (the agents keep their bindings until they expire), SIGHUP
reloads the TOML file (bindings a changed policy no longer allows are withdrawn; a
changed ``dns`` list needs a restart). Statistics: JSON on the control socket,
``pipes-controller --config F --stats``.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import ipaddress
import json
import logging
import signal
import sys
import time
from typing import Optional

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

from .. import logsetup
from ..ratelimit import RateLimitedLogger
from .. import __version__
from . import dnsquery, messages, model, pathcomp, policy
from .agentlink import AgentError, AgentLink
from .bindings import BindingEntry, BindingKey, BindingTable, BlockExhausted
from .dnsserver import DnsFrontEnd, Forward
from .health import Prober
from .statsocket import read_stats, start_stats_socket, unlink_socket

log = logging.getLogger("srv6pipes.controller")

EXPIRY_INTERVAL = 1.0
FIRST_PROBE_WAIT = 5.0
FAILOVER_HISTORY = 20
ANSWER_CACHE_SIZE = 65536
SRH_FIXED = 8
SEGMENT = 16
HMAC_TLV_BYTES = 40


def policy_overhead(segments: int, hmac: bool) -> int:
    """Bytes the access router's End.B6 adds to each packet: an SRH of the policy's
    segments plus the BSID slot, and the HMAC TLV if the router signs."""
    return SRH_FIXED + SEGMENT * (segments + 1) + (HMAC_TLV_BYTES if hmac else 0)


class Controller:
    """State and logic of one controller; :meth:`run` serves until a stop signal."""

    def __init__(self, config: model.ControllerConfig):
        self.config = config
        self._origin = dns.name.from_text(config.origin or ".")
        self.key = messages.load_key(config.settings["agent_key"])
        self.table = BindingTable({r.name: r.block for r in config.routers})
        self.prober = Prober(config.proxies, config.settings["probe_timeout"],
                             config.settings["probe_failures"])
        self.links: dict[str, AgentLink] = {}
        self._make_links()
        self.counters: collections.Counter = collections.Counter()
        self.failovers: collections.deque = collections.deque(maxlen=FAILOVER_HISTORY)
        self.rlog = RateLimitedLogger(log)
        # (client, query without its id) -> (binding, its generation, response without id)
        self.answers: dict = {}
        self.front: Optional[DnsFrontEnd] = None
        self.started = time.time()
        self.stop_event: Optional[asyncio.Event] = None

    # -- the queries ---------------------------------------------------------------------
    def handle_dns(self, wire: bytes, client: ipaddress.IPv6Address):
        """The DNS front end's handler: bytes, None (drop), Forward, or a coroutine."""
        cached = self.answers.get((client, wire[2:]))
        if cached is not None:
            entry, generation, tail = cached
            # Still the same live binding: refresh it and answer without parsing.
            if self.table.get(entry.key) is entry and entry.generation == generation:
                self.table.touch(entry, time.monotonic() + self.config.settings["binding_lifetime"])
                self.counters["answered_existing"] += 1
                self.counters["answered_from_cache"] += 1
                return wire[:2] + tail
            del self.answers[(client, wire[2:])]
        try:
            query = dns.message.from_wire(wire)
        except Exception as exc:  # noqa: BLE001 - untrusted bytes: any parse error is "malformed"
            self.counters["malformed"] += 1
            self.rlog.warning("malformed", "dropped a malformed query from %s: %s", client,
                              exc.__class__.__name__)
            return None
        if query.flags & dns.flags.QR:
            self.counters["not_a_query"] += 1
            return None
        try:
            request = dnsquery.parse_query(query)
        except dnsquery.QueryError as exc:
            return self._error(query, exc.rcode, exc.ede, str(exc), "invalid")
        if request is None:
            return self._plain(query)
        self.counters["pipes_queries"] += 1
        return self._pipes(query, request, client, wire)

    def _error(self, query, rcode: int, ede: int, text: str, counter: str) -> bytes:
        self.counters[counter] += 1
        return dnsquery.error(query, rcode, ede, text).to_wire()

    def _relative(self, name: dns.name.Name) -> Optional[str]:
        """The name relative to the zone, lower case; None when outside it."""
        if not self.config.origin:
            return None
        origin = self._origin
        if not name.is_subdomain(origin) or name == origin:
            return None
        return name.relativize(origin).to_text().lower()

    def _plain(self, query) -> object:
        question = query.question[0]
        relative = self._relative(question.name)
        if relative is None:
            if self.config.upstream is not None:
                return Forward()
            return self._error(query, dns.rcode.REFUSED, dns.edns.EDECode.NOT_AUTHORITATIVE,
                               "not a name of this zone and no upstream", "refused")
        address = self.config.names.get(relative)
        if address is None:
            return self._error(query, dns.rcode.NXDOMAIN, dns.edns.EDECode.OTHER,
                               f"no such name in {self.config.origin}", "nxdomain")
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if question.rdtype in (dns.rdatatype.AAAA, dns.rdatatype.ANY):
            response.answer.append(dns.rrset.from_text(question.name, self.config.settings["ttl"],
                                                       "IN", "AAAA", str(address)))
        self.counters["plain_answers"] += 1
        return response.to_wire()

    def _remember(self, client: ipaddress.IPv6Address, wire: bytes, entry: BindingEntry,
                  response: bytes) -> bytes:
        """Keeps the answer for the same client asking the same question again (everything
        but the query id equal): the next one is answered without parsing. Bounded; the
        entry is checked to be the same live binding before each use."""
        if len(self.answers) >= ANSWER_CACHE_SIZE:
            self.answers.pop(next(iter(self.answers)))
        self.answers[(client, wire[2:])] = (entry, entry.generation, response[2:])
        return response

    def _pipes(self, query, request: dnsquery.PipesQuery, client: ipaddress.IPv6Address,
               wire: bytes):
        settings = self.config.settings
        server = self._relative(request.server)
        address = self.config.names.get(server) if server is not None else None
        if address is None:
            return self._error(query, dns.rcode.NXDOMAIN, dns.edns.EDECode.OTHER,
                               f"unknown server name {request.server}", "nxdomain")
        unknown = [f for f in request.chain if f not in self.config.services]
        if unknown:
            return self._error(query, dns.rcode.NXDOMAIN, dns.edns.EDECode.OTHER,
                               f"unknown function {unknown[0]!r}", "nxdomain")
        access = policy.access_router(self.config.routers, client)
        if access is None:
            return self._error(query, dns.rcode.REFUSED, dns.edns.EDECode.PROHIBITED,
                               f"no access router serves {client}", "refused")
        grant = policy.authorize(self.config.grants, client, server, request.chain)
        if grant is None:
            self.rlog.info("refused", "refused %s -> %s via %s: no grant", client, server,
                           ",".join(request.chain))
            return self._error(query, dns.rcode.REFUSED, dns.edns.EDECode.PROHIBITED,
                               f"policy: {client} may not reach {server} through "
                               f"{','.join(request.chain)}", "refused")
        link = self.links[access.router.name]
        if not link.adopted:
            # Until we know what the agent holds, a new BSID could collide with one of
            # its bindings (a restarted controller): answer nothing new yet.
            link.wake.set()
            return self._error(query, dns.rcode.SERVFAIL, dns.edns.EDECode.NOT_READY,
                               f"access router {access.router.name} not reached yet",
                               "agent_not_ready")
        # The binding serves the router's client prefix, or the grant's if it is narrower:
        # the edge filter lets through exactly the prefix it is bound to.
        prefix = policy.binding_prefix(access, grant, client)
        key = BindingKey(access.router.name, prefix, address, request.chain)
        now = time.monotonic()
        expires = now + settings["binding_lifetime"]
        entry = self.table.get(key)
        if entry is not None:
            self.table.touch(entry, expires)
            if entry.confirmed:
                self.counters["answered_existing"] += 1
                return self._remember(client, wire, entry,
                                      self._answer(query, request, entry, access.router).to_wire())
            return self._wait_and_answer(query, request, entry, access.router, None)
        try:
            entry = self._create(key, grant.name, server, expires)
        except pathcomp.NoPath as exc:
            return self._error(query, dns.rcode.SERVFAIL, dns.edns.EDECode.NETWORK_ERROR,
                               str(exc), "no_path")
        except BlockExhausted as exc:
            self.rlog.error("exhausted", "%s", exc)
            return self._error(query, dns.rcode.SERVFAIL, dns.edns.EDECode.OTHER, str(exc),
                               "block_exhausted")
        change = self.links[access.router.name].changed()
        return self._wait_and_answer(query, request, entry, access.router, change)

    def _create(self, key: BindingKey, grant: str, server: str, expires: float) -> BindingEntry:
        services = [self.config.services[name] for name in key.chain]
        loads = self.prober.loads(self.table.per_proxy())
        path = pathcomp.compute_path(services, self.config.proxies, loads, key.text())
        segments = [proxy.address(service) for proxy, service in zip(path, services)]
        label = f"{grant}: {','.join(key.chain)} -> {server}"
        entry = self.table.create(key, segments, [p.name for p in path], label, expires)
        self.counters["bindings_created"] += 1
        log.info("binding %s on %s: %s via %s", entry.binding.bsid, key.router, label,
                 " ".join(p.name for p in path))
        return entry

    async def _wait_and_answer(self, query, request, entry: BindingEntry, router: model.Router,
                               change: Optional[int]) -> Optional[bytes]:
        link = self.links[router.name]
        try:
            await link.installed(change if change is not None else link.changed())
        except (AgentError, asyncio.TimeoutError) as exc:
            return self._error(query, dns.rcode.SERVFAIL, dns.edns.EDECode.NETWORK_ERROR,
                               f"access router {router.name} did not install the binding: "
                               f"{exc or 'timeout'}", "agent_failures")
        entry.confirmed = True
        self.counters["answered_new"] += 1
        return self._answer(query, request, entry, router).to_wire()

    def _answer(self, query, request, entry: BindingEntry, router: model.Router):
        settings = self.config.settings
        result = dnsquery.Answer(entry.key.server, entry.binding.bsid, entry.key.chain,
                                 int(settings["binding_lifetime"]),
                                 policy_overhead(len(entry.binding.segments), router.hmac))
        return dnsquery.answer(query, request, result, settings["ttl"])

    # -- background ------------------------------------------------------------------------
    def snapshot(self, router: str) -> list:
        """The sync body of one router: its bindings with their remaining lifetimes."""
        now = time.monotonic()
        return [(entry.binding, max(0.001, entry.expires_at - now))
                for entry in self.table.for_router(router)]

    async def probe_loop(self, first_round: asyncio.Event) -> None:
        interval = self.config.settings["probe_interval"]
        while True:
            started = time.monotonic()
            changed = await self.prober.round()
            first_round.set()
            for name, healthy in changed:
                log.warning("proxy %s is %s", name, "up" if healthy else "DOWN")
            if any(not healthy for _, healthy in changed):
                await self.fail_over({name for name, healthy in changed if not healthy},
                                     detected=time.monotonic())
            elif self.prober.down():
                # Bindings that could not be moved at the last failover: try again.
                await self.fail_over(set(), detected=None)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def fail_over(self, newly_down: set[str], detected: Optional[float]) -> None:
        """Moves every binding off the proxies that are down, then syncs the routers."""
        down = self.prober.down()
        loads = self.prober.loads(self.table.per_proxy())

        def recompute(entry: BindingEntry):
            services = [self.config.services[name] for name in entry.key.chain]
            path = pathcomp.compute_path(services, self.config.proxies, loads, entry.key.text())
            return [p.address(s) for p, s in zip(path, services)], [p.name for p in path]

        moved, failed = self.table.reroute(
            lambda entry: bool(down.intersection(entry.proxies)) or not self._path_current(entry),
            recompute)
        for entry, exc in failed:
            self.rlog.error("reroute", "binding %s (%s) keeps its dead path: %s",
                            entry.binding.bsid, entry.binding.label, exc)
        if not moved and not newly_down:
            return
        self.counters["bindings_rerouted"] += len(moved)
        routers = {entry.key.router for entry in moved}
        rerouted_at = time.monotonic()
        changes = {router: self.links[router].changed() for router in routers}
        results = await asyncio.gather(*(self.links[r].installed(c) for r, c in changes.items()),
                                       return_exceptions=True)
        event = {"down": sorted(newly_down) or sorted(down), "bindings_moved": len(moved),
                 "bindings_stuck": len(failed), "routers": sorted(routers),
                 "errors": [str(r) for r in results if isinstance(r, BaseException)]}
        if detected is not None:
            event.update(detect_to_reroute_ms=round((rerouted_at - detected) * 1000, 1),
                         detect_to_installed_ms=round((time.monotonic() - detected) * 1000, 1),
                         at=time.time())
            self.failovers.append(event)
        log.warning("failover: %s", json.dumps(event, sort_keys=True))

    def _path_current(self, entry: BindingEntry) -> bool:
        """Whether a binding's path still matches the configuration (after a reload: a
        proxy removed, a service moved or given other parameters)."""
        proxies = {proxy.name: proxy for proxy in self.config.proxies}
        for name, service_name, segment in zip(entry.proxies, entry.key.chain,
                                               entry.binding.segments):
            proxy, service = proxies.get(name), self.config.services.get(service_name)
            if proxy is None or service is None or service_name not in proxy.services \
                    or proxy.address(service) != segment:
                return False
        return True

    async def expire_loop(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_INTERVAL)
            gone = self.table.expire(time.monotonic())
            for router in {entry.key.router for entry in gone}:
                self.links[router].changed()
            if gone:
                self.counters["bindings_expired"] += len(gone)
                log.info("expired %d bindings", len(gone))

    # -- life cycle ----------------------------------------------------------------------
    def run(self) -> int:
        asyncio.run(self.serve())
        return 0

    def adopt(self, router: str, items: list) -> None:
        """Takes back the bindings an agent reports (see AgentLink.adopt): those the
        configuration and the policy still allow, with their remaining lifetime. A binding
        whose proxies are down is moved at the next probe round."""
        now = time.monotonic()
        adopted = 0
        for item in items:
            try:
                binding = messages.Binding.from_json(item)
                lifetime = float(item.get("expires_in", 0))
            except (messages.ChannelError, TypeError, ValueError):
                continue
            key = self._adoptable(router, binding)
            if key is None or lifetime <= 0:
                continue
            proxies = [self._proxy_of(segment) for segment in binding.segments]
            if None in proxies:
                continue
            if self.table.adopt(key, binding, proxies, now + lifetime) is not None:
                adopted += 1
        if adopted:
            self.counters["bindings_adopted"] += adopted
            log.info("adopted %d bindings %s still held", adopted, router)

    def _adoptable(self, router: str, binding) -> Optional[BindingKey]:
        config = self.config
        server = next((n for n, a in config.names.items() if a == binding.server), None)
        if server is None or len(binding.clients) != 1 or not binding.chain \
                or not all(s in config.services for s in binding.chain):
            return None
        prefix = binding.clients[0]
        if policy.authorize(config.grants, prefix.network_address, server,
                            binding.chain) is None:
            return None
        return BindingKey(router, prefix, binding.server, binding.chain)

    def _proxy_of(self, segment) -> Optional[str]:
        for proxy in self.config.proxies:
            if proxy.plan.contains(segment):
                return proxy.name
        return None

    def _make_links(self) -> None:
        """One AgentLink per router (started by serve(): they need the event loop)."""
        settings = self.config.settings
        self.links = {}
        for router in self.config.routers:
            self.links[router.name] = AgentLink(
                router.name, router.agent, self.key, lambda name=router.name: self.snapshot(name),
                settings["sync_interval"], settings["agent_timeout"],
                adopt=lambda items, name=router.name: self.adopt(name, items))

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop_event.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        settings = self.config.settings
        for link in self.links.values():
            link.start()
            link.wake.set()   # ask every agent what it holds, now
        first_round = asyncio.Event()
        tasks = [asyncio.create_task(self.probe_loop(first_round)),
                 asyncio.create_task(self.expire_loop())]
        try:
            # Answer nothing before the proxies' health is known (a first round of probes).
            await asyncio.wait_for(first_round.wait(), FIRST_PROBE_WAIT)
        except asyncio.TimeoutError:
            log.warning("first health probes did not finish within %ss", FIRST_PROBE_WAIT)
        deadline = time.monotonic() + FIRST_PROBE_WAIT
        while time.monotonic() < deadline and not all(link.adopted for link in self.links.values()):
            await asyncio.sleep(0.05)
        for name in sorted(n for n, link in self.links.items() if not link.adopted):
            log.warning("agent of %s not reached: no new bindings there until it is", name)
        self.front = DnsFrontEnd(self.handle_dns, settings["max_queries_per_second"],
                                 self.config.upstream)
        control = None
        try:
            await self.front.start(settings["dns"])
            control = await start_stats_socket(settings["control"], self.stats)
            log.info("pipes-controller %s: %d proxies, %d access routers, %d grants",
                     settings["name"], len(self.config.proxies), len(self.config.routers),
                     len(self.config.grants))
            await self.stop_event.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for link in self.links.values():
                await link.stop()
            await self.front.stop()
            if control is not None:
                control.close()
                await control.wait_closed()
            unlink_socket(settings["control"])
            self.rlog.flush()
            log.info("pipes-controller %s stopped (%d bindings left to expire at the agents)",
                     settings["name"], len(self.table))

    async def reload(self) -> None:
        path = self.config.path
        try:
            new = model.load(path)
            key = messages.load_key(new.settings["agent_key"])
        except (model.ConfigError, OSError, ValueError) as exc:
            log.error("SIGHUP: reload refused, keeping the running configuration: %s", exc)
            return
        if new.settings["dns"] != self.config.settings["dns"] or \
                new.settings["control"] != self.config.settings["control"]:
            log.error("SIGHUP: dns and control cannot change while running: restart instead")
            return
        old_routers = {r.name: r for r in self.config.routers}
        self.config, self.key = new, key
        self.answers.clear()  # grants, names or TTLs may have changed
        self._origin = dns.name.from_text(new.origin or ".")
        self.prober.update_topology(new.proxies, new.settings["probe_timeout"],
                                    new.settings["probe_failures"])
        self.table.blocks = {r.name: r.block for r in new.routers}
        dirty = set()
        for entry in list(self.table.by_key.values()):
            router = next((r for r in new.routers if r.name == entry.key.router), None)
            server = next((n for n, a in new.names.items() if a == entry.key.server), None)
            allowed = (router is not None
                       and any(entry.key.prefix.subnet_of(c) for c in router.clients)
                       and entry.binding.bsid in router.block and server is not None
                       and all(s in new.services for s in entry.key.chain)
                       and policy.authorize(new.grants, entry.key.prefix.network_address,
                                            server, entry.key.chain) is not None)
            if not allowed:
                self.table.remove(entry)
                dirty.add(entry.key.router)
                self.counters["bindings_revoked"] += 1
        adopted = {name for name, link in self.links.items() if link.adopted}
        for link in self.links.values():
            await link.stop()
        self._make_links()
        for name, link in self.links.items():
            link.adopted = link.adopted or name in adopted  # the table has them already
            link.start()
        for name in dirty & {r.name for r in new.routers}:
            self.links[name].changed()
        removed = set(old_routers) - {r.name for r in new.routers}
        if removed:
            log.warning("SIGHUP: routers %s left the configuration; their agents keep the "
                        "bindings until they expire", ", ".join(sorted(removed)))
        await self.fail_over(set(), detected=None)
        log.info("SIGHUP: configuration reloaded from %s", path)

    def stats(self) -> dict:
        now = time.monotonic()
        settings = self.config.settings
        return {
            "name": settings["name"],
            "uptime_s": round(time.time() - self.started, 1),
            "counters": dict(self.counters),
            "dns": dict(self.front.counters) if self.front is not None else {},
            "proxies": {name: state.to_json(now) for name, state in self.prober.health.items()},
            "routers": {name: link.to_json(now) for name, link in self.links.items()},
            "bindings": [{"bsid": str(e.binding.bsid), "router": e.key.router,
                          "clients": str(e.key.prefix), "server": str(e.key.server),
                          "chain": list(e.key.chain), "proxies": list(e.proxies),
                          "segments": [str(s) for s in e.binding.segments],
                          "generation": e.generation, "label": e.binding.label,
                          "expires_in": round(e.expires_at - now, 1)}
                         for e in self.table.by_key.values()],
            "failovers": list(self.failovers),
        }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pipes-controller",
        description="SRv6Pipes controller: answers DNS queries f1.f2._pipes.NAME with a "
                    "binding segment its access routers expand into the proxies' function "
                    "addresses; probes the proxies and moves bindings off dead ones. Runs "
                    "in the foreground; SIGTERM/SIGINT stop, SIGHUP reloads the file.")
    parser.add_argument("--config", required=True, metavar="FILE", help="TOML configuration")
    parser.add_argument("--check", action="store_true",
                        help="validate the configuration, print a summary and exit")
    parser.add_argument("--stats", action="store_true",
                        help="print the running controller's statistics (JSON) and exit")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = parser.parse_args(argv)
    try:
        config = model.load(args.config)
    except model.ConfigError as exc:
        print(f"pipes-controller: {exc}", file=sys.stderr)
        return 2
    if args.stats:
        path = config.settings["control"]
        try:
            print(json.dumps(read_stats(path), indent=2, sort_keys=True))
        except (OSError, ValueError) as exc:
            print(f"pipes-controller: cannot read stats from {path}: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.check:
        print(json.dumps(summary(config), indent=2))
        return 0
    logsetup.setup("pipes-controller", config.settings["log_level"])
    try:
        controller = Controller(config)
    except (OSError, ValueError) as exc:
        print(f"pipes-controller: {exc}", file=sys.stderr)
        return 2
    try:
        return controller.run()
    except OSError as exc:  # a DNS address taken, a control socket path unusable
        print(f"pipes-controller: {exc}", file=sys.stderr)
        return 1


def summary(config: model.ControllerConfig) -> dict:
    """What --check prints: the configuration as the controller understood it."""
    return {
        "dns": [f"[{h}]:{p}" for h, p in config.settings["dns"]],
        "zone": config.origin, "names": {n: str(a) for n, a in config.names.items()},
        "services": {s.name: {"function": s.function_id, "params": s.params}
                     for s in config.services.values()},
        "proxies": {p.name: {"locator": str(p.plan.locator), "services": sorted(p.services),
                             "last_hop": p.last_hop} for p in config.proxies},
        "routers": {r.name: {"clients": [str(c) for c in r.clients], "block": str(r.block),
                             "bindings": r.block.num_addresses - 1} for r in config.routers},
        "grants": {g.name: {"clients": [str(c) for c in g.clients],
                            "servers": sorted(g.servers) if g.servers else "*",
                            "chains": sorted(",".join(c) for c in g.chains)}
                   for g in config.grants},
    }


if __name__ == "__main__":
    sys.exit(main())
