#!/usr/bin/env python3
"""Reproduce the paper's evaluation (section V, Fig. 6, 7, 8, 9, 11) end to end: plots in
docs/, the raw data of each figure in bench/paper-data/.

    python bench/run_paper.py                  # every figure, then the emulator's
                                               # calibration and the function kernels
    python bench/run_paper.py --figure 7       # one figure (the full run is ~40 minutes:
                                               # run it figure by figure under the lock)
    python bench/run_paper.py --quick          # a smoke run of every figure, < 5 minutes,
                                               # written to bench/results/paper-quick/

Every figure is measured as ratios to routers in the same run: each repetition runs every
case of the figure (order rotated per repetition), each case in a fresh testbed. Long and
lossy links (Fig. 7, 8) come from lab/linkemu.py (netem, or the delayline on kernels
without it). See bench/README.md ("The paper's figures") for the method.
"""
import argparse
import contextlib
import csv
import datetime
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lab import paperfigs, paperplots, tcpstats  # noqa: E402
from lab.checks import CheckFailed, wait_quiet  # noqa: E402
from lab.interference import ForeignLoad  # noqa: E402
from lab.linkemu import (BACKENDS, LinkCondition, LinkEmulationError, LinkEmulator,  # noqa: E402
                         accuracy)
from lab.modes import ModeUnavailable  # noqa: E402
from lab.pinning import PINNINGS, Pinning, pinning_note  # noqa: E402
from lab.probe import send_probes, summarize as summarize_probes, within_spec  # noqa: E402
from lab.runplan import run_in_workdir  # noqa: E402
from lab.servers import HTTP_PORT  # noqa: E402
from run_functions import host_description, rotated  # noqa: E402
from run_lab import (Lab, describe, load_testbed, measure, prepare_endpoints,  # noqa: E402
                     samples_until_quiet, wait_for_quiet)

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
DATA_DIR = os.path.join(BENCH, "paper-data")
DOCS_DIR = os.path.join(REPO, "docs")
QUICK_DIR = os.path.join(BENCH, "results", "paper-quick")
EXTRAS = ("emulator", "kernels")
PNG_NAMES = {"fig6": "fig6-file-sizes.png", "fig7": "fig7-lossy-links.png",
             "fig8": "fig8-lossy-server-link.png", "fig9": "fig9-xor-passes.png",
             "fig11": "fig11-xor-chain.png"}
LOSSY = ("fig7", "fig8")
SETUP_SECONDS = 9       # for the progress estimate: testbed, servers, mode, check


@dataclass
class Plan:
    """What to run and how long; figures holds "6".."11", "emulator", "kernels"."""
    figures: list
    figplan: paperfigs.FigurePlan
    mtu: int
    pinning: Pinning
    backend: str
    congestion_control: str
    repetitions: int
    lossy_repetitions: int
    seconds: int
    lossy_seconds: int
    retries: int
    patience: float
    extra_budget: float
    data_dir: str
    docs_dir: str
    workdir: str
    quick: bool
    tag: str = ""            # appended to the figures' file names (a variant run)
    replot: bool = False     # only draw the PNGs again from the JSON


# ---------------------------------------------------------------- one figure

