"""What an access-router agent changes in the kernel, and how it takes it all back.

Three kinds of state, all in the agent's network namespace:

* one seg6local route per binding segment (pyroute2)::

      ip -6 route replace BSID/128 encap seg6local action End.B6 \\
          srh segs P1::f1,P3::f3 hmac KEYID dev lo proto 201

  End.B6 inserts the policy's SRH in front of the client's (pipesd flattens the two, see
  srhstack.py); End.B6.Encaps would wrap the packet in an outer IPv6 header that a proxy
  would have to decapsulate before it could see the TCP SYN, which pipesd does not do.
  Our routes carry protocol BINDING_PROTO, so a restart finds every one of them;
* the SRH HMAC key the routes sign with (``ip sr hmac set KEYID sha256``), through the
  kernel's SEG6 generic netlink family. pyroute2 has no client for that family, so
  :class:`Seg6Genl` declares its messages on pyroute2's generic netlink socket (iproute2's
  ``ip sr hmac`` would read the secret from a terminal, and cannot take binary secrets);
* the edge filter ``inet srv6pipes_edge_NAME`` (``kernel/edge.nft.in``, through ``nft``:
  pyroute2's nftables support cannot build sets of concatenations) whose set holds one
  element ``client prefix . BSID . server`` per prefix a binding was granted to.

A state file (``/run/srv6pipes/agent-<netns inode>-<name>.json``, like kernelsetup's)
records the key id and the bindings installed. :meth:`BindingKernel.start` first removes
whatever a previous agent of that name left (routes with our protocol inside the binding
block, the nft table, the key), then re-installs the bindings the file still lists as
unexpired, so a crashed agent's clients keep working until the controller reconciles.
:meth:`BindingKernel.stop` removes everything and the file.
"""
from __future__ import annotations

import dataclasses
import errno
import ipaddress
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ..controller.messages import Binding
from ..kernelsetup import netns_cookie, netns_inode, template_path
from ..system import STATE_DIR

log = logging.getLogger("srv6pipes.agent.kernel")

# Route protocol of our binding routes (rtnetlink RTPROT_*; 201 is unassigned).
BINDING_PROTO = 201
EDGE_TEMPLATE = "edge.nft.in"
TABLE_PREFIX = "srv6pipes_edge_"
GONE = (errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL)
SEG6_HMAC_ALGO_SHA256 = 2


class KernelError(RuntimeError):
    """A kernel change failed; the message names the object and the kernel's words."""


# ---------------------------------------------------------------------- HMAC keys


def _seg6_message_class():
    """The SEG6 generic netlink message (include/uapi/linux/seg6_genl.h), declared once."""
    from pyroute2.netlink import genlmsg

    class seg6msg(genlmsg):
        nla_map = (
            ("SEG6_ATTR_UNSPEC", "none"),
            ("SEG6_ATTR_DST", "ip6addr"),
            ("SEG6_ATTR_DSTLEN", "int32"),
            ("SEG6_ATTR_HMACKEYID", "uint32"),
            ("SEG6_ATTR_SECRET", "cdata"),
            ("SEG6_ATTR_SECRETLEN", "uint8"),
            ("SEG6_ATTR_ALGID", "uint8"),
            ("SEG6_ATTR_HMACINFO", "none"),
        )

    return seg6msg


SEG6_CMD_SETHMAC = 1
SEG6_CMD_DUMPHMAC = 2


