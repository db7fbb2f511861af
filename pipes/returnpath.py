"""Return traffic for off-path proxies, on a stock kernel (paper IV-E).

The problem: a proxy P2 reached through P1 must send its SYN-ACK and every later packet
of the client-facing connection back through P1, not straight to the client. The paper
patched the kernel to install a per-connection SRH from the SYN. Here the routing does it:

  1. The capture process computes the connection's return segments from the SYN's SRH
     (`return_segments`: the earlier proxies reversed, or the return-path TLV) and gives the
     queued SYN a firewall mark naming that path: (path id << 16) | fwmark.
  2. With net.ipv4.tcp_fwmark_accept=1 (it applies to IPv6 too) the kernel copies the SYN's
     mark into the request socket (the SYN-ACK's route lookup uses it) and into the
     accepted socket (every later packet uses it).
  3. One policy rule and one routing table per distinct return path (created on first
     use) route locally generated packets with that mark through a seg6 inline
     encapsulation of the return segments. The table also 'throws' the first segment so
     the encapsulated packet's own lookup falls through to the main table.
  4. A base rule sends every other locally generated marked packet (accepted sockets of
     on-path connections) to the main table, not to the local-delivery table.

Rules (priority P = the instance's rule priority):
    P-2 - k   iif lo fwmark (k<<16)|F / 0xffff0000|F   lookup TABLE_BASE + k
    P-1       iif lo fwmark F/F                         lookup main
    P         fwmark F/F                                lookup T      (kernelsetup: local ::/0)
"""
from __future__ import annotations

import errno
import ipaddress
import json
import logging
import socket
from pathlib import Path
from typing import Sequence

from . import system
from .addressplan import AddressPlan
from .srh import SRH, SRHError

log = logging.getLogger("srv6pipes.returnpath")

MARK_SHIFT = 16
MAX_PATHS = 1024
TABLE_BASE = 20000
FWMARK_ACCEPT = "/proc/sys/net/ipv4/tcp_fwmark_accept"
MAIN_TABLE = 254
GONE = (errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL)


def return_segments(srh: SRH, client, mode: str, plan: AddressPlan | None) -> list | None:
    """The segments a reply to `client` must visit, client last; None when it goes direct.

    srh is the SYN's header as this proxy received it (segments_left = our segment).
    mode 'reverse': the proxies before us, in reverse order. mode 'tlv': the SYN's
    return-path TLV, from the entry after our own locator's (else reversed).
    """
    if mode == "on-path":
        return None
    if mode == "tlv":
        path = srh.return_path()
        if path:
            for index, segment in enumerate(path):
                if plan is not None and plan.contains(segment):
                    path = path[index + 1:]
                    break
            return path if len(path) > 1 else None
    back = srh.reversed_to(ipaddress.IPv6Address(client))
    return back.path if back is not None else None


class ReturnRoutes:
    """Maps return paths to marks and keeps their rules and tables (capture process only)."""

    def __init__(self, name: str, fwmark: int, rule_priority: int, mode: str,
                 plan: AddressPlan | None, state_dir: Path = system.STATE_DIR):
        self.name = name
        self.fwmark = fwmark
        self.rule_priority = rule_priority
        self.mode = mode
        self.plan = plan
        self.state_path = _state_file(state_dir, name, "return-paths.json")
        self.paths: dict[tuple[str, ...], int] = {}
        if self.state_path.exists():  # capture restarted: connections still use old marks
            for key, path_id in json.loads(self.state_path.read_text()).items():
                self.paths[tuple(key.split(","))] = path_id

    def mark_for(self, srh: SRH, client) -> int:
        """Called per SYN before its verdict; 0 means: no return path, keep the mark."""
        segments = return_segments(srh, client, self.mode, self.plan)
        if not segments:
            return 0
        key = tuple(str(s) for s in segments[:-1])
        path_id = self.paths.get(key)
        if path_id is None:
            if len(self.paths) >= MAX_PATHS:
                raise SRHError(f"more than {MAX_PATHS} distinct return paths")
            path_id = len(self.paths) + 1
            self.install_path(path_id, key)
            self.paths[key] = path_id
            self.state_path.write_text(json.dumps({",".join(k): v for k, v in self.paths.items()}))
        return (path_id << MARK_SHIFT) | self.fwmark

    def install_path(self, path_id: int, segments: Sequence[str]) -> None:
        from pyroute2 import IPRoute

        table = TABLE_BASE + path_id
        with IPRoute() as ipr:
            first = ipr.route("get", dst=segments[0], family=socket.AF_INET6)[0]
            gateway = first.get_attr("RTA_GATEWAY")
            oif = first.get_attr("RTA_OIF")
            route = dict(family=socket.AF_INET6, dst="::/0", table=table, oif=oif,
                         encap={"type": "seg6", "mode": "inline", "segs": ",".join(segments)})
            if gateway:
                route["gateway"] = gateway
            ipr.route("replace", **route)
            ipr.route("replace", family=socket.AF_INET6, dst=f"{segments[0]}/128",
                      table=table, type="throw")
            ipr.rule("add", **path_rule(self.fwmark, self.rule_priority, path_id))
        log.info("return path %d: replies via %s (table %d)", path_id, " ".join(segments), table)