def run_figure(plan, figure):
    """Measure every case of ``figure`` ("6" ... "11"), then write its JSON, CSV and PNG.
    Returns 0, or 1 when a case was unavailable."""
    Testbed = load_testbed()
    fig = f"fig{figure}"
    cases = paperfigs.cases_for(figure, plan.figplan)
    lossy = fig in LOSSY
    reps = plan.lossy_repetitions if lossy else plan.repetitions
    seconds = plan.lossy_seconds if lossy else plan.seconds
    started = datetime.datetime.now()
    results = {
        "figure": fig, "title": paperfigs.TITLES[fig],
        "started": started.isoformat(timespec="seconds"), "host": host_description(),
        "command": " ".join(["python", "bench/run_paper.py", *sys.argv[1:]]),
        "testbed": "srv6pipes.lab.testbed line, fresh for every case run",
        "settings": {"tag": plan.tag, "repetitions": reps, "seconds": seconds, "mtu": plan.mtu,
                     "pinning": plan.pinning.as_dict(),
                     "wrk": f"-t 2 -c {plan.figplan.lossy_connections if lossy else plan.figplan.connections}",
                     "workers": plan.figplan.workers, "sizes": list(plan.figplan.sizes),
                     "links": paperfigs.link_settings(cases),
                     "cases": {f"{c.panel}: {c.name}": {"role": c.role, "proxies": c.proxies,
                                                        "workloads": [w.name for w in c.workloads],
                                                        **c.make().info()} for c in cases}},
        "checks": {}, "unavailable": {}, "emulator": [], "notes": [], "cells": [],
    }
    if fig == "fig9":
        results["settings"].update(passes=list(plan.figplan.passes),
                                   passes_key=plan.figplan.passes_key)
    if fig == "fig11":
        results["settings"]["xor_key"] = plan.figplan.xor_key
    cells = {}
    for case in cases:
        for wl in case.workloads:
            cells[(case.panel, case.name, wl.name)] = {
                "figure": fig, "panel": case.panel, "mode": case.name, "role": case.role,
                "passes_n": case.passes_n, "workload": wl.name, "samples": []}
    state = {"extra_seconds": 0.0}
    t0 = time.monotonic()
    total = reps * len(cases)
    estimate = sum(SETUP_SECONDS + len(c.workloads) * (seconds + 1) for c in cases) * reps
    print(f"== {results['title']}: {len(cases)} cases x {reps} run(s), {seconds} s per load "
          f"run, about {estimate / 60:.0f} min", flush=True)
    done = 0
    try:
        for rep in range(reps):
            for case in rotated(cases, rep, reps):
                done += 1
                if case.name in results["unavailable"]:
                    continue
                elapsed = time.monotonic() - t0
                left = (elapsed / (done - 1) * (total - done + 1)) if done > 1 else estimate
                print(f"-- [{fig} {done}/{total}] run {rep + 1}/{reps}: {case.name} on "
                      f"{case.panel}  ({elapsed / 60:.1f} min, ~{left / 60:.0f} min left)",
                      flush=True)
                with Testbed(proxies=case.proxies, mtu=plan.mtu, topology="line") as tb:
                    lab = Lab(tb, plan.pinning, os.path.join(plan.workdir,
                                                             f"{fig}-run{rep + 1}-{case.name}"))
                    prepare_endpoints(lab)
                    results["settings"]["tcp"] = tcp_settings(tb, plan.congestion_control)
                    lab.servers.start()
                    run_case(plan, lab, case, rep, seconds, cells, results, state, lossy)
    finally:
        results["elapsed_seconds"] = round(time.monotonic() - t0)
        if any(c["samples"] for c in cells.values()):
            finish(plan, results, list(cells.values()))
        else:
            print("no measurement made, nothing written", file=sys.stderr)
    return 1 if results["unavailable"] else 0


def tcp_settings(tb, congestion_control):
    """The same TCP in every host: ``congestion_control`` (new namespaces inherit the
    machine's default, bbr on this VM; the paper's 4.14 kernels ran cubic, Linux's
    default), and no metrics cache (otherwise the kernel keeps a destination's ssthresh
    and RTT from earlier connections, the check's or the previous file size's, and later
    ones start from them). Returns the TCP sysctls now in force (from c)."""
    for host in tb.hosts.values():
        host.run(["sysctl", "-qw", "net.ipv4.tcp_no_metrics_save=1",
                  f"net.ipv4.tcp_congestion_control={congestion_control}"])
    names = ("tcp_congestion_control", "tcp_rmem", "tcp_wmem", "tcp_slow_start_after_idle",
             "tcp_no_metrics_save", "tcp_sack", "tcp_recovery", "tcp_early_retrans")
    res = tb.hosts["c"].run(["sysctl", *[f"net.ipv4.{n}" for n in names]], check=False)
    return dict(line.split(" = ", 1) for line in res.stdout.splitlines() if " = " in line)


def emulator_cpus(tb, pinning):
    """Where each host's delay lines run: with its host's packet processing (c: the
    client's CPUs, s: the servers', proxies: the middlebox's)."""
    out = {}
    for name in tb.hosts:
        if name == "c":
            out[name] = pinning.client_cpus
        elif name == "s":
            out[name] = pinning.server_cpus
        else:
            out[name] = pinning.middlebox_cpus
    return out


