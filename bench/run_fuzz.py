#!/usr/bin/env python3
"""Fuzz pipesd at scale: random and mutated control messages, and SYNs with malformed SRHs
toward a function address, while a legitimate client keeps connecting. Afterwards the
daemon must be the same processes, answer, carry traffic, and have grown its memory by
no more than --max-growth-mib.

    python bench/run_fuzz.py                      # 1M control messages, 230k SYNs, ~5 min
    python bench/run_fuzz.py --quick              # 50k and 20k, under a minute

The chaos suite runs the small version (100k control messages); this is the large one.
Generators in srv6pipes.lab.fuzz. Results: printed, and JSON in bench/fuzz-data/.
"""
import argparse
import datetime
import json
import os
import platform
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv6Address

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lab.flood import FLOOD_PREFIX  # noqa: E402
from lab.report import run_settings, save_raw  # noqa: E402

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz-data")


def counters_of(stats: dict) -> dict:
    table = stats.get("srh_table", {})
    worker = stats.get("totals", {}).get("worker", {})
    keep = ("syn_seen", "malformed", "rejected", "no_srh", "not_syn", "errors", "inserts")
    return {"srh_table": {k: table.get(k) for k in keep},
            "worker": {k: v for k, v in worker.items() if v},
            "control": stats.get("control")}


def fuzz_control(proxy, host, count: int, seed: int) -> dict:
    from srv6pipes.lab import fuzz

    rng = random.Random(seed)
    sent = answered = refused = 0
    started = time.monotonic()
    while sent < count:
        batch = [fuzz.control_message(rng) for _ in range(min(1000, count - sent))]
        replies = fuzz.control_batch(host, proxy.control, batch)
        if len(replies) != len(batch):
            raise SystemExit(f"control: {len(replies)} replies to {len(batch)} messages")
        for reply in replies:
            if not isinstance(reply, dict) or type(reply.get("ok")) is not bool:
                raise SystemExit(f"control: malformed reply {reply!r}")
            refused += not reply["ok"]
        sent += len(batch)
        answered += len(replies)
    seconds = time.monotonic() - started
    return {"messages": sent, "answered": answered, "refused": refused,
            "seconds": round(seconds, 1), "per_second": round(sent / seconds)}


def fuzz_syns(tb, function_address, count: int, rate: float, seed: int) -> dict:
    from srv6pipes.lab import fuzz
    from srv6pipes.srh import SRH

    rng = random.Random(seed)
    c, s = tb.hosts["c"], tb.hosts["s"]
    server = IPv6Address(str(s.addr))
    valid = SRH.from_path([function_address, server]).to_bytes()
    sender = fuzz.RawSender(c)
    refused_locally = 0
    # Sources from the flood's spoofed /64 (routed back and black-holed, lab/flood.py), so
    # no fuzzed SYN shares a 4-tuple with the legitimate client's connections.
    spoofed = int(IPv6Address(FLOOD_PREFIX))
    started = time.monotonic()
    try:
        for _ in fuzz.paced(count, rate):
            source = IPv6Address(spoofed | rng.getrandbits(64))
            packet = fuzz.malformed_syn(rng, source, function_address, server, 80, valid)
            refused_locally += not sender.send(packet, function_address)
    finally:
        sender.close()
    seconds = time.monotonic() - started
    return {"syns": count, "refused_by_sender_stack": refused_locally,
            "seconds": round(seconds, 1), "per_second": round(count / seconds)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--syns", type=int, default=230_000)
    parser.add_argument("--syn-rate", type=float, default=5000)
    parser.add_argument("--seed", type=int, default=20261202)
    parser.add_argument("--max-growth-mib", type=float, default=16.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=DATA_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.messages, args.syns = 50_000, 20_000
    from srv6pipes.addressplan import AddressPlan
    from srv6pipes.lab import fuzz
    from srv6pipes.lab.apps import Lighttpd, Pipesd
    from srv6pipes.lab.testbed import Testbed
    from srv6pipes.srh import SRH

    from lab.flood import probe, spoofed_routes

    results = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
               "kernel": platform.release(), "cpus": os.cpu_count(), "settings": run_settings(args)}
    with Testbed(proxies=1) as tb, tempfile.TemporaryDirectory(prefix="sp-fuzz-") as workdir:
        www = os.path.join(workdir, "www")
        os.makedirs(www)
        with open(os.path.join(www, "1k"), "wb") as handle:
            handle.write(os.urandom(1024))
        os.chmod(workdir, 0o755)
        server = Lighttpd(tb.hosts["s"], www, port=80, access_log=False)
        proxy = Pipesd(tb.hosts["p1"], tb.locator("p1"), f"fuzz{os.getpid()}", workers=2)
        identity = IPv6Address(str(AddressPlan(tb.locator("p1")).encode(0)))
        srh = SRH.from_path([identity, tb.hosts["s"].addr]).to_bytes()
        try:
            before = proxy.stats()
            pids = sorted(w["pid"] for w in before["workers"])
            time.sleep(1)
            rss_before = fuzz.process_tree_rss(proxy.proc.pid)
            print(f"== {args.messages} control messages", flush=True)
            results["control"] = fuzz_control(proxy, tb.hosts["p1"], args.messages, args.seed)
            print(f"   {results['control']}", flush=True)
            print(f"== {args.syns} SYNs with malformed SRHs at {args.syn_rate:.0f}/s, "
                  "a legitimate client probing meanwhile", flush=True)
            seconds = args.syns / args.syn_rate
            with spoofed_routes(tb), ThreadPoolExecutor(1) as pool:
                sending = pool.submit(fuzz_syns, tb, identity, args.syns, args.syn_rate,
                                      args.seed)
                during = probe(tb.hosts["c"], tb.hosts["s"].addr, 80, "/1k",
                               max(10, int(seconds * 10)), 0.1, srh).summary()
                results["syns"] = sending.result()
            results["legitimate_during_syns"] = during
            print(f"   {results['syns']}\n   legitimate client: {during}", flush=True)
            time.sleep(2)
            after = proxy.stats()
            rss_after = fuzz.process_tree_rss(proxy.proc.pid)
            after_probe = probe(tb.hosts["c"], tb.hosts["s"].addr, 80, "/1k", 50, 0.02, srh)
            results["after"] = {
                "same_workers": sorted(w["pid"] for w in after["workers"]) == pids,
                "daemon_running": proxy.proc.poll() is None,
                "legitimate_after": after_probe.summary(),
                "rss_mib_before": round(rss_before / 2**20, 1),
                "rss_mib_after": round(rss_after / 2**20, 1),
                "counters": counters_of(after)}
            print(f"   after: {json.dumps(results['after'])}", flush=True)
        finally:
            proxy.stop()
            server.stop()
    growth = results["after"]["rss_mib_after"] - results["after"]["rss_mib_before"]
    ok = (results["after"]["same_workers"] and results["after"]["daemon_running"]
          and results["after"]["legitimate_after"]["success_ratio"] == 1.0
          and results["legitimate_during_syns"].get("success_ratio", 0) >= 0.95
          and growth <= args.max_growth_mib)
    results["verdict"] = "ok" if ok else "FAILED"
    path = save_raw(results, args.out, "fuzz")
    print(f"\n{results['verdict']}: memory {growth:+.1f} MiB; raw data: {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
