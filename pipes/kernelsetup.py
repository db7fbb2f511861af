"""Kernel setup for one pipesd instance: interception rules, routing, sysctls.

Applies the recipe of docs/design.md section 3 (explained rule by rule in ``kernel/README.md``)
in the *current* network namespace, the one of the calling thread:

* policy routing: ``ip -6 rule add fwmark F/F lookup T priority P`` and
  ``ip -6 route add local ::/0 dev lo table T``, so marked packets are delivered locally and
  the kernel's SRH code loops them to their final destination;
* sysctls: ``seg6_enabled=1`` on all, default and every existing interface,
  ``all.forwarding=1``; the previous values go into a state file so that :func:`remove`
  restores them, also after a crash (:func:`install` reads a leftover state file first);
* nftables: one table ``inet srv6pipes_<name>`` rendered from ``kernel/pipes.nft.in``
  (TPROXY for SYNs, mark for the rest of the locator's TCP, mark for transparent sockets);
* NFQUEUE for the SYN copy: nft ``queue`` when the kernel has it, else ip6tables-legacy
  ``NFQUEUE`` (see :func:`queue_backend`).

``install`` and ``remove`` are idempotent; ``remove`` never fails because something is
already gone. ``replace`` changes an installed recipe make-before-break (reloads).
``plan`` returns the equivalent shell commands for ``pipesd --dry-run`` and ``--check``.
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import ipaddress
import json
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

from . import cookies, system

log = logging.getLogger(__name__)

STATE_DIR = system.STATE_DIR
TEMPLATE_NAME = "pipes.nft.in"
TABLE_PREFIX = "srv6pipes_"
COMMENT_PREFIX = "srv6pipes:"
IP6TABLES = "ip6tables-legacy"
# The table of the NFQUEUE rule. A legacy table is hooked for every packet of the namespace
# at each of its hooks: raw has two (PREROUTING, OUTPUT), mangle five (every packet a proxy
# relays crossed it twice on the way in and twice on the way out). raw's PREROUTING
# (priority -300) still runs before the nft chain (mangle + 1), as the SYN copy must.
IP6TABLES_TABLE = "raw"
# Tables where an older version put the rule: removal looks there too (crash recovery).
IP6TABLES_OLD_TABLES = ("mangle",)
# The legacy xtables lock is one file for every namespace of the machine: wait for it
# instead of failing when another instance (or test) holds it.
IP6TABLES_WAIT = ["-w", "10"]
NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,32}$")
SYSCTL_ROOT = Path("/proc/sys/net/ipv6/conf")
# Keys of the per-interface settings we change (conf/<if>/<key>).
SEG6 = "seg6_enabled"
REQUIRE_HMAC = "seg6_require_hmac"
FORWARDING = "forwarding"
MIGRATE_REQ = "net/ipv4/tcp_migrate_req"   # Linux >= 5.14


# The kernel's range of each numeric KernelConfig field; pipesd's settings (config.py) take
# theirs from here, so a bad value is refused with the setting's name before anything runs.
KERNEL_RANGES = {
    "port": (1, 65535),
    "queue_num": (0, 65535),
    "fwmark": (1, 0xFFFFFFFF),
    "table": (1, 0xFFFFFFFF),
    "rule_priority": (1, 32765),    # 0, 32766 and 32767 are the kernel's own rules
}
RESERVED_TABLES = (253, 254, 255)   # default, main, local


def kernel_range(field: str) -> tuple[int, int]:
    return KERNEL_RANGES[field]


class KernelSetupError(RuntimeError):
    """A kernel configuration step failed; the message names the step and the kernel's words."""


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """What one pipesd instance intercepts and where it delivers it.

    ``name`` names the nft table (``srv6pipes_<name>``), the ip6tables comment
    (``srv6pipes:<name>``) and the state file; two instances in one namespace need different
    names, fwmarks, tables and rule priorities.
    """

    name: str
    locator: ipaddress.IPv6Network
    port: int
    queue_num: int = 0
    # Queues queue_num .. queue_num + queue_count - 1, one per capture process; with more
    # than one the kernel picks a SYN's queue by the CPU that received it (CPU fan-out).
    queue_count: int = 1
    fwmark: int = 1
    table: int = 100
    rule_priority: int = 100
    intercept_cookies: bool = True
    # pipesd checks SRH HMACs itself (--hmac-keyring): turn the kernel's check off
    # (seg6_require_hmac=-1), which would drop every HMAC whose key it does not hold and,
    # with a binding's two stacked SRHs, the client's unsigned one (kernel/README.md).
    kernel_hmac_off: bool = False

    def __post_init__(self):
        if not NAME_RE.match(self.name):
            raise ValueError(f"instance name {self.name!r}: use 1-32 characters [A-Za-z0-9_]")
        locator = ipaddress.IPv6Network(self.locator)
        object.__setattr__(self, "locator", locator)
        for field, (low, high) in KERNEL_RANGES.items():
            value = getattr(self, field)
            if not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{field}={value!r}: must be an integer in [{low}, {high}]")
        if self.table in RESERVED_TABLES:
            raise ValueError(f"table={self.table}: 253-255 are the kernel's default/main/local")
        if not isinstance(self.queue_count, int) or self.queue_count < 1 \
                or self.queue_num + self.queue_count - 1 > KERNEL_RANGES["queue_num"][1]:
            raise ValueError(f"queue_count={self.queue_count!r}: queues {self.queue_num} and "
                             f"on must end at {KERNEL_RANGES['queue_num'][1]}")

    @property
    def last_queue(self) -> int:
        return self.queue_num + self.queue_count - 1

    @property
    def nft_table(self) -> str:
        return TABLE_PREFIX + self.name

    @property
    def comment(self) -> str:
        return COMMENT_PREFIX + self.name

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["locator"] = str(self.locator)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "KernelConfig":
        # Fields added later have defaults: a state file written before them still loads.
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)
                      if f.name in data or f.default is dataclasses.MISSING})