def run_case(plan, lab, case, rep, seconds, cells, results, state, lossy):
    """Set up the case's mode and check it on clean links, then emulate the links (if
    any) and measure each workload; tear everything down whatever happens."""
    mode = case.make()
    emu = None
    try:
        mode.setup(lab)
        check = mode.check(lab)
        results["checks"].setdefault(f"{case.panel}: {case.name}", []).append(check)
        if case.links:
            emu = LinkEmulator(lab.tb, backend=plan.backend, workdir=lab.workdir,
                               cpus=emulator_cpus(lab.tb, plan.pinning), seed=rep + 1)
            for a, b, cond in case.links:
                emu.add(a, b, cond)
            emu.start()
        wait_for_quiet(plan, state)
        for wl in case.workloads:
            cell = cells[(case.panel, case.name, wl.name)]
            for sample in samples_until_quiet(
                    plan, state, lambda: measure_detailed(lab, mode, wl, seconds, lossy)):
                sample["repetition"] = rep + 1
                cell["samples"].append(sample)
                print(f"   {wl.name:22s} {describe(sample)}", flush=True)
    except (ModeUnavailable, CheckFailed, LinkEmulationError) as exc:
        print(f"   UNAVAILABLE: {exc}", flush=True)
        results["unavailable"][case.name] = str(exc)
    finally:
        if emu is not None:
            emu.stop()
            results["emulator"].append({"case": f"{case.panel}: {case.name}",
                                        "repetition": rep + 1, "backend": emu.backend,
                                        "accuracy": accuracy(emu.stats), "lines": emu.stats})
            overloaded = [a["direction"] for a in accuracy(emu.stats) if a.get("overloaded")]
            if overloaded:
                print(f"   WARNING: link emulator overloaded on {overloaded}", flush=True)
        mode.teardown(lab)
        if mode.final_stats is not None:
            results["checks"].setdefault(f"{case.panel}: {case.name}:stats", []).append(
                mode.final_stats)


def measure_detailed(lab, mode, wl, seconds, lossy):
    """measure(), and for the lossy figures what TCP did meanwhile in every host
    (``tcp``: counter deltas) and, halfway through, each host's connections per leg
    (``ss``); ``middlebox_retransmit_pct``: the proxies' retransmitted share."""
    if not lossy:
        return measure(lab, wl, seconds)
    hosts = list(lab.tb.hosts.values())
    before = {h.name: tcpstats.read_counters(h) for h in hosts}
    snapshots = {}
    timer = threading.Timer(seconds / 2, lambda: snapshots.update(
        {h.name: tcpstats.snapshot(h, HTTP_PORT) for h in hosts}))
    timer.start()
    try:
        sample = measure(lab, wl, seconds)
    finally:
        timer.cancel()
        timer.join()
    deltas = {h.name: tcpstats.delta(before[h.name], tcpstats.read_counters(h)) for h in hosts}
    sample["tcp"] = deltas
    sample["ss"] = snapshots
    proxies = [deltas[h] for h in mode.hosts] if mode.proxied else []
    if proxies:
        sent = sum(d["Tcp.OutSegs"] for d in proxies)
        sample["middlebox_retransmit_pct"] = (
            100.0 * sum(d["Tcp.RetransSegs"] for d in proxies) / sent if sent else None)
    return sample


