#!/usr/bin/env python3
"""Reproduce the paper's throughput evaluation (section V-A, V-C) as ratios to a router.

Topology (srv6pipes.lab.testbed, proxies=1): c - p1 - s. p1 is the middlebox M1 of the paper,
configured in turn as each mode of ``--modes``. The router always runs: every other mode is
reported as a ratio to the router measured in the same run. Each repetition runs every mode
(order rotated per repetition), each mode in a fresh testbed (no TIME_WAIT sockets, no
leftover state from the previous mode), and each mode runs every workload it supports.
Results: bench/results/<timestamp>.json and .md; the table is also printed.

    python bench/run_lab.py                 # 3 runs per cell (median), ~11 minutes
    python bench/run_lab.py --quick         # 1 run per cell, 3 s load runs, ~3 minutes
    python bench/run_lab.py --modes router,haproxy --mtu 1500

See bench/README.md for the lab, the CPU pinning and how to read the table.
"""
import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lab import report  # noqa: E402
from lab.checks import CheckFailed, wait_quiet  # noqa: E402
from lab.cost import CostMeter  # noqa: E402
from lab.interference import ForeignLoad  # noqa: E402
from lab.modes import DEFAULT_MODES, MODE_NAMES, ModeUnavailable, make_mode  # noqa: E402
from lab.pinning import PINNINGS, Pinning, apply_rps, pinning_note  # noqa: E402
from lab.runplan import run_in_workdir, timing  # noqa: E402
from lab.servers import Servers  # noqa: E402
from lab.workloads import (WorkloadError, blast_workloads, iperf3_workloads,  # noqa: E402
                           wrk_workloads)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass
class Plan:
    """What to measure and how long: everything the run needs besides the testbed."""
    modes: list
    mtus: list
    full_mtus: list          # MTUs at which blast and wrk run too (iperf3 runs at all)
    pinning: Pinning
    repetitions: int
    seconds: int             # length of one load run (iperf3 -t, wrk -d, blast)
    retries: int             # extra runs of a sample disturbed by the rest of the machine
    patience: float          # seconds to wait for an idle machine before a mode's runs
    extra_budget: float      # seconds all re-runs and idle-waits of the run may take together
    workdir: str
    only: list | None = None  # workload names to run (None: all)

    def workloads(self, mtu):
        """Bulk transfers first, then keep-alive HTTP, then one connection per request
        (those leave TIME_WAIT sockets behind); only those named in ``only`` if given."""
        out = iperf3_workloads()
        if mtu in self.full_mtus:
            out += blast_workloads() + wrk_workloads()
        return [wl for wl in out if self.only is None or wl.name in self.only]


class Lab:
    """What modes and workloads need: the testbed, the pinning, the servers, a workdir."""

    def __init__(self, tb, pinning, workdir):
        self.tb, self.pinning, self.workdir = tb, pinning, workdir
        os.makedirs(workdir, exist_ok=True)
        self.servers = Servers(tb, workdir, pinning)
        self.foreign = ForeignLoad([h.ns for h in tb.hosts.values()])
        self.cost = CostMeter([tb.hosts[name].ns for name in tb.proxy_names],
                              pinning.middlebox_cpus)


def load_testbed():
    """``srv6pipes.lab.testbed.Testbed``, with a clear message when SRv6Pipes is not installed."""
    try:
        from srv6pipes.lab.testbed import Testbed
    except ImportError as exc:
        raise SystemExit(f"cannot import srv6pipes.lab.testbed ({exc}): make build")
    return Testbed


def prepare_endpoints(lab):
    """Namespace-local sysctls for short-connection load in c and s, then RPS masks."""
    for name in ("c", "s"):
        lab.tb.hosts[name].run(["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000",
                                "net.ipv4.tcp_tw_reuse=1", "net.core.somaxconn=8192",
                                "net.ipv4.tcp_max_syn_backlog=8192"])
    apply_rps(lab.tb, lab.pinning)


# ---------------------------------------------------------------- the run

