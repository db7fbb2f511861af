#!/usr/bin/env python3
"""Reproduce the paper's Fig. 9 (a function making 2n XOR passes) and Fig. 11 (two chained
XOR proxies) as ratios to routers measured in the same run.

Fig. 9, testbed c - p1 - s: p1 is a router, pipesd with the identity function (splice), or
pipesd with xor-passes for each n of ``--passes`` (2n in-place XOR passes per chunk, net
identity). Fig. 11, testbed c - p1 - p2 - s: p1 and p2 are two routers, two pipesd with
identity, or two pipesd XORing with the same key (the server gets the client's bytes).
Workload: one bulk TCP stream (blast, or iperf3 with ``--tool iperf3``), median of the
repetitions. Each repetition runs every case once, in a rotated order, each case in a fresh
testbed. Results: bench/results/functions-<timestamp>.json, .md and .png (Fig. 9).

    python bench/run_functions.py            # 3 runs per case, 5 s each: about 7 minutes
    python bench/run_functions.py --quick    # 1 run per case, 3 s: about 2 minutes
    python bench/run_functions.py --figures 9 --passes 1,2,4,8,16,32

See bench/README.md ("Functions: Fig. 9 and Fig. 11") for how to read the tables.
"""
import argparse
import datetime
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lab import figures, report  # noqa: E402
from lab.checks import CheckFailed  # noqa: E402
from lab.modes import ModeUnavailable, Pipesd, PipesdChain, Router  # noqa: E402
from lab.pinning import PINNINGS, Pinning, pinning_note  # noqa: E402
from lab.runplan import run_in_workdir, timing  # noqa: E402
from lab.workloads import Workload  # noqa: E402
from run_lab import (RESULTS_DIR, Lab, describe, load_testbed, measure,  # noqa: E402
                     prepare_endpoints, samples_until_quiet, tool_versions,
                     wait_for_quiet)

# The target of the issue: with 2 passes (n = 1), at least this fraction of identity.
TARGET_PASSES_N = 1
TARGET_RATIO = 0.9


@dataclass(frozen=True)
class Case:
    """One bar of a figure: a mode of the middleboxes in a testbed with ``proxies`` of them."""
    figure: str                     # "fig9" or "fig11"
    name: str                       # unique in the run, also the mode's name
    proxies: int
    make: Callable[[], object]      # -> a lab.modes.Mode
    passes_n: Optional[int] = None  # xor-passes n (2n passes per chunk), Fig. 9 only
    role: str = "function"          # "router", "identity" (the baselines) or "function"


@dataclass
class Plan:
    figures: list
    passes: list                    # the n of xor-passes (2n passes per chunk)
    passes_key: int                 # xor-passes key (params bits 8-15)
    xor_key: int                    # Fig. 11: both proxies XOR with this key
    tool: str                       # "blast" or "iperf3"
    mtu: int
    pinning: Pinning
    workers: int
    repetitions: int
    seconds: int
    retries: int
    patience: float
    extra_budget: float
    workdir: str

    def workload(self):
        kind = self.tool
        return Workload(f"{kind}-1stream", kind, {"streams": 1})

    def cases(self):
        out = []
        if "9" in self.figures:
            out += fig9_cases(self)
        if "11" in self.figures:
            out += fig11_cases(self)
        return out


def fig9_cases(plan):
    w = plan.workers
    cases = [Case("fig9", "router", 1, lambda: Router(), role="router"),
             Case("fig9", "pipesd-identity", 1, lambda: Pipesd("identity", workers=w),
                  role="identity")]
    for n in plan.passes:
        name = f"pipesd-xor-passes-n{n}"
        params = (plan.passes_key << 8) | n
        cases.append(Case("fig9", name, 1,
                          lambda name=name, params=params: Pipesd("xor-passes", params, w,
                                                                  name=name),
                          passes_n=n))
    return cases


def fig11_cases(plan):
    w, key = plan.workers, plan.xor_key

    def chain(function, params, name):
        return PipesdChain([Pipesd(function, params, w, host=h, name=name)
                            for h in ("p1", "p2")], name=name)

    return [Case("fig11", "2-routers", 2, lambda: Router(("p1", "p2"), name="2-routers"),
                 role="router"),
            Case("fig11", "2-pipesd-identity", 2,
                 lambda: chain("identity", 0, "2-pipesd-identity"), role="identity"),
            Case("fig11", f"2-pipesd-xor{key}", 2,
                 lambda: chain("xor", key, f"2-pipesd-xor{key}"))]


def rotated(items, rep, repetitions):
    """Start repetition ``rep`` a fraction rep/repetitions into the list, so that drift of
    the machine over the run is not always charged to the same cases."""
    if not items:
        return items
    k = (rep * len(items)) // max(1, repetitions)
    return items[k:] + items[:k]