def finish(plan, results, cells):
    """Summarize, then write <fig>.json and <fig>.csv into the data folder and the PNG
    into the docs folder; print where."""
    fig = results["figure"]
    results["cells"] = paperfigs.summarize(cells)
    results["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    results["notes"].append(pinning_note(results["settings"]["pinning"],
                                         "middleboxes (p1, and p2 in a chain)",
                                         " (p2 gets p1's)"))
    if fig == "fig9":     # the project's target: 2 passes (n=1) at >= 0.9x identity
        results["target"] = paperfigs.target(results["cells"], "fig9", "function",
                                             ["blast-1stream"], 0.9, baseline="identity")
        results["target"]["ratios"] = {f"n={c['passes_n']}": c.get("ratio_to_identity")
                                       for c in results["cells"] if c.get("passes_n")}
        results["target"]["met"] = (results["target"]["ratios"].get("n=1") or 0) >= 0.9
    if fig == "fig7":     # the target: identity >= 1.5x the router for 1 and 10 MB
        results["target"] = paperfigs.target(results["cells"], "fig7", "identity",
                                             ["wrk-1MB-keepalive", "wrk-10MB-keepalive"], 1.5)
    for name, reason in results["unavailable"].items():
        results["notes"].append(f"{name} unavailable: {reason}")
    os.makedirs(plan.data_dir, exist_ok=True)
    os.makedirs(plan.docs_dir, exist_ok=True)
    suffix = f"-{plan.tag}" if plan.tag else ""
    base = os.path.join(plan.data_dir, fig + suffix)
    png_name = PNG_NAMES[fig].replace(".png", suffix + ".png")
    png = paperplots.PLOTS[fig](results, os.path.join(plan.docs_dir, png_name))
    if png is None:
        results["notes"].append("no plot: matplotlib is missing (pip install -r "
                                "requirements.txt)")
    with open(base + ".json", "w") as f:
        json.dump(results, f, indent=1, default=str, sort_keys=False)
        f.write("\n")
    write_csv(base + ".csv", paperfigs.csv_rows(results["cells"]))
    print_table(results)
    print(f"{fig}: {base}.json, {base}.csv" + (f", {png}" if png else "")
          + f"  ({results['elapsed_seconds']} s)", flush=True)


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=paperfigs.CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def print_table(results):
    print(f"\n{results['title']}")
    for c in results["cells"]:
        med = c["median"]
        value = f"{med['bits_per_second'] / 1e6:10.1f} Mb/s" if med else "    failed"
        ratio = c.get("ratio_to_router")
        print(f"  {c['panel']:16s} {c['workload']:22s} {c['mode']:24s} {value}"
              + (f"  x router {ratio:.2f}" if ratio is not None else ""))
    print()


# ---------------------------------------------------------------- the emulator's calibration