# ---------------------------------------------------------------------------- helpers


def _run(argv: list[str], input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=30)
    except FileNotFoundError as exc:
        raise KernelSetupError(f"{argv[0]} is not installed: {exc}") from exc
    if check and proc.returncode != 0:
        raise KernelSetupError(
            f"`{shlex.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc


def template_path() -> Path:
    """Where ``pipes.nft.in`` is: $SRV6PIPES_KERNEL_DIR, else the source tree's ``kernel/``,
    else the copy setup.py ships inside an installed package."""
    candidates = []
    if os.environ.get("SRV6PIPES_KERNEL_DIR"):
        candidates.append(Path(os.environ["SRV6PIPES_KERNEL_DIR"]) / TEMPLATE_NAME)
    candidates.append(Path(__file__).resolve().parent.parent / "kernel" / TEMPLATE_NAME)
    candidates.append(Path(__file__).resolve().parent / "kernel" / TEMPLATE_NAME)
    for path in candidates:
        if path.is_file():
            return path
    raise KernelSetupError(f"nftables template {TEMPLATE_NAME} not found in {[str(c) for c in candidates]}")


_QUEUE_BLOCK = re.compile(r"^#@BEGIN_NFT_QUEUE@\n(.*?)^#@END_NFT_QUEUE@\n", re.S | re.M)


def render_ruleset(cfg: KernelConfig, backend: str) -> str:
    """The nft script for ``cfg``: the template with its placeholders filled in.

    The NFT_QUEUE block is kept only when ``backend == 'nft'``.
    """
    text = template_path().read_text()
    keep = backend == "nft"
    text = _QUEUE_BLOCK.sub(lambda m: m.group(1) if keep else "", text)
    values = {
        "NAME": cfg.name,
        "LOCATOR": str(cfg.locator),
        "PORT": str(cfg.port),
        "MARK": hex(cfg.fwmark),
        # nft `queue`: one queue, or a range spread by receiving CPU (fanout).
        "QUEUE_FLAGS": "bypass" if cfg.queue_count == 1 else "bypass,fanout",
        "QUEUES": (str(cfg.queue_num) if cfg.queue_count == 1
                   else f"{cfg.queue_num}-{cfg.last_queue}"),
    }
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    leftover = re.findall(r"@[A-Z_]+@", text)
    if leftover:
        raise KernelSetupError(f"unknown placeholders in {TEMPLATE_NAME}: {sorted(set(leftover))}")
    return text


def _ip6tables_rules(cfg: KernelConfig) -> list[list[str]]:
    """The NFQUEUE rule specs after ``-A``/``-D`` (chain included): every SYN to the
    locator, to one queue or, with several captures, to the queue of the CPU that received
    it (``--queue-cpu-fanout``: queue_num + CPU number modulo the queue count)."""
    if cfg.queue_count == 1:
        target = ["--queue-num", str(cfg.queue_num)]
    else:
        target = ["--queue-balance", f"{cfg.queue_num}:{cfg.last_queue}", "--queue-cpu-fanout"]
    return [["PREROUTING", "-d", str(cfg.locator), "-p", "tcp", "--syn",
             "-m", "comment", "--comment", cfg.comment,
             "-j", "NFQUEUE", *target, "--queue-bypass"]]


def _ip6tables_argv(action: str, spec: list[str], table: str = IP6TABLES_TABLE) -> list[str]:
    return [IP6TABLES, *IP6TABLES_WAIT, "-t", table, action, *spec]


_PROBE_RULESET = """\
table inet srv6pipes_probe {
    chain probe {
        type filter hook prerouting priority mangle - 1; policy accept;
        meta l4proto tcp queue num 0 bypass
    }
}
"""


@functools.lru_cache(maxsize=None)
def _probe_nft_queue(netns_cookie: int) -> str:
    if shutil.which("nft") is None:
        return IP6TABLES
    # `nft -c` sends the batch to the kernel and aborts it: the kernel validates the
    # expressions (ENOENT for `queue` without NFT_QUEUE) and nothing is committed.
    proc = _run(["nft", "-c", "-f", "-"], input=_PROBE_RULESET, check=False)
    if proc.returncode == 0:
        return "nft"
    log.debug("nft queue probe failed: %s", proc.stderr.strip())
    return IP6TABLES


def queue_backend() -> str:
    """``'nft'`` when this kernel runs nft's ``queue`` statement, else ``'ip6tables-legacy'``.

    Probed once per network namespace with a throwaway table checked by ``nft -c`` (nothing is
    committed). Linux 6.18 here lacks NFT_QUEUE, so the answer is ip6tables-legacy.
    """
    return _probe_nft_queue(netns_cookie())


def netns_cookie() -> int:
    """The current thread's network namespace cookie: unique per namespace, never reused."""
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, system.SO_NETNS_COOKIE, 8), "little")


