"""The control-plane part of ``make demo``: the architecture of paper III-D/III-E running
on the campus testbed (pipes/lab/campus.py), shown with real tools (dig, curl, lighttpd).

    c1 (staff) --- a1 --+              +--- p1, p2   pipesd (the same first functions)
    c2 (students) - a2 -+--- r --------+--- ctl      pipes-controller + DNS
                                       +--- p3 --- s pipesd (last functions); lighttpd

1. c1 looks up ``encrypt.decrypt._pipes.www.campus.lab`` with dig: a binding segment;
2. ``pipesctl route`` installs the steering route through it; curl fetches a file: the
   bytes are intact and lighttpd logs c1's own address;
3. c2 (students) asks for the same chain: REFUSED by policy; its dpi chain works;
4. c1 sends a hand-crafted SRH straight to a proxy's function: dropped at a1's edge;
5. ctl (behind no access router) reaches p3 without an HMAC and with a forged one:
   dropped by p3's capture;
6. the proxy carrying c1's binding is killed: the controller moves the binding to the
   other one, the next curl works with nothing changed on c1 (same route, same BSID);
7. everything stops; each host's kernel state is compared with its state before.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import time

from .. import kernelsetup, srhhmac
from ..srh import SRH
from .apps import Lighttpd, private_files
from .campus import ROUTERS, CampusLab
from .testbed import Testbed

FILE_SIZE = 2 * 1024 * 1024
NAME = "www.campus.lab"
HOSTS = ("c1", "c2", "a1", "a2", "r", "p1", "p2", "p3", "ctl")


def _snapshot(host) -> str:
    out = []
    for cmd in (["nft", "list", "ruleset"], ["ip", "-6", "rule"],
                ["ip", "-6", "route", "show", "table", "all"], ["ip", "sr", "hmac", "show"],
                ["ip6tables-legacy-save", "-t", kernelsetup.IP6TABLES_TABLE]):
        text = host.run(cmd, check=False).stdout
        out.append("\n".join(line for line in text.splitlines() if not line.startswith("#")
                             and not line.startswith(":")))
    return "\n".join(out)


def _pipesctl(host, *args, check=True):
    return host.run([sys.executable, "-c", "import sys; from srv6pipes.cli import pipesctl_main; "
                     "sys.exit(pipesctl_main(sys.argv[1:]))", *args], check=check)


def _curl(host, url, max_time=10):
    result = host.run(["sh", "-c", f"curl -sS -g --max-time {max_time} -H 'Host: {NAME}' "
                                   f"'{url}' | sha256sum"], check=False, timeout=max_time + 10)
    return result.stdout.split()[0], result.stderr.strip()


def _answer_lines(dig_output: str) -> list[str]:
    keep = []
    for line in dig_output.splitlines():
        if "status:" in line or "EDE" in line or (line and not line.startswith(";")):
            keep.append("   " + line.strip())
    return keep


def run() -> bool:
    """Runs the control-plane demo; returns True when every step did what it should."""
    # Key files must be in a folder only root can change (pipesd refuses them elsewhere).
    with private_files("ctl-demo-") as workdir:
        return _run(workdir)


def _run(workdir: str) -> bool:
    docroot = os.path.join(workdir, "www")
    os.mkdir(docroot)
    payload = os.urandom(FILE_SIZE)
    with open(os.path.join(docroot, "file.bin"), "wb") as handle:
        handle.write(payload)
    expected = hashlib.sha256(payload).hexdigest()
    ok = True

    def check(condition: bool, what: str) -> None:
        nonlocal ok
        ok &= bool(condition)
        print(f"   -> {'OK' if condition else 'FAILED'}: {what}")

    print("\n######## the control plane: controller, access routers, proxies ########")
    with Testbed(topology="campus") as tb:
        before = {name: _snapshot(tb.hosts[name]) for name in HOSTS}
        c1, c2, s, ctl = (tb.hosts[n] for n in ("c1", "c2", "s", "ctl"))
        print(f"testbed: staff c1 {c1.addr} behind a1, students c2 {c2.addr} behind a2, "
              f"proxies p1/p2 (failover pair) and p3, controller + DNS on ctl {ctl.addr}, "
              f"lighttpd on s {s.addr}")
        server = Lighttpd(s, docroot)
        lab = CampusLab(tb, workdir, "demo")
        controller = f"[{lab.dns[0]}]:{lab.dns[1]}"
        url = f"http://[{s.addr}]/file.bin"
        try:
            lab.start()
            print("started: pipesd + serve-health on p1 p2 p3 (--require-hmac), pipes-agent on "
                  "a1 a2, pipes-controller on ctl")

            print(f"\n== 1. c1: dig @{lab.dns[0]} encrypt.decrypt._pipes.{NAME} TXT")
            dig = lab.dig("c1", f"encrypt.decrypt._pipes.{NAME}", "TXT")
            print("\n".join(_answer_lines(dig.stdout)))
            check("status: NOERROR" in dig.stdout and "bsid=fd00:a1::b:" in dig.stdout,
                  "the controller answered with a binding segment of a1's block")

            print(f"\n== 2. c1: pipesctl route {NAME} --chain encrypt,decrypt --controller "
                  f"{controller} --dev to-a1 --apply;  curl {url}")
            route = _pipesctl(c1, "route", NAME, "--chain", "encrypt,decrypt", "--controller",
                              controller, "--dev", "to-a1", "--apply")
            print("   " + route.stdout.strip().replace("\n", "\n   "))
            digest, err = _curl(c1, url)
            check(digest == expected, f"curl got the {FILE_SIZE} bytes intact {err}")
            stats = lab.controller_stats()
            binding = next(b for b in stats["bindings"] if b["chain"] == ["encrypt", "decrypt"])
            print(f"   binding {binding['bsid']}: {' -> '.join(binding['proxies'])} "
                  f"({', '.join(binding['segments'])}), then {binding['server']}")

            print(f"\n== 3. c2 (students): dig encrypt.decrypt._pipes.{NAME}; then the dpi chain")
            dig = lab.dig("c2", f"encrypt.decrypt._pipes.{NAME}", "TXT")
            print("\n".join(_answer_lines(dig.stdout)))
            check("status: REFUSED" in dig.stdout, "the students' policy refuses encryption")
            route = _pipesctl(c2, "route", NAME, "--chain", "dpi", "--controller", controller,
                              "--dev", "to-a2", "--apply")
            digest, err = _curl(c2, url)
            check(digest == expected, "c2's dpi chain (p3) works")

            print("\n== 4. c1 writes its own SRH toward p1's xor function (no binding):")
            own = f"{tb.locator('p1')[(1 << 32) | 42]}"
            print(f"   pipesctl route {s.addr} --via {own} --dev to-a1 --apply; curl")
            edge_before = lab.agent_stats("a1")["edge"]["refused"]
            _pipesctl(c1, "route", str(s.addr), "--via", own, "--dev", "to-a1", "--apply")
            digest, err = _curl(c1, url, max_time=3)
            edge_after = lab.agent_stats("a1")["edge"]["refused"]
            print(f"   curl: {err or digest}")
            check(digest != expected and edge_after > edge_before,
                  f"a1's edge filter dropped it ({edge_after - edge_before} packets counted)")
            _pipesctl(c1, "route", NAME, "--chain", "encrypt,decrypt", "--controller", controller,
                      "--dev", "to-a1", "--apply")

            print("\n== 5. ctl (behind no access router) reaches p3 directly:")
            refused_before = lab.proxies["p3"].stats()["srh_table"]["hmac_refused"]
            _pipesctl(ctl, "route", str(s.addr), "--via", f"{tb.locator('p3')[0]}",
                      "--dev", "to-r", "--apply")
            digest, err = _curl(ctl, url, max_time=3)
            print(f"   curl with an SRH and no HMAC: {err or digest}")
            _pipesctl(ctl, "route", str(s.addr), "--via", f"{tb.locator('p3')[0]}",
                      "--dev", "to-r", "--delete")
            forged = srhhmac.sign(SRH.from_path([tb.locator("p3")[0], s.addr]), ctl.addr.packed,
                                  ROUTERS["a1"][2], b"a guessed secret")
            with ctl.enter():
                sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_IPV6, 57, forged.to_bytes())
            sock.settimeout(3)
            try:
                sock.connect((str(s.addr), 80))
                outcome = "connected"
            except OSError as exc:
                outcome = str(exc)
            finally:
                sock.close()
            print(f"   a socket with a forged HMAC (key id {ROUTERS['a1'][2]}): {outcome}")
            refused_after = lab.proxies["p3"].stats()["srh_table"]["hmac_refused"]
            check(digest != expected and outcome != "connected"
                  and refused_after >= refused_before + 2,
                  f"p3 dropped them ({refused_after - refused_before} SYNs counted as "
                  "hmac_refused)")

            print("\n== 6. the proxy carrying c1's binding crashes (SIGKILL of its pipesd)")
            victim = binding["proxies"][0]
            routes_before = c1.run(["ip", "-6", "route", "show", f"{s.addr}/128"]).stdout
            lab.proxies[victim].proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            lab.proxies[victim].proc.wait(5)
            digest, attempts = None, 0
            while time.monotonic() - killed < 20 and digest != expected:
                attempts += 1
                digest, err = _curl(c1, url, max_time=2)
            elapsed = time.monotonic() - killed
            stats = lab.controller_stats()
            moved = next(b for b in stats["bindings"] if b["bsid"] == binding["bsid"])
            event = stats["failovers"][-1] if stats["failovers"] else {}
            print(f"   controller: {victim} down, binding {moved['bsid']} now "
                  f"{' -> '.join(moved['proxies'])} (detected to installed at a1: "
                  f"{event.get('detect_to_installed_ms')} ms)")
            print(f"   curl from c1 succeeded {elapsed:.2f} s after the crash ({attempts} tries, "
                  "curl's own 2 s timeout included)")
            same_route = c1.run(["ip", "-6", "route", "show", f"{s.addr}/128"]).stdout == routes_before
            check(digest == expected and moved["proxies"][0] != victim and same_route,
                  "the next connection went through the other proxy, c1 changed nothing")
            lab.proxies[victim].log_file.close()
            lab.start_proxy_daemon(victim)
            print(f"   {victim}'s pipesd restarted: it removed its crashed predecessor's rules")

            for name, proxy in sorted(lab.proxies.items()):
                table = proxy.stats()["srh_table"]
                print(f"   {name}: SYNs {table['syn_seen']}, stacked (via a binding) "
                      f"{table['stacked']}, hmac_refused {table['hmac_refused']}")
            counters = lab.controller_stats()["counters"]
            print(f"   controller: {json.dumps(counters, sort_keys=True)}")
        finally:
            lab.stop()
            server.stop()
            for client, dev in (("c1", "to-a1"), ("c2", "to-a2")):
                _pipesctl(tb.hosts[client], "route", str(s.addr), "--via", "::1", "--dev", dev,
                          "--delete", check=False)
        seen = set(server.clients_seen())
        print(f"\n== lighttpd on s logged requests from {sorted(seen)}")
        check(seen == {str(c1.addr), str(c2.addr)}, "the server saw the clients' own addresses")
        left = [name for name in HOSTS if _snapshot(tb.hosts[name]) != before[name]]
        check(not left, "every component removed its routes, rules, nft tables and HMAC keys"
              + (f" (left: {left})" if left else ""))
    return ok