def run_emulator_calibration(plan):
    """Probe the link emulator through c - p1 - s (p1 a router): delay and loss as set on
    c -> p1, UDP probes c -> s at increasing rates. Writes emulator.json and .csv: per rate
    the delay error, the loss seen against the setting, reordering, and what the delay line
    says about itself (lateness, drops beyond the setting). The ceiling is the highest rate
    with no loss beyond the setting and a median delay within 1 ms."""
    Testbed = load_testbed()
    quick = plan.quick
    rates = (5000, 20000, 40000) if quick else (5000, 10000, 20000, 40000, 60000, 80000)
    seconds = 1 if quick else 2
    conditions = (LinkCondition(25, 0), LinkCondition(25, 1), LinkCondition(0, 2))
    started = datetime.datetime.now()
    rows = []
    print(f"== link emulator: {len(conditions)} settings x {len(rates)} rates, "
          f"{seconds} s each", flush=True)
    with Testbed(proxies=1, mtu=plan.mtu, topology="line") as tb:
        c, s = tb.hosts["c"], tb.hosts["s"]
        # The probes' receiver is a Python process: what others run meanwhile shows in the
        # tail of the delays, so every row records it (foreign_cpus, see interference.py).
        foreign = ForeignLoad([h.ns for h in tb.hosts.values()])
        if not c.ping(s.addr, timeout=2):
            raise SystemExit("calibration testbed: no ping c -> s")
        for cond in conditions:
            for rate in rates:
                wait_quiet(patience=plan.patience)
                with LinkEmulator(tb, backend=plan.backend, seed=rate,
                                  cpus={"p1": plan.pinning.middlebox_cpus}) as emu:
                    emu.add("c", "p1", cond, both_ways=False)
                    emu.start()
                    (sent, arrivals, took), others = foreign.measure(
                        lambda: send_probes(c, s, rate * seconds, rate, size=1400))
                summary = summarize_probes(sent, arrivals, cond.loss_pct or None, cond.delay_ms)
                summary.update(others)
                acc = accuracy(emu.stats)[0]
                row = {"delay_ms_set": cond.delay_ms, "loss_pct_set": cond.loss_pct,
                       "rate_pps": rate, "sent_pps": round(sent / took),
                       "backend": emu.backend, **summary,
                       "line": {k: emu.stats[0].get(k) for k in (
                           "received", "dropped", "late_mean_us", "late_max_us",
                           "late_p99_us_at_most", "late_over_1ms", "peak_pps")},
                       "overloaded": acc.get("overloaded")}
                row["within_spec"] = within_spec(row)
                rows.append(row)
                print(f"   {cond.describe():16s} {rate:6d} pps: delay {fmt(row['delay_ms'])} "
                      f"ms (p99 {fmt(row['delay_p99_ms'])}), loss {fmt(row['loss_pct'])}%, "
                      f"reordered {row['reordered']}, line late max "
                      f"{row['line']['late_max_us']} us, others {row['foreign_cpus']:.2f} CPU -> "
                      f"{'ok' if row['within_spec'] else 'OUT OF SPEC'}", flush=True)
    ceiling = {}
    for cond in conditions:
        ok = [r["rate_pps"] for r in rows if r["delay_ms_set"] == cond.delay_ms
              and r["loss_pct_set"] == cond.loss_pct]
        good = []
        for rate in sorted(ok):
            row = next(r for r in rows if r["rate_pps"] == rate and r["delay_ms_set"]
                       == cond.delay_ms and r["loss_pct_set"] == cond.loss_pct)
            if not row["within_spec"]:
                break
            good.append(rate)
        ceiling[cond.describe()] = max(good) if good else None
    pooled = pool_loss(rows, ceiling)
    results = {"what": "link emulator calibration (bench/lab/linkemu.py, bench/lab/probe.py)",
               "started": started.isoformat(timespec="seconds"), "host": host_description(),
               "settings": {"testbed": "c - p1 - s, p1 a router, emulation on c -> p1 only",
                            "probe": "UDP, 1400 bytes, paced, receiver a separate process",
                            "rates_pps": list(rates), "seconds_per_rate": seconds,
                            "mtu": plan.mtu, "pinning": plan.pinning.as_dict(),
                            "spec": "no loss beyond the setting (within 10% of it), median "
                                    "delay within 1 ms of the setting, no reordering"},
               "ceiling_pps": ceiling, "pooled_loss": pooled, "rows": rows}
    os.makedirs(plan.data_dir, exist_ok=True)
    base = os.path.join(plan.data_dir, "emulator")
    with open(base + ".json", "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    columns = ("delay_ms_set", "loss_pct_set", "rate_pps", "sent_pps", "received", "loss_pct",
               "reordered", "delay_ms", "delay_p99_ms", "delay_max_ms", "foreign_cpus",
               "within_spec")
    write_rows(base + ".csv", columns, rows)
    print(f"emulator ceiling (pps, 1400-byte packets): {ceiling}; pooled loss: {pooled}\n"
          f"emulator: {base}.json, {base}.csv", flush=True)
    return 0


def pool_loss(rows, ceiling):
    """Loss per setting over all of its calibration runs: as the delay line counted it
    (``line_loss_pct``: its own drops over what it received, at every rate), and as the
    probes saw it end to end at rates up to the ceiling (``probe_loss_pct``; above it the
    probes' receiver falls behind and loses packets of its own)."""
    out = {}
    for row in rows:
        key = LinkCondition(row["delay_ms_set"], row["loss_pct_set"]).describe()
        acc = out.setdefault(key, {"line_received": 0, "line_dropped": 0, "probes": 0,
                                   "probes_received": 0})
        acc["line_received"] += row["line"]["received"] or 0
        acc["line_dropped"] += row["line"]["dropped"] or 0
        if ceiling.get(key) and row["rate_pps"] <= ceiling[key]:
            acc["probes"] += row["sent"]
            acc["probes_received"] += row["received"]
    for acc in out.values():
        acc["line_loss_pct"] = round(100.0 * acc["line_dropped"] / max(1, acc["line_received"]), 3)
        acc["probe_loss_pct"] = (round(100.0 * (acc["probes"] - acc["probes_received"])
                                       / acc["probes"], 3) if acc["probes"] else None)
    return out


def fmt(value):
    return "-" if value is None else f"{value:.2f}"


