"""`make demo`: the whole data path on a built-in testbed, then everything is torn down.

    C ---- P1 ---- P2 ---- S          (network namespaces joined by veth pairs)

pipesd runs on P1 and P2. curl on C (unmodified: a seg6 route on C adds the SRH) fetches
a file from lighttpd on S through pairs of functions that undo each other: [P1 xor 42,
P2 xor 42] (P1 scrambles the bytestream, P2 unscrambles it, so S gets a valid HTTP request
and C gets the original file), [compress, decompress], [encrypt, decrypt], then the
example C module vf_caesar loaded into the running daemons ([caesar 7, uncaesar 7]), and
[identity, identity] (recv/send, then splice for bulk). It prints what each side saw.
Then the control plane (controldemo.py): controller, DNS, access routers, policy, edge
and HMAC refusals, failover.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

from ..addressplan import AddressPlan
from .apps import Lighttpd, Pipesd, private_files
from ..modules import module_path
from .testbed import Testbed

FILE_SIZE = 4 * 1024 * 1024
KEY_ID = 1
# (function at P1, function at P2, parameters, id of the P1 function, of the P2 function)
CHAINS = [("xor", "xor", 42, 1, 1), ("compress", "decompress", 6, 3, 4),
          ("encrypt", "decrypt", KEY_ID, 5, 6), ("caesar", "uncaesar", 7, 0x100, 0x101),
          ("identity", "identity", 0, 0, 0)]


def fetch(tb, url: str) -> tuple[str, str]:
    result = tb.hosts["c"].run(["sh", "-c", f"curl -sS -g --max-time 20 '{url}' | sha256sum"])
    return result.stdout.split()[0], result.stderr


def print_stats(name: str, stats: dict) -> None:
    """A few lines of `pipesctl stats` (the full JSON has more)."""
    worker, table = stats["totals"]["worker"], stats["srh_table"]
    print(f"\n== pipesctl stats on {name.upper()}: {len(stats['workers'])} workers, "
          f"{worker['accepted']} connections accepted, SRH table: {table['syn_seen']} SYNs "
          f"captured, {worker['table_hits']} hits, {worker['table_misses']} misses")
    for function, counters in sorted(stats["totals"]["functions"].items()):
        print(f"   {function:10} flows {counters['flows_started']} (closed {counters['flows_closed']}, "
              f"reset {counters['flows_reset']}), bytes client->server {counters['bytes_up']}, "
              f"server->client {counters['bytes_down']}")


def main() -> int:
    if os.geteuid() != 0:
        print("the demo builds network namespaces: run it as root", file=sys.stderr)
        return 2
    # pipesd refuses keys and modules others could have changed: the demo's live in a
    # root-only folder (a checkout under /tmp would not do).
    with private_files("demo-") as files:
        ok = data_path_demo(files)
    from .controldemo import run as control_plane_demo

    ok &= control_plane_demo()
    print("\ntestbeds torn down")
    print("DEMO OK" if ok else "DEMO FAILED")
    return 0 if ok else 1


def data_path_demo(files: str) -> bool:
    """C -> P1 -> P2 -> S with pairs of functions that undo each other; True if all went
    as it should."""
    docroot = os.path.join(files, "www")
    os.mkdir(docroot)
    keyring = os.path.join(files, "keyring")
    with open(os.open(keyring, os.O_WRONLY | os.O_CREAT, 0o600), "w") as handle:
        handle.write(f"{KEY_ID} {os.urandom(32).hex()}\n")
    caesar = shutil.copy(module_path("vf_caesar"), files)
    payload = os.urandom(FILE_SIZE // 2) + b"compressible text " * (FILE_SIZE // 36)
    with open(os.path.join(docroot, "file.bin"), "wb") as handle:
        handle.write(payload)
    expected = hashlib.sha256(payload).hexdigest()
    ok = True
    with Testbed(proxies=2) as tb:
        c, s = tb.hosts["c"], tb.hosts["s"]
        print(f"testbed: C {c.addr} -> P1 (locator {tb.locator('p1')}) -> "
              f"P2 (locator {tb.locator('p2')}) -> S {s.addr}")
        server = Lighttpd(s, docroot)
        proxies = {name: Pipesd(tb.hosts[name], tb.locator(name), f"demo_{name}",
                                extra=("--keyring", keyring))
                   for name in ("p1", "p2")}
        try:
            url = f"http://[{s.addr}]/file.bin"
            for first, second, params, first_id, second_id in CHAINS:
                if first == "caesar":
                    print(f"\n== pipesctl load {caesar}  (on P1 and P2, while they run)")
                    for name, proxy in proxies.items():
                        loaded = json.loads(proxy.ctl("load", caesar).stdout)
                        print(f"   {name.upper()}: module {loaded['module']} loaded in "
                              f"{loaded['workers']} workers: " + ", ".join(
                                  f"{f['name']} ({f['id']:#x})" for f in loaded["functions"]))
                segments = [AddressPlan(tb.locator("p1")).encode(first_id, params),
                            AddressPlan(tb.locator("p2")).encode(second_id, params)]
                tb.steer(client="c", dest="s", segments=segments)
                print(f"\n== curl {url}  with SRH [{segments[0]}, {segments[1]}, {s.addr}]"
                      f"  ({first} at P1, {second} at P2)")
                digest, err = fetch(tb, url)
                match = digest == expected
                ok &= match
                print(f"   sha256 of the {FILE_SIZE} bytes received: "
                      f"{'matches' if match else 'DIFFERS'} ({digest[:16]}...) {err.strip()}")
            for name, proxy in proxies.items():
                print_stats(name, proxy.stats())
            server.stop()  # flushes its access log
            seen = server.clients_seen()
            print(f"\n== lighttpd on S logged {len(seen)} requests from: {sorted(set(seen))}"
                  f"  (C is {c.addr}: the server sees the client, not the proxies)")
            ok &= bool(seen) and set(seen) == {str(c.addr)}
        finally:
            for proxy in proxies.values():
                proxy.stop()
            server.stop()
    print("\ntestbed torn down: namespaces deleted, pipesd removed its kernel state")
    return ok


if __name__ == "__main__":
    sys.exit(main())