class Seg6Genl:
    """``ip sr hmac`` on pyroute2's generic netlink socket, in the calling thread's netns."""

    def __init__(self):
        from pyroute2.netlink.generic import GenericNetlinkSocket

        self.message = _seg6_message_class()
        self.sock = GenericNetlinkSocket()
        try:
            self.sock.bind("SEG6", self.message)
        except Exception as exc:  # noqa: BLE001 - pyroute2 raises NetlinkError or others
            self.sock.close()
            raise KernelError(f"no SEG6 generic netlink family (CONFIG_IPV6_SEG6_HMAC?): "
                              f"{exc}") from exc

    def _request(self, cmd: int, attrs: list, flags: int):
        msg = self.message()
        msg["cmd"] = cmd
        msg["version"] = 0
        msg["attrs"] = attrs
        return self.sock.nlm_request(msg, msg_type=self.sock.prid, msg_flags=flags)

    def set_key(self, key_id: int, secret: bytes) -> None:
        from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST

        self._request(SEG6_CMD_SETHMAC, [["SEG6_ATTR_HMACKEYID", key_id],
                                         ["SEG6_ATTR_SECRET", secret],
                                         ["SEG6_ATTR_SECRETLEN", len(secret)],
                                         ["SEG6_ATTR_ALGID", SEG6_HMAC_ALGO_SHA256]],
                      NLM_F_REQUEST | NLM_F_ACK)

    def delete_key(self, key_id: int) -> None:
        """Secret length 0 deletes (seg6_genl_sethmac); a missing key is not an error."""
        from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST

        try:
            self._request(SEG6_CMD_SETHMAC, [["SEG6_ATTR_HMACKEYID", key_id],
                                             ["SEG6_ATTR_SECRETLEN", 0],
                                             ["SEG6_ATTR_ALGID", SEG6_HMAC_ALGO_SHA256]],
                          NLM_F_REQUEST | NLM_F_ACK)
        except Exception as exc:  # noqa: BLE001
            if getattr(exc, "code", None) not in GONE:
                raise

    def key_ids(self) -> list[int]:
        from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST

        return [m.get_attr("SEG6_ATTR_HMACKEYID")
                for m in self._request(SEG6_CMD_DUMPHMAC, [], NLM_F_REQUEST | NLM_F_DUMP)]

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------------- the state


@dataclasses.dataclass
class Installed:
    """One binding as the kernel has it, with its expiry (wall clock, for the state file)."""

    binding: Binding
    expires_at: float