# ---------------------------------------------------------------- the run

def run(plan):
    Testbed = load_testbed()
    started = datetime.datetime.now()
    cases = plan.cases()
    workload = plan.workload()
    results = {
        "started": started.isoformat(timespec="seconds"),
        "host": host_description(),
        "testbed": "srv6pipes.lab.testbed line: c - p1 - s (Fig. 9), c - p1 - p2 - s (Fig. 11); "
                   "fresh for every case run",
        "settings": {"figures": plan.figures, "passes": plan.passes,
                     "passes_key": plan.passes_key, "xor_key": plan.xor_key,
                     "workload": workload.name, "mtu": plan.mtu, "workers": plan.workers,
                     "repetitions": plan.repetitions, "seconds": plan.seconds,
                     "pinning": plan.pinning.as_dict(),
                     "cases": {c.name: {"figure": c.figure, "proxies": c.proxies,
                                        "passes_n": c.passes_n, "role": c.role,
                                        **c.make().info()} for c in cases}},
        "checks": {}, "unavailable": {}, "notes": [], "cells": [], "timings": [],
    }
    cells = {c.name: {"figure": c.figure, "mode": c.name, "role": c.role,
                      "passes_n": c.passes_n, "workload": workload.name, "samples": []}
             for c in cases}
    state = {"extra_seconds": 0.0}
    t0 = time.monotonic()
    print(f"== {len(cases)} cases x {plan.repetitions} run(s), {workload.name}, "
          f"{plan.seconds} s each, MTU {plan.mtu}, pinning {plan.pinning.name}", flush=True)
    try:
        for rep in range(plan.repetitions):
            for figure in plan.figures:
                group = [c for c in cases if c.figure == f"fig{figure}"]
                for case in rotated(group, rep, plan.repetitions):
                    if case.name in results["unavailable"]:
                        continue
                    case_started = time.monotonic()
                    with Testbed(proxies=case.proxies, mtu=plan.mtu, topology="line") as tb:
                        lab = Lab(tb, plan.pinning,
                                  os.path.join(plan.workdir, f"run{rep + 1}-{case.name}"))
                        prepare_endpoints(lab)
                        lab.servers.start()
                        run_case(plan, lab, case, rep, workload, cells[case.name], results,
                                 state)
                    results["timings"].append({"repetition": rep + 1, "case": case.name,
                                               "seconds": round(time.monotonic()
                                                                - case_started, 1)})
    finally:
        results["elapsed_seconds"] = round(time.monotonic() - t0)
        if any(cell["samples"] for cell in cells.values()):
            finish(plan, results, cells, started.strftime("%Y%m%d-%H%M%S"))
        else:
            print("no measurement made, nothing written", file=sys.stderr)
    return 1 if results["unavailable"] else 0


def run_case(plan, lab, case, rep, workload, cell, results, state):
    """Set up one case's mode, check it, measure the workload (re-run once if disturbed),
    tear the mode down."""
    mode = case.make()
    print(f"-- run {rep + 1}, {case.figure}, {case.name}", flush=True)
    try:
        mode.setup(lab)
        check = mode.check(lab)
        check["background_cpu_busy"] = round(wait_for_quiet(plan, state), 3)
        results["checks"].setdefault(case.name, []).append(check)
        for sample in samples_until_quiet(plan, state,
                                          lambda: measure(lab, workload, plan.seconds)):
            sample["repetition"] = rep + 1
            cell["samples"].append(sample)
            print(f"   {workload.name:16s} {describe(sample)}", flush=True)
    except (ModeUnavailable, CheckFailed) as exc:
        print(f"   MODE UNAVAILABLE: {exc}", flush=True)
        results["unavailable"][case.name] = str(exc)
    finally:
        mode.teardown(lab)
        if mode.final_stats is not None:
            results["checks"].setdefault(f"{case.name}:stats", []).append(mode.final_stats)


def finish(plan, results, cells, stamp):
    """Medians and ratios, the target, notes; write JSON, markdown and the plot; print."""
    results["cells"] = figures.summarize(list(cells.values()))
    results["target"] = figures.target(results["cells"], TARGET_PASSES_N, TARGET_RATIO)
    add_notes(plan, results)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    base = os.path.join(RESULTS_DIR, f"functions-{stamp}")
    plot = figures.plot_fig9(results, base + ".png")
    if plot is None:
        results["notes"].append("no plot: matplotlib is not installed "
                                "(pip install -r requirements.txt)")
    text = figures.write(results, base + ".json", base + ".md")
    print()
    print(text)
    print(f"results: {base}.json\n         {base}.md"
          + (f"\n         {plot}" if plot else "")
          + f"  ({results['elapsed_seconds']} s)")