def run(plan):
    Testbed = load_testbed()
    started = datetime.datetime.now()
    results = {
        "started": started.isoformat(timespec="seconds"),
        "host": {"kernel": platform.release(), "cpus": os.cpu_count(),
                 "versions": tool_versions()},
        "testbed": "srv6pipes.lab.testbed, proxies=1, line (c - p1 - s), fresh for every mode run",
        "settings": {"modes": plan.modes, "mtus": plan.mtus, "full_mtus": plan.full_mtus,
                     "repetitions": plan.repetitions, "seconds": plan.seconds,
                     "wrk": "-t 2 -c 50", "pinning": plan.pinning.as_dict(),
                     "workloads": plan.only,
                     "mode_info": {m: make_mode(m).info() for m in plan.modes}},
        "checks": {}, "unavailable": {}, "notes": [], "cells": [],
    }
    cells = {}
    t0 = time.monotonic()
    state = {"extra_seconds": 0.0}
    try:
        for mtu in plan.mtus:
            workloads = plan.workloads(mtu)
            print(f"== MTU {mtu}: {len(workloads)} workloads x {len(plan.modes)} modes x "
                  f"{plan.repetitions} run(s)", flush=True)
            for rep in range(plan.repetitions):
                # Rotate the order so no mode always runs first (or right after another).
                k = rep % len(plan.modes)
                for name in plan.modes[k:] + plan.modes[:k]:
                    if name in results["unavailable"] or not any(
                            make_mode(name).supports(wl) for wl in workloads):
                        continue
                    with Testbed(proxies=1, mtu=mtu, topology="line") as tb:
                        lab = Lab(tb, plan.pinning,
                                  os.path.join(plan.workdir, f"mtu{mtu}-run{rep + 1}-{name}"))
                        prepare_endpoints(lab)
                        lab.servers.start()
                        run_mode(plan, lab, name, mtu, rep, workloads, cells, results, state)
    finally:
        results["elapsed_seconds"] = round(time.monotonic() - t0)
        if cells:
            finish(results, cells, started.strftime("%Y%m%d-%H%M%S"))
        else:
            print("no measurement made, nothing written", file=sys.stderr)
    return 1 if results["unavailable"] else 0


def run_mode(plan, lab, name, mtu, rep, workloads, cells, results, state):
    """Set up one mode, check it, run every workload it supports once, tear it down."""
    mode = make_mode(name)
    print(f"-- run {rep + 1}, mode {name}", flush=True)
    try:
        mode.setup(lab)
        check = mode.check(lab)
        check["background_cpu_busy"] = round(wait_for_quiet(plan, state), 3)
        results["checks"].setdefault(f"{name}@{mtu}", []).append(check)
        for wl in workloads:
            if not mode.supports(wl):
                continue
            cell = cells.setdefault((mtu, wl.name, name), {
                "mtu": mtu, "workload": wl.name, "mode": name, "samples": []})
            for sample in samples_until_quiet(plan, state, lambda: measure(lab, wl, plan.seconds)):
                cell["samples"].append(sample)
                print(f"   {wl.name:22s} {describe(sample)}", flush=True)
    except (ModeUnavailable, CheckFailed) as exc:
        print(f"   MODE UNAVAILABLE: {exc}", flush=True)
        results["unavailable"][name] = str(exc)
    finally:
        mode.teardown(lab)
        if mode.final_stats is not None:
            results["checks"].setdefault(f"{name}@{mtu}:stats", []).append(mode.final_stats)


def samples_until_quiet(plan, state, take):
    """Yields take()'s sample; while it was disturbed by the rest of the machine, waits for
    quiet and yields another, at most plan.retries more within the run's re-run budget."""
    for attempt in range(1 + plan.retries):
        started = time.monotonic()
        sample = take()
        yield sample
        if attempt:
            state["extra_seconds"] += time.monotonic() - started
        if not report.disturbed(sample) or state["extra_seconds"] >= plan.extra_budget:
            return
        wait_for_quiet(plan, state)


def wait_for_quiet(plan, state):
    """wait_quiet() within what is left of the run's budget for waiting and re-runs."""
    patience = min(plan.patience, max(0.0, plan.extra_budget - state["extra_seconds"]))
    started = time.monotonic()
    busy = wait_quiet(patience=patience)
    state["extra_seconds"] += max(0.0, time.monotonic() - started - 0.5)  # 0.5: one sample
    return busy


def measure(lab, wl, seconds):
    """One load run; the sample also says what it cost the middlebox (lab/cost.py) and how
    much CPU the rest of the machine took."""
    try:
        (sample, cost), elsewhere = lab.foreign.measure(
            lambda: lab.cost.measure(lambda: wl.run(lab, seconds)))
    except (WorkloadError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)[-500:]}
    sample.update(cost)
    sample.update(elsewhere)
    return sample


def describe(sample):
    if "error" in sample:
        return sample["error"]
    text = report.fmt_value(sample) + "  [CPU busy " + " ".join(
        f"{v:.0%}" for v in sample["cpu_busy"].values()) + "]" + (
        f"  [proxy {sample['proxy_cpu_seconds']:.2f} CPU-s, {sample['box_scope']} "
        f"{sample['box_cpu_seconds']:.2f} CPU-s]")
    if report.disturbed(sample):
        text += (f"  [others: {sample['foreign_cpus']:.2f} CPU, "
                 f"{sample['foreign_net_mbps']:.0f} Mb/s meanwhile]")
    return text