def netns_inode() -> int:
    """The inode of the calling thread's network namespace (may be reused once it is gone)."""
    return os.stat("/proc/thread-self/ns/net").st_ino


def state_path(cfg: KernelConfig) -> Path:
    return STATE_DIR / f"{netns_inode()}-{cfg.name}.json"


# ---------------------------------------------------------------------------- sysctls


def _interfaces() -> list[str]:
    return sorted(p.name for p in SYSCTL_ROOT.iterdir() if p.name not in ("all", "default"))


def _sysctl_wanted(cfg: KernelConfig | None = None) -> list[tuple[str, str]]:
    """(key, value) in the order they are written. A key is a path relative to
    net/ipv6/conf, or, starting with "net/", relative to /proc/sys."""
    wanted = [(f"all/{SEG6}", "1"), (f"default/{SEG6}", "1")]
    wanted += [(f"{iface}/{SEG6}", "1") for iface in _interfaces()]
    if cfg is not None and cfg.kernel_hmac_off:
        # Read per interface only (seg6_hmac_validate_skb): default/ for later interfaces.
        wanted += [(f"{iface}/{REQUIRE_HMAC}", "-1") for iface in ("default", *_interfaces())]
    # Writing all/forwarding also rewrites default/ and every interface's forwarding: remember
    # those too, so that remove() can put back a per-interface value that differed.
    wanted.append((f"all/{FORWARDING}", "1"))
    # A listener that closes (old workers after a reload) hands its queued connections to
    # another listener of its SO_REUSEPORT group instead of resetting them (IPv6 too).
    if _sysctl_read(MIGRATE_REQ) is not None:
        wanted.append((MIGRATE_REQ, "1"))
    return wanted


def _sysctl_path(key: str) -> Path:
    return Path("/proc/sys") / key if key.startswith("net/") else SYSCTL_ROOT / key


def _sysctl_read(key: str) -> str | None:
    try:
        return _sysctl_path(key).read_text().strip()
    except FileNotFoundError:
        return None