class BindingKernel:
    """The kernel side of one agent. Not thread-safe: the agent calls it from one thread.

    ``name`` keys the nft table and the state file; ``block`` is the router's binding
    block (BSIDs outside it are refused); ``client_ifaces`` the interfaces clients come
    in on; ``hmac_key`` (key id, secret) signs every binding's SRH, None for no HMAC.
    """

    def __init__(self, name: str, block: ipaddress.IPv6Network, client_ifaces: Sequence[str],
                 hmac_key: Optional[tuple[int, bytes]] = None, behaviour: str = "End.B6",
                 state_dir: Path = STATE_DIR):
        if behaviour not in ("End.B6", "End.B6.Encaps"):
            raise ValueError(f"behaviour {behaviour!r}: End.B6 or End.B6.Encaps")
        self.name = name
        self.block = block
        self.client_ifaces = list(client_ifaces)
        self.hmac_key = hmac_key
        self.behaviour = behaviour
        self.state_dir = state_dir
        self.installed: dict[ipaddress.IPv6Address, Installed] = {}

    @property
    def nft_table(self) -> str:
        return TABLE_PREFIX + self.name

    @property
    def state_path(self) -> Path:
        return self.state_dir / f"agent-{netns_inode()}-{self.name}.json"

    # -- start / stop --------------------------------------------------------------
    def start(self) -> int:
        """Cleans up after a previous agent, installs the filter and the key, re-installs
        the unexpired bindings the state file lists. Returns how many were adopted."""
        adopted = self._leftover_bindings()
        self.remove_all()
        self._save()  # before any change: a crash from here on is recoverable
        if self.hmac_key is not None:
            genl = Seg6Genl()
            try:
                genl.set_key(*self.hmac_key)
            finally:
                genl.close()
        self._load_filter()
        self._save()
        now = time.time()
        for entry in adopted:
            if entry.expires_at > now:
                self.apply(entry.binding, entry.expires_at - now)
        log.info("agent %s: edge filter on %s, HMAC key %s, %d bindings adopted", self.name,
                 ", ".join(self.client_ifaces) or "no interface",
                 self.hmac_key[0] if self.hmac_key else "none", len(self.installed))
        return len(self.installed)

    def stop(self) -> None:
        """Removes every binding, the filter and the key; idempotent."""
        self.remove_all()

    def remove_all(self) -> None:
        """Everything this agent name may have installed in this namespace, whatever is
        recorded: routes with our protocol inside the block, the table, the keys."""
        state = self._read_state()
        key_ids = set(state.get("key_ids", [])) if state else set()
        if self.hmac_key is not None:
            key_ids.add(self.hmac_key[0])
        self._flush_routes()
        _nft(["delete", "table", "inet", self.nft_table], missing_ok=True)
        if key_ids:
            genl = Seg6Genl()
            try:
                for key_id in key_ids:
                    genl.delete_key(key_id)
            finally:
                genl.close()
        self.installed.clear()
        self.state_path.unlink(missing_ok=True)

    # -- bindings --------------------------------------------------------------------
    def apply(self, binding: Binding, lifetime: float) -> bool:
        """Installs or refreshes one binding for ``lifetime`` seconds; returns True when
        the kernel changed (new or different), False for a refresh only. Raises
        KernelError (nothing changed) or ValueError for a BSID outside the block."""
        if binding.bsid not in self.block:
            raise ValueError(f"binding {binding.bsid} is outside this router's block {self.block}")
        expires_at = time.time() + lifetime
        current = self.installed.get(binding.bsid)
        if current is not None and current.binding == binding:
            current.expires_at = expires_at
            return False
        self._replace_route(binding)
        if current is not None:
            self._elements("delete", current.binding)
        self._elements("add", binding)
        self.installed[binding.bsid] = Installed(binding, expires_at)
        self._save()
        return True

    def withdraw(self, bsid: ipaddress.IPv6Address) -> bool:
        """Removes one binding; returns False when it was not installed."""
        current = self.installed.pop(bsid, None)
        if current is None:
            return False
        self._elements("delete", current.binding)
        self._delete_route(bsid)
        self._save()
        return True

    def expire(self, now: Optional[float] = None) -> list[ipaddress.IPv6Address]:
        """Removes the bindings whose lifetime is over; returns their BSIDs."""
        now = time.time() if now is None else now
        gone = [bsid for bsid, entry in self.installed.items() if entry.expires_at <= now]
        for bsid in gone:
            self.withdraw(bsid)
        return gone

    def counters(self) -> dict[str, int]:
        """The edge filter's packet counters: allowed and refused."""
        result = {}
        for name in ("allowed", "refused"):
            proc = _nft(["-j", "list", "counter", "inet", self.nft_table, name], missing_ok=True)
            packets = 0
            if proc is not None and proc.stdout:
                for item in json.loads(proc.stdout).get("nftables", []):
                    if "counter" in item:
                        packets = item["counter"].get("packets", 0)
            result[name] = packets
        return result

    # -- routes ------------------------------------------------------------------------
    def _route_request(self, binding: Binding) -> dict:
        # pyroute2 writes `segs` into segments[1..] in the order given, and the kernel's
        # End.B6 makes the last one active: give them last hop first (wire order). For
        # End.B6.Encaps there is no placeholder slot, the same order holds.
        segs = [str(segment) for segment in reversed(binding.segments)]
        encap = {"type": "seg6local", "action": self.behaviour, "srh": {"segs": segs}}
        if self.hmac_key is not None:
            encap["hmac"] = self.hmac_key[0]  # pyroute2 reads it here, not inside srh
        return dict(dst=f"{binding.bsid}/128", family=socket.AF_INET6, proto=BINDING_PROTO,
                    encap=encap)

    def _replace_route(self, binding: Binding) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            request = self._route_request(binding)
            # A seg6local route needs a device, and not lo: Linux turns a route through
            # lo to a non-local address into a reject route. After End.B6 the kernel looks
            # the route up again for the new destination; give the one toward it.
            try:
                toward = ipr.route("get", dst=str(binding.segments[0]),
                                   family=socket.AF_INET6)[0]
            except Exception as exc:  # noqa: BLE001 - NetlinkError: no route
                raise KernelError(f"binding {binding.bsid}: no route toward its first "
                                  f"segment {binding.segments[0]}: {exc}") from exc
            request["oif"] = toward.get_attr("RTA_OIF")
            try:
                ipr.route("replace", **request)
            except Exception as exc:  # noqa: BLE001 - NetlinkError
                raise KernelError(f"seg6local {self.behaviour} route for {binding.bsid}: "
                                  f"{exc}") from exc

    def _delete_route(self, bsid: ipaddress.IPv6Address) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            try:
                ipr.route("del", dst=f"{bsid}/128", family=socket.AF_INET6,
                          proto=BINDING_PROTO)
            except Exception as exc:  # noqa: BLE001
                if getattr(exc, "code", None) not in GONE:
                    raise KernelError(f"deleting the route of {bsid}: {exc}") from exc

    def _flush_routes(self) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for route in ipr.get_routes(family=socket.AF_INET6, proto=BINDING_PROTO):
                dst = route.get_attr("RTA_DST")
                if dst is None or route["dst_len"] != 128:
                    continue
                if ipaddress.IPv6Address(dst) in self.block:
                    self._delete_route(ipaddress.IPv6Address(dst))

    def routes(self) -> list[ipaddress.IPv6Address]:
        """BSIDs of the binding routes the kernel has in our block (for tests and stats)."""
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            found = [ipaddress.IPv6Address(r.get_attr("RTA_DST"))
                     for r in ipr.get_routes(family=socket.AF_INET6, proto=BINDING_PROTO)
                     if r.get_attr("RTA_DST") and r["dst_len"] == 128]
        return sorted(bsid for bsid in found if bsid in self.block)

    # -- nft ---------------------------------------------------------------------------
    def render_filter(self) -> str:
        text = (template_path().parent / EDGE_TEMPLATE).read_text()
        ifaces = ", ".join(json.dumps(name) for name in self.client_ifaces) or '"none"'
        return text.replace("@NAME@", self.name).replace("@CLIENT_IFACES@", ifaces)

    def _load_filter(self) -> None:
        if shutil.which("nft") is None:
            raise KernelError("nft is not installed: the edge filter needs nftables")
        _nft(["-f", "-"], input=self.render_filter())

    def _elements(self, action: str, binding: Binding) -> None:
        elements = ", ".join(
            f"{prefix} . {binding.bsid} . 0x{int(binding.server):032x}"
            for prefix in binding.clients)
        if elements:
            _nft([action, "element", "inet", self.nft_table, "bindings", f"{{ {elements} }}"],
                 missing_ok=(action == "delete"))

    # -- state file ----------------------------------------------------------------------
    def _read_state(self) -> Optional[dict]:
        try:
            state = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable agent state %s: %s", self.state_path, exc)
            return None
        if state.get("netns_cookie") != netns_cookie():
            log.info("agent state %s belongs to a namespace that is gone: dropped",
                     self.state_path)
            self.state_path.unlink(missing_ok=True)
            return None
        return state

    def _leftover_bindings(self) -> list[Installed]:
        state = self._read_state() or {}
        adopted = []
        for item in state.get("bindings", []):
            try:
                adopted.append(Installed(Binding.from_json(item["binding"]),
                                         float(item["expires_at"])))
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("agent state: skipping a binding: %s", exc)
        return adopted

    def _save(self) -> None:
        state = {
            "netns_cookie": netns_cookie(),
            "nft_table": self.nft_table,
            "key_ids": [self.hmac_key[0]] if self.hmac_key else [],
            "bindings": [{"binding": e.binding.to_json(), "expires_at": e.expires_at}
                         for e in self.installed.values()],
        }
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        os.replace(tmp, self.state_path)


def _nft(args: Iterable[str], input: Optional[str] = None,
         missing_ok: bool = False) -> Optional[subprocess.CompletedProcess]:
    argv = ["nft", *args]
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=30)
    except FileNotFoundError as exc:
        raise KernelError(f"nft is not installed: {exc}") from exc
    if proc.returncode != 0:
        if missing_ok and "No such file or directory" in proc.stderr:
            return None
        raise KernelError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}")
    return proc