def write_rows(path, columns, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------- the function kernels

def run_kernels(plan):
    """pytest-benchmark of the function kernels (bench/bench_vf_kernels.py), its JSON kept
    as vf-kernels.json in the data folder."""
    out = os.path.join(plan.data_dir, "vf-kernels.json")
    os.makedirs(plan.data_dir, exist_ok=True)
    print("== function kernels (pytest-benchmark)", flush=True)
    cmd = [sys.executable, "-m", "pytest", os.path.join(BENCH, "bench_vf_kernels.py"),
           "--benchmark-only", f"--benchmark-json={out}", "-q", "-p", "no:cacheprovider"]
    if plan.quick:
        cmd += ["--benchmark-max-time=0.2", "--benchmark-min-rounds=3"]
    res = subprocess.run(cmd, cwd=REPO, timeout=900)
    if os.path.exists(out):
        drop_timings(out)
    print(f"kernels: {out}", flush=True)
    return res.returncode


def drop_timings(path):
    """Remove pytest-benchmark's per-round timings (``stats.data``) from its JSON: they
    make the file ~15 MB; the summary statistics (min, max, mean, median, quartiles,
    rounds) stay."""
    with open(path) as f:
        report = json.load(f)
    for bench in report.get("benchmarks", []):
        bench.get("stats", {}).pop("data", None)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")


# ---------------------------------------------------------------- command line

ALLOWED_CC = "/proc/sys/net/ipv4/tcp_allowed_congestion_control"


@contextlib.contextmanager
def congestion_control_allowed(name):
    """Let the lab's namespaces choose ``name``: outside the initial namespace only the
    algorithms of net.ipv4.tcp_allowed_congestion_control (a machine-wide list) may be
    set, and this VM allows reno and bbr only. Adds ``name`` for the run and puts the
    list back afterwards."""
    with open(ALLOWED_CC) as f:
        before = f.read().split()
    if name in before:
        yield
        return
    print(f"note: adding {name} to {ALLOWED_CC} for this run (was: {' '.join(before)})",
          flush=True)
    with open(ALLOWED_CC, "w") as f:
        f.write(" ".join(before + [name]))
    try:
        yield
    finally:
        with open(ALLOWED_CC, "w") as f:
            f.write(" ".join(before))


def replot(plan):
    """Draw the PNGs again from the JSON files in the data folder (no measurement)."""
    for what in plan.figures:
        if what in EXTRAS:
            continue
        fig = f"fig{what}"
        suffix = f"-{plan.tag}" if plan.tag else ""
        path = os.path.join(plan.data_dir, fig + suffix + ".json")
        if not os.path.exists(path):
            print(f"{fig}: no {path}, skipped")
            continue
        with open(path) as f:
            results = json.load(f)
        png = os.path.join(plan.docs_dir, PNG_NAMES[fig].replace(".png", suffix + ".png"))
        print(f"{fig}: {paperplots.PLOTS[fig](results, png) or 'no plot (matplotlib?)'}")
    return 0


def run(plan):
    if plan.replot:
        return replot(plan)
    status = 0
    t0 = time.monotonic()
    with congestion_control_allowed(plan.congestion_control):
        for what in plan.figures:
            if what == "emulator":
                status |= run_emulator_calibration(plan)
            elif what == "kernels":
                status |= run_kernels(plan)
            else:
                status |= run_figure(plan, what)
    print(f"all done in {(time.monotonic() - t0) / 60:.1f} min: data in {plan.data_dir}, "
          f"plots in {plan.docs_dir}", flush=True)
    return status


def parse_figures(text):
    items = [x.strip().lower().replace("fig", "") for x in text.split(",") if x.strip()]
    if "all" in items:
        return list(paperfigs.FIGURES) + list(EXTRAS)
    bad = [x for x in items if x not in paperfigs.FIGURES and x not in EXTRAS]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"comma list from {','.join(paperfigs.FIGURES + EXTRAS)} or all")
    return list(dict.fromkeys(items))


def parse_sizes(text):
    sizes = [x.strip() for x in text.split(",") if x.strip()]
    if not sizes or any(x not in paperfigs.SIZES for x in sizes):
        raise argparse.ArgumentTypeError(f"comma list from {','.join(paperfigs.SIZES)}")
    return sorted(dict.fromkeys(sizes), key=paperfigs.SIZE_BYTES.get)