def _sysctl_write(key: str, value: str) -> bool:
    try:
        _sysctl_path(key).write_text(value + "\n")
        return True
    except FileNotFoundError:  # the interface is gone
        return False


def _sysctl_display(key: str, value: str) -> str:
    if key.startswith("net/"):
        return f"sysctl -w {key.replace('/', '.')}={value}"
    iface, leaf = key.split("/")
    if "." in iface:  # sysctl(8) reads dots as separators: use the slash form
        return f"sysctl -w net/ipv6/conf/{iface}/{leaf}={value}"
    return f"sysctl -w net.ipv6.conf.{iface}.{leaf}={value}"


def _forwarding_keys() -> list[str]:
    return [f"all/{FORWARDING}", f"default/{FORWARDING}"] + [
        f"{iface}/{FORWARDING}" for iface in _interfaces()
    ]


def _restore_sysctls(saved: dict[str, list[str]]) -> None:
    """Put back {key: [old, ours]} where the value is still ours (someone else's change wins).

    Keys are restored in their saved order: all/ before default/ before interfaces, because
    writing all/forwarding rewrites the other two.
    """
    forwarding_reset = False
    for key, (old, ours) in saved.items():
        current = _sysctl_read(key)
        if current is None or current == old:
            continue
        if key == f"all/{FORWARDING}":
            forwarding_reset = True
        elif forwarding_reset and key.endswith(f"/{FORWARDING}"):
            # Restoring all/forwarding just overwrote this one: put the old value back.
            _sysctl_write(key, old)
            continue
        if current != ours:
            log.info("sysctl %s is %s, not the %s we set: leaving it", key, current, ours)
            continue
        _sysctl_write(key, old)


# ---------------------------------------------------------------------------- state file


def _load_state(cfg: KernelConfig) -> dict | None:
    path = state_path(cfg)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable state file %s: %s", path, exc)
        return None
    if state.get("netns_cookie") != netns_cookie():
        # Same inode, other namespace: the one that wrote it is gone, so are its changes.
        log.info("state file %s belongs to a namespace that no longer exists: dropping it", path)
        path.unlink(missing_ok=True)
        return None
    return state


def _save_state(cfg: KernelConfig, state: dict) -> None:
    path = state_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- routing


def _ipr():
    from pyroute2 import IPRoute  # imported lazily: plan() works without pyroute2

    return IPRoute()


def _netlink_code(exc: Exception) -> int | None:
    return getattr(exc, "code", None)


def _rule_kwargs(cfg: KernelConfig) -> dict:
    return dict(
        family=socket.AF_INET6, fwmark=cfg.fwmark, fwmask=cfg.fwmark,
        table=cfg.table, priority=cfg.rule_priority,
    )


def _route_kwargs(cfg: KernelConfig, lo_index: int) -> dict:
    return dict(family=socket.AF_INET6, dst="::/0", type="local", table=cfg.table, oif=lo_index)


def _install_routing(cfg: KernelConfig) -> None:
    with _ipr() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        if not ipr.get_links(lo)[0]["flags"] & 1:  # IFF_UP: a `local` route needs lo up
            log.info("bringing lo up (the local route of table %d needs it)", cfg.table)
            ipr.link("set", index=lo, state="up")
        ipr.route("add", **_route_kwargs(cfg, lo))
        ipr.rule("add", **_rule_kwargs(cfg))


def _remove_routing(cfg: KernelConfig) -> None:
    gone = (errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL)
    with _ipr() as ipr:
        for _ in range(100):  # duplicates are possible when added without NLM_F_EXCL
            try:
                ipr.rule("del", **_rule_kwargs(cfg))
            except Exception as exc:  # NetlinkError
                if _netlink_code(exc) in gone:
                    break
                raise KernelSetupError(f"deleting ip rule fwmark {cfg.fwmark:#x}: {exc}") from exc
        lo = ipr.link_lookup(ifname="lo")[0]
        for _ in range(100):
            try:
                ipr.route("del", **_route_kwargs(cfg, lo))
            except Exception as exc:
                if _netlink_code(exc) in gone:
                    break
                raise KernelSetupError(f"deleting local route of table {cfg.table}: {exc}") from exc


# ---------------------------------------------------------------------------- netfilter