def finish(results, cells, stamp):
    """Medians and ratios, notes, then the JSON and markdown files; print the table."""
    results["cells"] = report.summarize(list(cells.values()))
    add_notes(results)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    json_path = os.path.join(RESULTS_DIR, f"{stamp}.json")
    md_path = os.path.join(RESULTS_DIR, f"{stamp}.md")
    text = report.write(results, json_path, md_path)
    print()
    print(text)
    print(f"results: {json_path}\n         {md_path}  ({results['elapsed_seconds']} s)")


def add_notes(results):
    notes = results["notes"]
    pin = results["settings"]["pinning"]
    notes.append(pinning_note(pin))
    if "pipesd-xor" in results["settings"]["modes"]:
        notes.append("pipesd-xor (key 42) changes the bytes, so it runs only the blast rows "
                     "(bench/lab/blast.py: bulk TCP, payload never checked; iperf3 checks a "
                     "cookie on each connection and HTTP breaks); before measuring, an HTTP "
                     "request XORed in the client came back as '200' with the right body "
                     "once un-XORed")
    for name, reason in results["unavailable"].items():
        notes.append(f"{name} unavailable: {reason}")
    disturbed = [f"{c['mode']} {c['workload']} @{c['mtu']}" for c in results["cells"]
                 if c.get("disturbed")]
    if disturbed:
        notes.append(f"(disturbed): other processes used more than {report.DISTURBED_CPUS} CPU, "
                     f"or other namespaces received more than {report.DISTURBED_MBPS} Mb/s, "
                     "during every run of: " + ", ".join(disturbed))
    spread = report.spread_note(results["cells"])
    if spread:
        notes.append(spread)
    errors = [f"{c['mode']} {c['workload']} @{c['mtu']}" for c in results["cells"]
              if any(s.get("errors") or "error" in s for s in c["samples"])]
    if errors:
        notes.append("errors (wrk socket/status errors or failed runs) in: " + ", ".join(errors))


def tool_versions():
    def first_line(cmd):
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (res.stdout or res.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return None
    return {"haproxy": first_line(["haproxy", "-v"]), "wrk": first_line(["wrk", "-v"]),
            "iperf3": first_line(["iperf3", "-v"]), "lighttpd": first_line(["lighttpd", "-v"]),
            "python": sys.version.split()[0]}


def csv_list(text):
    return [x for x in text.split(",") if x]


def int_list(text):
    return [int(x) for x in csv_list(text)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="1 run per cell, 3 s load runs, no re-runs (~3 minutes)")
    ap.add_argument("--modes", type=csv_list, default=DEFAULT_MODES,
                    help=f"comma list from {','.join(MODE_NAMES)} (router always runs); "
                         f"default {','.join(DEFAULT_MODES)}")
    ap.add_argument("--mtu", type=int_list, default=[9000, 1500],
                    help="comma list of MTUs (default 9000,1500)")
    ap.add_argument("--full-mtu", type=int_list, default=None,
                    help="MTUs at which every workload runs (default: the largest of --mtu, "
                         "the paper's 9000); at the others only iperf3 runs")
    ap.add_argument("--pinning", choices=sorted(PINNINGS), default="split",
                    help="CPU placement, see bench/README.md (default split; unpinned: "
                         "client, proxy and server share both CPUs)")
    ap.add_argument("--workloads", type=csv_list, default=None,
                    help="comma list of workload names to run (default: all)")
    ap.add_argument("--repetitions", type=int, default=3, help="runs per cell (default 3)")
    ap.add_argument("--seconds", type=int, default=5, help="length of each load run (default 5)")
    ap.add_argument("--keep-workdir", action="store_true", help="keep logs and configs")
    args = ap.parse_args(argv)
    for m in args.modes:
        if m not in MODE_NAMES:
            ap.error(f"unknown mode {m!r}")
    if os.geteuid() != 0:
        ap.error("needs root (network namespaces)")
    modes = ["router"] + [m for m in dict.fromkeys(args.modes) if m != "router"]
    known = {wl.name for wl in iperf3_workloads() + blast_workloads() + wrk_workloads()}
    for name in args.workloads or []:
        if name not in known:
            ap.error(f"unknown workload {name!r}; known: {', '.join(sorted(known))}")
    return run_in_workdir(
        run, lambda workdir: Plan(modes=modes, mtus=args.mtu,
                                  full_mtus=args.full_mtu or [max(args.mtu)],
                                  pinning=PINNINGS[args.pinning], workdir=workdir,
                                  only=args.workloads, **timing(args)),
        "srv6pipes-bench-", args.keep_workdir)

if __name__ == "__main__":
    sys.exit(main())
