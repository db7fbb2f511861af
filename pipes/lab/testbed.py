"""A lab of network namespaces for the demo, the end-to-end tests and the benchmarks.

::

    with Testbed(proxies=2) as tb:          # c - p1 - p2 - s, one veth pair per link
        tb.steer("c", "s", [tb.locator("p1")[0x1_0000_0000]])
        tb.hosts["s"].popen(["iperf3", "-s"])
        tb.hosts["c"].run(["iperf3", "-c", str(tb.hosts["s"].addr)])

Hosts and addresses (every host address and every locator is routed from every host):

======  ==================  =====================================================
host    main address        role
======  ==================  =====================================================
c       fd00:c::1           client
pI      fd00:1:I::1         proxy I (1-based), owns the locator fc00:I::/80
r       fd00:f::1           plain router (``proxies=0`` line, or the star's hub)
s       fd00:d::1           server ("destination")
======  ==================  =====================================================

The main address sits on ``lo`` (/128) and its /64 is routed to the host; link k gets
fd01:k::/64 (::1 on the end that comes first in host order, ::2 on the other). Every route
carries ``src <main address>`` so that unmodified applications use the main address, and
link subnets are routed too so that ICMPv6 errors (packet too big) from routers come back.

Topologies: ``line`` chains c, p1..pN, s (``proxies=0``: c - r - s); ``star`` hangs every
host off the router r (off-path proxies: the server's replies must be steered back through
the proxy, see :meth:`Testbed.steer`); ``campus`` is the control-plane lab (two clients
behind two access routers, three proxies, a controller host, see CAMPUS_LINKS). Only
locators and the hosts' /64s are routed: a seg6local behaviour on a router should use an
address of its own /64 (e.g. fd00:f::e on r), because the kernel looks the route up again
for the first segment after inserting an SRH.

Every host (not only proxies and routers) has seg6_enabled=1: a host drops a packet carrying
an SRH, even with segments-left 0, when its ingress interface has seg6 disabled.

Namespaces are named ``<prefix>-<host>``; teardown kills every process inside them and
deletes them, also when the with-body raised; an atexit hook is the safety net and
:meth:`Testbed.cleanup_stale` removes what a crashed run left.
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import ctypes
import logging
import os
import secrets
import shlex
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from ipaddress import IPv6Address, IPv6Network

log = logging.getLogger(__name__)

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
LOCATOR_LEN = 80
TOPOLOGIES = ("line", "star", "campus")
# The control-plane lab (``topology="campus"``, the number of proxies is always 3)::
#
#   c1 (staff) --- a1 --+               +--- p1   p2 (off-path: first functions)
#   c2 (students) - a2 -+--- r (core) --+--- ctl (controller, DNS)
#                                       +--- p3 --- s (on the servers' path)
#
# a1/a2 are access routers (their binding blocks sit in their own /64s), p1/p2 two proxies
# offering the same functions (failover), p3 the proxy in front of the server.
CAMPUS_LINKS = (("c1", "a1"), ("c2", "a2"), ("a1", "r"), ("a2", "r"), ("p1", "r"),
                ("p2", "r"), ("ctl", "r"), ("r", "p3"), ("p3", "s"))
NAMED_ADDRESSES = {"c": "fd00:c::1", "s": "fd00:d::1", "r": "fd00:f::1", "c1": "fd00:c1::1",
                   "c2": "fd00:c2::1", "a1": "fd00:a1::1", "a2": "fd00:a2::1",
                   "ctl": "fd00:e::1"}
# Written in every namespace before any interface exists, so veths inherit them (default/).
SYSCTLS = (
    ("ipv6/conf/all/accept_dad", "0"),
    ("ipv6/conf/default/accept_dad", "0"),
    ("ipv6/conf/all/forwarding", "1"),  # also sets default/ and existing interfaces
    ("ipv6/conf/default/forwarding", "1"),
    ("ipv6/conf/all/accept_ra", "0"),
    ("ipv6/conf/default/accept_ra", "0"),
    ("ipv6/conf/all/router_solicitations", "0"),
    ("ipv6/conf/default/router_solicitations", "0"),
    # Every host accepts SRHs: even a packet whose segments-left is 0 is dropped by a host
    # whose ingress interface has seg6_enabled=0 (ipv6_srh_rcv checks before anything else).
    ("ipv6/conf/all/seg6_enabled", "1"),
    ("ipv6/conf/default/seg6_enabled", "1"),
    ("ipv6/conf/lo/seg6_enabled", "1"),
)

_libc = ctypes.CDLL(None, use_errno=True)
_live: "set[Testbed]" = set()
_live_lock = threading.Lock()


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _run(argv: list[str], input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise TestbedError(f"`{shlex.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()}"
                           + (f"\ninput:\n{input}" if input else ""))
    return proc


class TestbedError(RuntimeError):
    """Building or driving the lab failed."""

    __test__ = False  # not a pytest test class, despite the name


class HostCommandError(subprocess.CalledProcessError):
    """A command run with :meth:`Host.run` failed; its message includes the output."""

    def __str__(self) -> str:
        text = super().__str__()
        for name in ("stdout", "stderr"):
            value = getattr(self, name)
            if value:
                if isinstance(value, bytes):
                    value = value.decode(errors="replace")
                text += f"\n{name}: {value.strip()[-2000:]}"
        return text


@dataclass
class Interface:
    """One end of a link, as seen from the host that owns it."""

    name: str  # "to-<neighbor>"
    addr: IPv6Address  # this end's link address
    peer: str  # neighbor host name
    peer_addr: IPv6Address
    network: IPv6Network  # the link's /64


@dataclass(eq=False)
class Host:
    """One namespace of the lab: run commands in it, start tracked processes, enter it."""

    name: str
    ns: str
    addr: IPv6Address
    locator: IPv6Network | None = None
    interfaces: dict[str, Interface] = field(default_factory=dict)  # by neighbor name
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    @property
    def prefix(self) -> IPv6Network:
        """The /64 of the main address, routed to this host from everywhere."""
        return IPv6Network(f"{self.addr}/64", strict=False)

    def _argv(self, cmd: list[str] | str) -> list[str]:
        if isinstance(cmd, str):
            return ["ip", "netns", "exec", self.ns, "sh", "-c", cmd]
        return ["ip", "netns", "exec", self.ns, *[str(c) for c in cmd]]

    def run(self, cmd: list[str] | str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        """Run ``cmd`` (argv list, or a string for ``sh -c``) in this host and wait for it.

        Output is captured as text unless ``kw`` says otherwise; ``check`` raises
        :class:`HostCommandError` (with stdout/stderr in its message) on a non-zero exit.
        """
        kw.setdefault("capture_output", "stdout" not in kw and "stderr" not in kw)
        kw.setdefault("text", True)
        proc = subprocess.run(self._argv(cmd), timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise HostCommandError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc

    def popen(self, cmd: list[str] | str, **kw) -> subprocess.Popen:
        """Start ``cmd`` in this host; terminated (then killed) at teardown."""
        proc = subprocess.Popen(self._argv(cmd), **kw)
        self._procs.append(proc)
        return proc

    @contextlib.contextmanager
    def enter(self):
        """Switch the *calling thread* into this host's namespace for the with-body.

        Sockets created inside stay in the namespace after the body; other threads are not
        affected.
        """
        back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(os.path.join(NETNS_DIR, self.ns), os.O_RDONLY)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield self
            finally:
                _setns(back)
        finally:
            os.close(back)

    def ping(self, dest: IPv6Address | str, timeout: float = 1.0, src: IPv6Address | str | None = None) -> bool:
        """Send one ICMPv6 echo request from this host; True when the reply arrives in time.

        No ``ping`` binary needed: a raw ICMPv6 socket created inside the namespace (the
        kernel fills in the checksum).
        """
        ident = secrets.randbits(16)
        with self.enter():
            sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        with sock:
            if src is not None:
                sock.bind((str(src), 0))
            payload = secrets.token_bytes(16)
            sock.sendto(struct.pack("!BBHHH", 128, 0, 0, ident, 1) + payload, (str(dest), 0))
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data, _ = sock.recvfrom(2048)
                except TimeoutError:
                    return False
                if len(data) >= 8 and data[0] == 129 and struct.unpack("!H", data[4:6])[0] == ident \
                        and data[8:] == payload:
                    return True
            return False

    def stop_processes(self, grace: float = 2.0) -> None:
        """Terminate the processes started with :meth:`popen`, kill those that linger."""
        procs, self._procs = self._procs, []
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()


def _ns_pids(ns: str) -> list[int]:
    proc = _run(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def _destroy_namespaces(names: list[str]) -> None:
    """Kill every process in the namespaces, then delete them (their veths go with them)."""
    existing = set(os.listdir(NETNS_DIR)) if os.path.isdir(NETNS_DIR) else set()
    names = [n for n in names if n in existing]
    for _ in range(3):
        pids = [pid for ns in names for pid in _ns_pids(ns) if pid != os.getpid()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    if names:
        _run(["ip", "-force", "-batch", "-"], input="".join(f"netns del {n}\n" for n in names), check=False)
    left = [n for n in names if os.path.exists(os.path.join(NETNS_DIR, n))]
    if left:
        log.warning("namespaces still present after teardown: %s", left)


class Testbed:
    """A set of namespaces wired as ``topology``; a context manager that always cleans up."""

    def __init__(self, proxies: int = 2, mtu: int = 1500, topology: str = "line", prefix: str | None = None):
        if topology not in TOPOLOGIES:
            raise ValueError(f"topology {topology!r}: choose one of {TOPOLOGIES}")
        if not isinstance(proxies, int) or proxies < 0:
            raise ValueError(f"proxies={proxies!r}: need an integer >= 0")
        if topology == "campus":
            proxies = 3
        if not 1280 <= mtu <= 65535:
            raise ValueError(f"mtu={mtu}: IPv6 needs 1280..65535")
        self.proxies = proxies
        self.mtu = mtu
        self.topology = topology
        self.prefix = prefix or "sp" + secrets.token_hex(3)
        if len(self.prefix) + 1 + len(f"p{proxies}") > 64 or "/" in self.prefix:
            raise ValueError(f"prefix {self.prefix!r}: too long or has a slash")
        self.hosts: dict[str, Host] = {}
        self.links: list[tuple[str, str]] = []
        self._steer_tables = 0
        self._created: list[str] = []
        self._built = False
        self._closed = False

    # ------------------------------------------------------------------ layout

    @property
    def proxy_names(self) -> list[str]:
        return [f"p{i}" for i in range(1, self.proxies + 1)]

    def _layout(self) -> None:
        if self.topology == "campus":
            names = list(dict.fromkeys(name for link in CAMPUS_LINKS for name in link))
            self.links = list(CAMPUS_LINKS)
            for name in names:
                self.hosts[name] = Host(name, f"{self.prefix}-{name}", _main_address(name),
                                        _locator(name))
            self._number_links()
            return
        names = ["c", *self.proxy_names, "s"]
        if self.topology == "star" or self.proxies == 0:
            names.insert(1 if self.topology == "line" else 0, "r")
        for name in names:
            self.hosts[name] = Host(name, f"{self.prefix}-{name}", _main_address(name), _locator(name))
        if self.topology == "line":
            self.links = list(zip(names, names[1:]))
        else:
            self.links = [("r", name) for name in names if name != "r"]
        self._number_links()

    def _number_links(self) -> None:
        for k, (a, b) in enumerate(self.links):
            net = IPv6Network(f"fd01:{k:x}::/64")
            addr_a, addr_b = net[1], net[2]
            self.hosts[a].interfaces[b] = Interface(f"to-{b}", addr_a, b, addr_b, net)
            self.hosts[b].interfaces[a] = Interface(f"to-{a}", addr_b, a, addr_a, net)

    def _first_hops(self, src: str) -> dict[str, str]:
        """For every other host: the neighbor of ``src`` on a shortest path to it (BFS)."""
        first: dict[str, str] = {}
        queue = collections.deque()
        for neighbor in self.hosts[src].interfaces:
            first[neighbor] = neighbor
            queue.append(neighbor)
        while queue:
            here = queue.popleft()
            for neighbor in self.hosts[here].interfaces:
                if neighbor != src and neighbor not in first:
                    first[neighbor] = first[here]
                    queue.append(neighbor)
        return first

    def _destinations(self) -> list[tuple[IPv6Network, str]]:
        """(prefix, host that owns it) for every routed prefix of the lab."""
        dests = []
        for host in self.hosts.values():
            dests.append((host.prefix, host.name))
            if host.locator is not None:
                dests.append((host.locator, host.name))
        for a, b in self.links:
            dests.append((self.hosts[a].interfaces[b].network, a))
        return dests

    def owner(self, addr: IPv6Address | str) -> str | None:
        """The host whose main /64, locator or link an address belongs to (None: unknown)."""
        addr = IPv6Address(addr)
        for prefix, name in self._destinations():
            if addr in prefix:
                return name
        return None

    def _next_hop(self, src: str, dst: str) -> Interface:
        return self.hosts[src].interfaces[self._first_hops(src)[dst]]

    # ------------------------------------------------------------------ build / teardown

    def __enter__(self) -> "Testbed":
        self.build()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def build(self) -> "Testbed":
        """Create the namespaces, links, addresses and routes. Cleans up if anything fails."""
        if self._built:
            return self
        self._built = True
        self._layout()
        with _live_lock:
            _live.add(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        started = time.monotonic()
        os.makedirs(NETNS_DIR, exist_ok=True)
        clash = [h.ns for h in self.hosts.values() if os.path.exists(os.path.join(NETNS_DIR, h.ns))]
        if clash:
            raise TestbedError(f"namespaces already exist: {clash} (Testbed.cleanup_stale({self.prefix!r})?)")
        try:
            _run(["ip", "-batch", "-"], input="".join(f"netns add {h.ns}\n" for h in self.hosts.values()))
        finally:  # teardown deletes only what this testbed created, never a clashing namespace
            self._created = [h.ns for h in self.hosts.values() if os.path.exists(os.path.join(NETNS_DIR, h.ns))]
        for host in self.hosts.values():
            with host.enter():
                for key, value in SYSCTLS:
                    with open(f"/proc/sys/net/{key}", "w") as f:
                        f.write(value)
        # Both ends of each veth pair are created directly in their namespaces (nothing ever
        # appears in the root namespace, so names cannot clash there).
        lines = []
        for a, b in self.links:
            ia, ib = self.hosts[a].interfaces[b], self.hosts[b].interfaces[a]
            lines.append(
                f"link add {ia.name} netns {self.hosts[a].ns} mtu {self.mtu} type veth "
                f"peer name {ib.name} netns {self.hosts[b].ns} mtu {self.mtu}\n"
            )
        _run(["ip", "-batch", "-"], input="".join(lines))
        for host in self.hosts.values():
            lines = ["link set lo up\n", f"addr add {host.addr}/128 dev lo nodad\n"]
            for iface in host.interfaces.values():
                lines.append(f"link set {iface.name} up\n")
                lines.append(f"addr add {iface.addr}/64 dev {iface.name} nodad\n")
            _run(["ip", "-n", host.ns, "-batch", "-"], input="".join(lines))
        for host in self.hosts.values():
            first = self._first_hops(host.name)
            lines = []
            for prefix, owner in self._destinations():
                if owner == host.name or any(prefix == i.network for i in host.interfaces.values()):
                    continue
                iface = host.interfaces[first[owner]]
                lines.append(f"route add {prefix} via {iface.peer_addr} dev {iface.name} src {host.addr}\n")
            if lines:
                _run(["ip", "-n", host.ns, "-batch", "-"], input="".join(lines))
        log.info("testbed %s (%s, %d proxies, mtu %d) built in %.2fs",
                 self.prefix, self.topology, self.proxies, self.mtu, time.monotonic() - started)

    def close(self) -> None:
        """Stop tracked processes, kill everything else in the namespaces, delete them."""
        if self._closed:
            return
        self._closed = True
        try:
            for host in self.hosts.values():
                try:
                    host.stop_processes()
                except Exception:  # go on: the namespaces must go in any case
                    log.exception("stopping processes of %s", host.name)
            _destroy_namespaces(self._created)
        finally:
            with _live_lock:
                _live.discard(self)

    @staticmethod
    def cleanup_stale(prefix: str) -> list[str]:
        """Delete the namespaces ``<prefix>-*`` a crashed run left; returns their names."""
        if not prefix:
            raise ValueError("cleanup_stale needs the exact prefix of the run to clean")
        try:
            names = sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix + "-"))
        except FileNotFoundError:
            return []
        _destroy_namespaces(names)
        return names

    # ------------------------------------------------------------------ use

    def locator(self, name: str) -> IPv6Network:
        """The locator prefix of proxy ``name`` (fc00:I::/80 for pI)."""
        host = self.hosts[name]
        if host.locator is None:
            raise KeyError(f"{name} is not a proxy and has no locator")
        return host.locator

    def _host_addr(self, dest: str | IPv6Address) -> IPv6Address:
        return self.hosts[dest].addr if isinstance(dest, str) and dest in self.hosts else IPv6Address(dest)

    def steer(self, client: str = "c", dest: str | IPv6Address = "s",
              segments: list[IPv6Address | str] = (), port: int | None = None,
              mtu: int | None = None) -> str:
        """Make ``client``'s kernel insert an SRH on its packets to ``dest``.

        Installs ``ip -6 route replace DEST/128 encap seg6 mode inline segs SEG1,...`` on the
        client, so unmodified applications get the SRH. With ``port``, only TCP to that
        destination port is steered (the route goes into its own table, chosen by an
        ``ip -6 rule ... ipproto tcp dport PORT``). ``mtu`` sets the route's MTU (the kernel
        subtracts the SRH from it for TCP's MSS). Returns the route command used.

        For an off-path proxy (``star``), also steer the server's replies back through the
        proxy: ``tb.steer("s", "c", [function address of the proxy])``.
        """
        if not segments:
            raise ValueError("steer needs at least one segment")
        host = self.hosts[client]
        dest_addr = self._host_addr(dest)
        segs = [IPv6Address(s) for s in segments]
        # The first hop goes toward the first segment (the kernel looks the route up again
        # after inserting the SRH anyway); unknown segment: toward the destination.
        target = self.owner(segs[0]) or self.owner(dest_addr)
        if target is None or target == client:
            raise TestbedError(f"cannot route from {client} toward {segs[0]}")
        iface = self._next_hop(client, target)
        route = (f"route replace {dest_addr}/128 encap seg6 mode inline segs {','.join(map(str, segs))} "
                 f"via {iface.peer_addr} dev {iface.name} src {host.addr}")
        if mtu is not None:
            route += f" mtu {int(mtu)}"
        lines = []
        if port is not None:
            self._steer_tables += 1
            table = 1000 + self._steer_tables
            route += f" table {table}"
            lines.append(f"rule add to {dest_addr}/128 ipproto tcp dport {int(port)} lookup {table} priority {table}\n")
        lines.insert(0, route + "\n")
        _run(["ip", "-6", "-n", host.ns, "-batch", "-"], input="".join(lines))
        return "ip -6 " + route

    def unsteer(self, client: str = "c", dest: str | IPv6Address = "s") -> None:
        """Remove the main-table steering route of :meth:`steer` (the plain route remains)."""
        host = self.hosts[client]
        dest_addr = self._host_addr(dest)
        _run(["ip", "-n", host.ns, "-6", "route", "del", f"{dest_addr}/128"], check=False)


def _main_address(name: str) -> IPv6Address:
    if name in NAMED_ADDRESSES:
        return IPv6Address(NAMED_ADDRESSES[name])
    return IPv6Address(f"fd00:1:{int(name[1:])}::1")


def _locator(name: str) -> IPv6Network | None:
    if name.startswith("p"):
        return IPv6Network(f"fc00:{int(name[1:])}::/{LOCATOR_LEN}")
    return None


@atexit.register
def _close_all() -> None:
    with _live_lock:
        live = list(_live)
    for tb in live:
        with contextlib.suppress(Exception):
            tb.close()