def _remove_nft(cfg: KernelConfig) -> None:
    if shutil.which("nft") is None:
        return
    proc = _run(["nft", "delete", "table", "inet", cfg.nft_table], check=False)
    if proc.returncode != 0 and "No such file or directory" not in proc.stderr:
        raise KernelSetupError(f"nft delete table inet {cfg.nft_table}: {proc.stderr.strip()}")


def _remove_ip6tables(cfg: KernelConfig) -> None:
    """Delete every rule carrying our comment, whatever its other options, in the recipe's
    table and in the tables older versions used."""
    if shutil.which(IP6TABLES) is None:
        return
    for table in (IP6TABLES_TABLE, *IP6TABLES_OLD_TABLES):
        _remove_ip6tables_from(cfg, table)


def _remove_ip6tables_from(cfg: KernelConfig, table: str) -> None:
    if not _ip6tables_table_exists(table):
        return      # listing it would create it (and hook it) just to find nothing
    for _ in range(1000):
        proc = _run([IP6TABLES, *IP6TABLES_WAIT, "-t", table, "-S"], check=False)
        if proc.returncode != 0:
            # No ip6_tables module or table: then there is no rule of ours either.
            log.debug("%s -t %s -S: %s", IP6TABLES, table, proc.stderr.strip())
            return
        ours = [
            shlex.split(line)
            for line in proc.stdout.splitlines()
            if line.startswith("-A ") and cfg.comment in shlex.split(line)
        ]
        if not ours:
            return
        for words in ours:
            _run(_ip6tables_argv("-D", words[1:], table), check=False)
    raise KernelSetupError(f"could not delete the {IP6TABLES} rules commented {cfg.comment} "
                           f"in table {table}")


def _ip6tables_table_exists(table: str) -> bool:
    """Whether the calling thread's namespace has the legacy table ``table`` already.

    /proc/net/ip6_tables_names lists them. A missing file (module not loaded) means no
    table; an unreadable one is treated as "maybe", so removal still looks."""
    try:
        with open("/proc/thread-self/net/ip6_tables_names") as f:
            return table in f.read().split()
    except FileNotFoundError:
        return False
    except OSError:
        return True


# ---------------------------------------------------------------------------- API


def plan(cfg: KernelConfig, backend: str | None = None) -> list[str]:
    """The shell commands equivalent to ``install(cfg)``, in the order install runs them.

    Human readable and exact (``pipesd --dry-run``). Reads the interface list and probes the
    queue backend of the current namespace, changes nothing.
    """
    backend = backend or queue_backend()
    lines = [_sysctl_display(key, value) for key, value in _sysctl_wanted(cfg)]
    lines.append(f"ip -6 route add local ::/0 dev lo table {cfg.table} proto static")
    lines.append(
        f"ip -6 rule add fwmark {cfg.fwmark:#x}/{cfg.fwmark:#x} lookup {cfg.table} "
        f"priority {cfg.rule_priority}"
    )
    if backend == IP6TABLES:
        lines += [shlex.join(_ip6tables_argv("-A", rule)) for rule in _ip6tables_rules(cfg)]
    lines.append("nft -f - <<'EOF'\n" + render_ruleset(cfg, backend) + "EOF")
    if cfg.intercept_cookies:
        lines.append(f"# SYN-cookie ACKs to the listener: {cookies.OBJECT_NAME} (patched: locator "
                     f"{cfg.locator}, port {cfg.port}) on every interface but lo:")
        lines.append(f"#   tc qdisc add dev IFACE clsact; tc filter add dev IFACE ingress prio "
                     f"{cfg.rule_priority} bpf direct-action (loaded with bpf(), named "
                     f"{cookies.filter_name(cfg.name)})")
    return lines


def _attach_cookie_program(cfg: KernelConfig) -> dict:
    """Loads and attaches cookies.py's program; returns what the state file keeps. A
    program that cannot be had is not fatal: cookie connections are then reset, as they
    always were, and the reason is logged and shown by `pipesctl stats`."""
    try:
        fd = cookies.load(cookies.program(cfg.locator, cfg.port))
        try:
            added = cookies.attach(fd, cfg.name, cfg.rule_priority)
        finally:
            os.close(fd)      # the filters hold the program now
    except cookies.CookieError as exc:
        log.warning("SYN-cookie connections will not be intercepted: %s", exc)
        return {"error": str(exc)}
    return {"added_clsact": added}