def _state_file(state_dir: Path, name: str, what: str) -> Path:
    """Per network namespace and instance, like kernelsetup's state file: instances of the
    same name in two namespaces must not share saved values."""
    from .kernelsetup import netns_inode

    return state_dir / f"{netns_inode()}-{name}-{what}"


def path_rule(fwmark: int, rule_priority: int, path_id: int) -> dict:
    return dict(family=socket.AF_INET6, iifname="lo", priority=rule_priority - 2,
                fwmark=(path_id << MARK_SHIFT) | fwmark, fwmask=0xFFFF0000 | fwmark,
                table=TABLE_BASE + path_id)


def base_rule(fwmark: int, rule_priority: int) -> dict:
    return dict(family=socket.AF_INET6, iifname="lo", priority=rule_priority - 1,
                fwmark=fwmark, fwmask=fwmark, table=MAIN_TABLE)


def plan(fwmark: int, rule_priority: int) -> list[str]:
    """Shell equivalent of install() and of what the capture adds per return path."""
    mask = 0xFFFF0000 | fwmark
    return [
        "sysctl -w net.ipv4.tcp_fwmark_accept=1",
        f"ip -6 rule add iif lo fwmark {fwmark:#x}/{fwmark:#x} lookup main priority {rule_priority - 1}",
        "# then, the first time return path K (segments SEGS, first segment FIRST) is seen:",
        f"#   ip -6 rule add iif lo fwmark $(((K << {MARK_SHIFT}) | {fwmark:#x}))/{mask:#x} "
        f"lookup $(({TABLE_BASE} + K)) priority {rule_priority - 2}",
        f"#   ip -6 route add default encap seg6 mode inline segs SEGS via GW dev DEV table $(({TABLE_BASE} + K))",
        f"#   ip -6 route add throw FIRST/128 table $(({TABLE_BASE} + K))",
    ]


def install(name: str, fwmark: int, rule_priority: int,
            state_dir: Path = system.STATE_DIR) -> None:
    """Master, at start (off-path modes): base rule and tcp_fwmark_accept (saved first)."""
    from pyroute2 import IPRoute

    remove(name, fwmark, rule_priority, state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    saved = _state_file(state_dir, name, "fwmark-accept")
    saved.write_text(Path(FWMARK_ACCEPT).read_text())
    Path(FWMARK_ACCEPT).write_text("1\n")
    with IPRoute() as ipr:
        ipr.rule("add", **base_rule(fwmark, rule_priority))


def remove(name: str, fwmark: int, rule_priority: int,
           state_dir: Path = system.STATE_DIR) -> None:
    """Removes every rule and table of this instance's return paths; idempotent, and
    also what a restart after a crash runs first."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for rule in ipr.get_rules(family=socket.AF_INET6):
            priority = rule.get_attr("FRA_PRIORITY")
            if priority not in (rule_priority - 1, rule_priority - 2):
                continue
            table = rule.get_attr("FRA_TABLE") or rule["table"]
            try:
                ipr.rule("del", family=socket.AF_INET6, priority=priority,
                         fwmark=rule.get_attr("FRA_FWMARK"), fwmask=rule.get_attr("FRA_FWMASK"),
                         table=table, iifname="lo")
            except Exception as exc:  # noqa: BLE001 - NetlinkError
                if getattr(exc, "code", None) not in GONE:
                    raise
            if TABLE_BASE < table <= TABLE_BASE + MAX_PATHS:
                ipr.flush_routes(table=table, family=socket.AF_INET6)
    saved = _state_file(state_dir, name, "fwmark-accept")
    if saved.exists():
        Path(FWMARK_ACCEPT).write_text(saved.read_text())
        saved.unlink()
    paths = _state_file(state_dir, name, "return-paths.json")
    if paths.exists():
        paths.unlink()