def add_notes(plan, results):
    notes = results["notes"]
    pin = results["settings"]["pinning"]
    notes.append(pinning_note(pin, "middleboxes (p1, and p2 in Fig. 11)",
                              " (p2 gets p1's)"))
    notes.append("before measuring, each case proved its path: the 100 KB file arrived "
                 "intact through it, each middlebox held (proxies) or did not hold (routers) "
                 "the check's bulk connection, and each pipesd's counters show the claimed "
                 "function carried >= 90% of that transfer's bytes (so xor-passes ran its "
                 "passes, and both hops of the xor chain XORed: one alone would corrupt the "
                 "file)")
    for name, reason in results["unavailable"].items():
        notes.append(f"{name} unavailable: {reason}")
    disturbed = [c["mode"] for c in results["cells"] if c.get("disturbed")]
    if disturbed:
        notes.append(f"(disturbed): other processes used more than {report.DISTURBED_CPUS} "
                     f"CPU, or other namespaces received more than {report.DISTURBED_MBPS} "
                     "Mb/s, during every run of: " + ", ".join(disturbed))
    noisy = [f"{c['mode']} ({c['spread']:.0%})" for c in results["cells"]
             if c.get("spread") and c["spread"] > 0.15]
    if noisy:
        notes.append("runs differ by more than 15% (max/min - 1) in: " + ", ".join(noisy))
    errors = [c["mode"] for c in results["cells"] if any("error" in s for s in c["samples"])]
    if errors:
        notes.append("failed load runs in: " + ", ".join(errors))


def host_description():
    model, mem = None, None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")),
                         None)
        with open("/proc/meminfo") as f:
            kb = int(next(l for l in f if l.startswith("MemTotal")).split()[1])
            mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": model,
            "memory": mem, "versions": tool_versions()}


def int_list(text):
    return [int(x, 0) for x in text.split(",") if x]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="1 run per case, 3 s load runs, no re-runs (about 2 minutes)")
    ap.add_argument("--figures", default="9,11",
                    help="comma list from 9,11 (default both)")
    ap.add_argument("--passes", type=int_list, default=list(range(1, 9)),
                    help="the n of xor-passes, 2n passes per chunk, 1..255 (default 1..8)")
    ap.add_argument("--passes-key", type=lambda v: int(v, 0), default=42,
                    help="xor-passes key (default 42)")
    ap.add_argument("--xor-key", type=lambda v: int(v, 0), default=42,
                    help="Fig. 11: the key both proxies XOR with (default 42)")
    ap.add_argument("--tool", choices=("blast", "iperf3"), default="blast",
                    help="bulk tool (default blast; every case is net identity, so iperf3 "
                         "can cross them too)")
    ap.add_argument("--mtu", type=int, default=9000, help="link MTU (default 9000, the paper's)")
    ap.add_argument("--pinning", choices=sorted(PINNINGS), default="split",
                    help="CPU placement, see bench/README.md (default split)")
    ap.add_argument("--workers", type=int, default=2, help="pipesd --workers (default 2)")
    ap.add_argument("--repetitions", type=int, default=3, help="runs per case (default 3)")
    ap.add_argument("--seconds", type=int, default=5, help="length of each load run (default 5)")
    ap.add_argument("--keep-workdir", action="store_true", help="keep logs and configs")
    args = ap.parse_args(argv)
    figs = [f for f in dict.fromkeys(args.figures.replace("fig", "").split(",")) if f]
    if not figs or any(f not in ("9", "11") for f in figs):
        ap.error("--figures: comma list from 9,11")
    if not args.passes or any(not 1 <= n <= 255 for n in args.passes):
        ap.error("--passes: n from 1 to 255 (params & 0xff; 0 would mean 1)")
    for name in ("passes_key", "xor_key"):
        if not 0 <= getattr(args, name) <= 255:
            ap.error(f"--{name.replace('_', '-')}: 0..255")
    if args.xor_key == 0:
        ap.error("--xor-key 0 would not change the bytes")
    if args.repetitions < 1 or args.seconds < 1:
        ap.error("--repetitions and --seconds: at least 1")
    if os.geteuid() != 0:
        ap.error("needs root (network namespaces)")
    return run_in_workdir(
        run, lambda workdir: Plan(figures=figs, passes=list(dict.fromkeys(args.passes)),
                                  passes_key=args.passes_key, xor_key=args.xor_key,
                                  tool=args.tool, mtu=args.mtu, pinning=PINNINGS[args.pinning],
                                  workers=args.workers, workdir=workdir, **timing(args)),
        "srv6pipes-functions-", args.keep_workdir)

if __name__ == "__main__":
    sys.exit(main())