def install(cfg: KernelConfig) -> dict:
    """Install the recipe for ``cfg`` in the calling thread's network namespace.

    First removes any leftover of an instance with the same name (a crash, or a previous
    install), restoring the sysctls it recorded; so installing twice is installing once.
    Order: sysctls, routing, NFQUEUE, then nft (interception last, once the SYN copy is in
    place). On failure, what was installed is removed again and the error re-raised.
    """
    backend = queue_backend()
    remove(cfg)
    log.info(
        "installing kernel recipe %s: locator %s -> port %d, fwmark %#x, table %d, NFQUEUE %d via %s",
        cfg.name, cfg.locator, cfg.port, cfg.fwmark, cfg.table, cfg.queue_num, backend,
    )
    saved: dict[str, list[str]] = {}
    state = {"netns_cookie": netns_cookie(), "config": cfg.to_json(), "backend": backend, "sysctls": saved}
    # Record before writing: a crash between the two must still be recoverable.
    wanted = _sysctl_wanted(cfg)
    for key, value in wanted:
        old = _sysctl_read(key)
        if old is not None:
            saved[key] = [old, value]
    for key in _forwarding_keys():  # all/forwarding rewrites these: remember their values
        old = _sysctl_read(key)
        if key not in saved and old is not None:
            saved[key] = [old, "1"]
    _save_state(cfg, state)
    try:
        for key, value in wanted:
            _sysctl_write(key, value)
        _install_routing(cfg)
        if backend == IP6TABLES:
            for rule in _ip6tables_rules(cfg):
                _run(_ip6tables_argv("-A", rule))
        _run(["nft", "-f", "-"], input=render_ruleset(cfg, backend))
        if cfg.intercept_cookies:
            state["cookies"] = _attach_cookie_program(cfg)
            _save_state(cfg, state)
        return state
    except BaseException:
        log.error("installing kernel recipe %s failed: removing what was installed", cfg.name)
        try:
            remove(cfg)
        except Exception:  # keep the first error, it says what went wrong
            log.exception("cleanup after the failed install of %s failed too", cfg.name)
        raise


def remove(cfg: KernelConfig) -> None:
    """Remove everything :func:`install` set up for ``cfg.name`` and restore the sysctls.

    Idempotent; never raises because something is already gone. Also removes the objects of
    the configuration recorded in a leftover state file, if it differed (crash recovery).
    """
    state = _load_state(cfg)
    configs = [cfg]
    if state is not None:
        # "replacing": a replace() that did not finish (crash) had both installed.
        for key in ("config", "replacing"):
            if key not in state:
                continue
            try:
                old = KernelConfig.from_json(state[key])
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("state file of %s has no usable %s: %s", cfg.name, key, exc)
                continue
            if old not in configs:
                configs.append(old)
    # Reverse install order: stop intercepting first.
    added_clsact = (state or {}).get("cookies", {}).get("added_clsact", [])
    cookies.detach(cfg.name, added_clsact)
    for c in configs:
        _remove_nft(c)
    for c in configs:
        _remove_ip6tables(c)
    for c in configs:
        _remove_routing(c)
    if state is not None:
        _restore_sysctls(state.get("sysctls", {}))
        state_path(cfg).unlink(missing_ok=True)
        log.info("removed kernel recipe %s, sysctls restored", cfg.name)


def _cookie_fields(cfg: KernelConfig) -> tuple:
    return (cfg.locator, cfg.port, cfg.rule_priority, cfg.intercept_cookies)