def make_plan(args, workdir):
    quick = args.quick
    figplan = paperfigs.FigurePlan(connections=args.connections, workers=args.workers,
                                   lossy_connections=args.lossy_connections)
    if quick:
        figplan.sizes = ("10KB", "1MB")
        figplan.passes = (1, 4)
    if args.sizes:
        figplan.sizes = tuple(args.sizes)
    out_data = args.data_dir or (QUICK_DIR if quick else DATA_DIR)
    out_docs = args.docs_dir or (QUICK_DIR if quick else DOCS_DIR)
    return Plan(figures=args.figure, figplan=figplan, mtu=args.mtu,
                pinning=PINNINGS[args.pinning], backend=args.backend,
                congestion_control=args.congestion_control,
                repetitions=1 if quick else args.repetitions,
                lossy_repetitions=1 if quick else args.lossy_repetitions,
                seconds=2 if quick else args.seconds,
                lossy_seconds=4 if quick else args.lossy_seconds,
                retries=0 if quick else 1, patience=10.0,
                extra_budget=10.0 if quick else 60.0,
                data_dir=out_data, docs_dir=out_docs, workdir=workdir, quick=quick,
                tag=args.tag, replot=args.replot)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--figure", "--figures", dest="figure", type=parse_figures,
                    default=parse_figures("all"),
                    help="comma list from 6,7,8,9,11,emulator,kernels (default all)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2 sizes, 1 run per point, short load runs; writes to "
                         "bench/results/paper-quick/ unless --data-dir/--docs-dir say")
    ap.add_argument("--pinning", choices=sorted(PINNINGS), default="split",
                    help="CPU placement (bench/README.md, 'CPU pinning'; default split)")
    ap.add_argument("--backend", choices=BACKENDS, default="auto",
                    help="link emulation: netem, delayline, or auto (netem if the kernel "
                         "has it)")
    ap.add_argument("--congestion-control", default="cubic",
                    help="TCP congestion control in every host (default cubic: Linux's "
                         "default and the paper's; this VM's own default is bbr)")
    ap.add_argument("--repetitions", type=int, default=3,
                    help="runs per point for Fig. 6, 9, 11 (default 3)")
    ap.add_argument("--lossy-repetitions", type=int, default=3,
                    help="runs per point for Fig. 7 and 8 (default 3)")
    ap.add_argument("--seconds", type=int, default=5,
                    help="load run length for Fig. 6, 9, 11 (default 5)")
    ap.add_argument("--lossy-seconds", type=int, default=12,
                    help="load run length for Fig. 7 and 8 (default 12: the RTT is 100 ms "
                         "or more, and slow start must not dominate)")
    ap.add_argument("--sizes", type=parse_sizes, default=None,
                    help=f"file sizes for Fig. 6, 7, 8, 11 (default {','.join(paperfigs.SIZES)})")
    ap.add_argument("--connections", type=int, default=50, help="wrk -c (default 50)")
    ap.add_argument("--lossy-connections", type=int, default=10,
                    help="wrk -c for Fig. 7 and 8 (default 10: keeps the link emulator "
                         "below its ceiling)")
    ap.add_argument("--workers", type=int, default=2, help="pipesd --workers (default 2)")
    ap.add_argument("--mtu", type=int, default=9000, help="link MTU (default 9000, the paper's)")
    ap.add_argument("--data-dir", help="where the JSON/CSV go (default bench/paper-data)")
    ap.add_argument("--docs-dir", help="where the PNGs go (default docs)")
    ap.add_argument("--tag", default="",
                    help="a variant's name, appended to the files written (fig7-TAG.json, "
                         "fig7-lossy-links-TAG.png)")
    ap.add_argument("--replot", action="store_true",
                    help="measure nothing: draw the PNGs again from the data folder's JSON")
    ap.add_argument("--keep-workdir", action="store_true", help="keep logs and configs")
    args = ap.parse_args(argv)
    if min(args.repetitions, args.lossy_repetitions, args.seconds, args.lossy_seconds,
           args.connections, args.lossy_connections, args.workers) < 1:
        ap.error("repetitions, seconds, connections and workers: at least 1")
    if os.geteuid() != 0 and not args.replot:
        ap.error("needs root (network namespaces)")
    return run_in_workdir(run, lambda workdir: make_plan(args, workdir),
                          "srv6pipes-paper-", args.keep_workdir)


if __name__ == "__main__":
    sys.exit(main())
