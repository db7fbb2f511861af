#!/usr/bin/env python3
"""SYN flood: how many of a legitimate client's connections still succeed while c floods
the middlebox with spoofed SYNs, for pipesd, HAProxy (transparent, TPROXY) and the plain
router (the server itself takes the flood), each in a fresh c - p1 - s testbed.

    python bench/run_flood.py                      # 20k SYN/s for 20 s, ~3 minutes
    python bench/run_flood.py --rate 40000 --modes pipesd-identity
    python bench/run_flood.py --quick              # 5k SYN/s for 5 s

Per mode: a baseline probe without flood, then the flood with the probe running: the
client fetches a 1 KB file every 1/--probe-rate seconds (HTTP/1.0, 5 s timeout each).
For pipesd the flood's SYNs carry an SRH toward its function address (what a client
through the proxy sends), for HAProxy and the router they go to s:80. Spoofed sources come
from a /64 nobody routes (lab/flood.py). Results: printed, and JSON in bench/flood-data/.
"""
import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lab.flood import Flood, probe, spoofed_routes  # noqa: E402
from lab.report import run_settings, save_raw  # noqa: E402
from lab.modes import ModeUnavailable, make_mode  # noqa: E402
from lab.pinning import PINNINGS, apply_rps  # noqa: E402
from lab.servers import HTTP_PORT, Servers  # noqa: E402

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flood-data")
MODES = ("pipesd-identity", "haproxy", "router")


class Lab:
    """What the modes need (see run_lab.py): the testbed, the pinning, a workdir."""

    def __init__(self, tb, pinning, workdir):
        self.tb, self.pinning, self.workdir = tb, pinning, workdir
        self.servers = Servers(tb, workdir, pinning)


def srh_for(mode, lab):
    """The client's SRH bytes toward s through the mode's function address, or None."""
    if not mode.name.startswith("pipesd"):
        return None
    from srv6pipes.srh import SRH

    return SRH.from_path([mode.address(lab), lab.tb.hosts["s"].addr]).to_bytes()


def counters(mode, lab):
    """What the middlebox says about the flood (pipesd's stats; the kernel's for others)."""
    if mode.name.startswith("pipesd"):
        stats = mode.stats(lab) or {}
        return {"srh_table": stats.get("srh_table"), "kernel": stats.get("kernel"),
                "worker": stats.get("totals", {}).get("worker")}
    host = lab.tb.hosts["s" if mode.name == "router" else "p1"]
    out = host.run("nstat -az TcpExtSyncookiesSent TcpExtSyncookiesRecv "
                   "TcpExtSyncookiesFailed TcpExtListenOverflows TcpExtListenDrops",
                   check=False).stdout
    return {"kernel (" + host.name + ")": {line.split()[0]: int(line.split()[1])
                                           for line in out.splitlines()[1:] if line.split()}}


def run_mode(name, args, Testbed, workdir):
    mode = make_mode(name)
    pinning = PINNINGS[args.pinning]
    with Testbed(proxies=1) as tb:
        lab = Lab(tb, pinning, os.path.join(workdir, name))
        os.makedirs(lab.workdir, exist_ok=True)
        for host in ("c", "s"):
            tb.hosts[host].run(["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000"])
        apply_rps(tb, pinning)
        lab.servers.start()
        try:
            mode.setup(lab)
        except ModeUnavailable as exc:
            return {"mode": name, "unavailable": str(exc)}
        try:
            if name.startswith("pipesd"):
                mode.unsteer(lab)      # the probe and the flood carry their own SRH
            c, s = tb.hosts["c"], tb.hosts["s"]
            srh = srh_for(mode, lab)
            interval = 1.0 / args.probe_rate
            print(f"== {name}: baseline ({args.baseline} connections)", flush=True)
            baseline = probe(c, s.addr, HTTP_PORT, "/1KB", args.baseline, interval, srh)
            print(f"   {baseline.summary()}", flush=True)
            segments = [mode.address(lab)] if srh is not None else []
            print(f"== {name}: {args.rate} spoofed SYN/s for {args.seconds} s", flush=True)
            with spoofed_routes(tb):
                flood = Flood(c, s.addr, HTTP_PORT, args.rate, args.seconds, segments)
                time.sleep(1.0)              # let the flood fill the queues first
                attempts = int((args.seconds - 2) * args.probe_rate)
                during = probe(c, s.addr, HTTP_PORT, "/1KB", attempts, interval, srh)
                sent = flood.wait()
            print(f"   {during.summary()}; flood sent {sent}", flush=True)
            return {"mode": name, "description": mode.description,
                    "baseline": baseline.summary(), "flood": during.summary(),
                    "flood_sent": sent, "flood_rate": round(sent / args.seconds),
                    "middlebox": counters(mode, lab)}
        finally:
            mode.teardown(lab)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--rate", type=int, default=20000, help="spoofed SYNs per second")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--probe-rate", type=float, default=20, help="legit connections/s")
    parser.add_argument("--baseline", type=int, default=100)
    parser.add_argument("--pinning", choices=sorted(PINNINGS), default="shared")
    parser.add_argument("--quick", action="store_true", help="5k SYN/s for 5 s")
    parser.add_argument("--out", default=DATA_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.rate, args.seconds, args.baseline = 5000, 5, 20
    from srv6pipes.lab.testbed import Testbed

    results = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
               "kernel": platform.release(), "cpus": os.cpu_count(),
               "settings": run_settings(args), "modes": []}
    with tempfile.TemporaryDirectory(prefix="sp-flood-") as workdir:
        for name in args.modes.split(","):
            results["modes"].append(run_mode(name, args, Testbed, workdir))
    print("\n| mode | success without flood | success under flood | p50 / p99 ms under flood |")
    print("|---|---|---|---|")
    for row in results["modes"]:
        if "unavailable" in row:
            print(f"| {row['mode']} | unavailable: {row['unavailable']} | | |")
            continue
        f = row["flood"]
        print(f"| {row['mode']} | {row['baseline']['success_ratio']:.1%} | "
              f"{f['success_ratio']:.1%} ({f['successes']}/{f['attempts']}) | "
              f"{f['latency_ms_p50']} / {f['latency_ms_p99']} |")
    path = save_raw(results, args.out, "flood")
    print(f"\nraw data: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