def replace(old: KernelConfig, new: KernelConfig) -> dict:
    """A reload's kernel change, make-before-break: ``new`` is installed while ``old`` still
    intercepts, then what only ``old`` needed is removed. So no SYN arrives to a namespace
    without interception, and the packets of established flows stay marked and routed.

    * routing: the new rule (and ``local`` route, in a new table) is added first; rules of
      different priority or mark coexist, the first match wins and both lead to a local
      route; the old ones go last;
    * NFQUEUE (ip6tables-legacy): the new rule is appended, then the old one deleted (the
      same queue number twice only duplicates a copy for a moment);
    * nftables: the table's rules are flushed and the new ones added in one nft
      transaction (atomic for the kernel; the chains and their hooks stay);
    * sysctls: the new set is written; a key only the old set changed gets its original
      value back; the originals recorded by install() stay recorded.

    The SYN-cookie program (a tc filter named after the instance) is the exception: when
    its locator, port or priority change it is detached and attached again, and connections
    answered with a SYN cookie in that instant are reset, as without the program.

    The state file names both configurations while this runs (``replacing``): after a crash
    in between, remove() removes both. Raises KernelSetupError (then both may be installed:
    the caller removes and reinstalls the one it keeps).
    """
    if old.name != new.name:
        raise ValueError("replace() keeps the instance name; use remove() and install()")
    backend = queue_backend()
    state = _load_state(new)
    if state is None or KernelConfig.from_json(state["config"]) != old:
        log.info("replace: no state of %s's current configuration: installing anew", new.name)
        return install(new)
    log.info("replacing kernel recipe %s make-before-break: %s", new.name, ", ".join(
        f"{f.name} {getattr(old, f.name)} -> {getattr(new, f.name)}"
        for f in dataclasses.fields(KernelConfig) if getattr(old, f.name) != getattr(new, f.name)))
    saved: dict[str, list[str]] = state.setdefault("sysctls", {})
    state["replacing"] = old.to_json()
    state["config"] = new.to_json()
    wanted = _sysctl_wanted(new)
    for key, value in wanted:
        current = _sysctl_read(key)
        if key not in saved and current is not None:
            saved[key] = [current, value]
    _save_state(new, state)

    rule_changed = _rule_kwargs(old) != _rule_kwargs(new)
    table_changed = old.table != new.table
    queue_changed = backend == IP6TABLES and _ip6tables_rules(old) != _ip6tables_rules(new)
    for key, value in wanted:
        _sysctl_write(key, value)
    with _ipr() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        if table_changed:
            ipr.route("add", **_route_kwargs(new, lo))
        if rule_changed:
            ipr.rule("add", **_rule_kwargs(new))
    if queue_changed:
        for rule in _ip6tables_rules(new):
            _run(_ip6tables_argv("-A", rule))
    # Flush the rules and add the new ones in one transaction, instead of the template's
    # delete-and-create: deleting a table unregisters its hooks, and the kernel then drops
    # every packet waiting in any NFQUEUE (nf_queue_nf_hook_drop): the SYNs the capture
    # has not answered yet.
    ruleset = render_ruleset(new, backend)
    recreate = f"delete table inet {new.nft_table}\n"
    if recreate not in ruleset:
        raise KernelSetupError(f"{TEMPLATE_NAME} no longer starts with `{recreate.strip()}`")
    _run(["nft", "-f", "-"], input=ruleset.replace(recreate,
                                                    f"flush table inet {new.nft_table}\n", 1))
    if _cookie_fields(old) != _cookie_fields(new):
        previous = (state.pop("cookies", None) or {}).get("added_clsact", [])
        if new.intercept_cookies:
            cookies.detach(new.name, [])  # the clsact qdiscs we added stay for the new filter
            attached = _attach_cookie_program(new)
            if "error" not in attached:
                attached["added_clsact"] = sorted(set(attached["added_clsact"]) | set(previous))
            state["cookies"] = attached
        else:
            cookies.detach(new.name, previous)
    # Break: what only the old configuration needed.
    gone = (errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL)
    with _ipr() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        for changed, kind, kwargs in ((rule_changed, "rule", _rule_kwargs(old)),
                                      (table_changed, "route", _route_kwargs(old, lo))):
            if not changed:
                continue
            try:
                getattr(ipr, kind)("del", **kwargs)
            except Exception as exc:  # NetlinkError
                if _netlink_code(exc) not in gone:
                    raise KernelSetupError(f"replace: deleting the old {kind}: {exc}") from exc
    if queue_changed:
        for rule in _ip6tables_rules(old):
            _run(_ip6tables_argv("-D", rule), check=False)
    still_wanted = {key for key, _ in wanted}
    for key in [k for k in saved if k not in still_wanted and k.split("/")[-1] == REQUIRE_HMAC]:
        original, ours = saved.pop(key)
        if _sysctl_read(key) == ours:
            _sysctl_write(key, original)
    del state["replacing"]
    _save_state(new, state)
    return state
