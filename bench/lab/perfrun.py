#!/usr/bin/env python3
"""Profile pipesd's workers under load (driven by bench/perf_profile.sh).

Builds the lab (c - p1 - s, split pinning: pipesd alone on CPU 1), starts pipesd with the
chosen function, starts one load run in the background, records the workers with
``perf record -e EVENT -g -p PIDS`` for the length of the run, and writes ``perf report``
(by symbol, no children) plus a per-command summary. Prints where the report went.
"""
import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from run_lab import Lab, load_testbed, prepare_endpoints  # noqa: E402
from lab.modes import Pipesd, PipesdXor, make_mode  # noqa: E402
from lab.pinning import PINNINGS  # noqa: E402
from lab.workloads import blast_workloads, iperf3_workloads, wrk_workloads  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "results")


# Counted on the middlebox CPU with --count: the system calls a relay or a proxy makes,
# softirq runs, packets received, context switches and the inter-processor interrupts it
# sends (RPS hands packets for the endpoints to their CPU with one; on a VM each is an exit).
COUNT_EVENTS = ["syscalls:sys_enter_splice", "syscalls:sys_enter_epoll_wait",
                "syscalls:sys_enter_recvfrom", "syscalls:sys_enter_sendto",
                "syscalls:sys_enter_read", "syscalls:sys_enter_write",
                "syscalls:sys_enter_epoll_ctl", "syscalls:sys_enter_accept4",
                "syscalls:sys_enter_connect", "syscalls:sys_enter_close",
                "syscalls:sys_enter_setsockopt", "syscalls:sys_enter_shutdown",
                "raw_syscalls:sys_enter", "irq:softirq_entry", "net:netif_receive_skb",
                "context-switches", "ipi:ipi_send_cpu"]


def parse_perf_stat(text):
    """{event: count} from ``perf stat -x ,`` output (events it could not count are left
    out)."""
    out = {}
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) >= 3 and fields[0].strip().isdigit():
            out[fields[2]] = int(fields[0])
    return out


def count_report(counts, result, seconds):
    """Lines for the report's header: each count per MB moved and per request."""
    mb = result.get("bits_per_second", 0) * seconds / 8 / 1e6
    requests = result.get("requests_per_second", 0) * seconds
    lines = [f"# counts on the middlebox CPU over {seconds} s (~{mb:.0f} MB, "
             f"~{requests:.0f} requests): per MB / per request"]
    for event, n in counts.items():
        lines.append(f"#   {event:32s} {n:12d}  {n / mb if mb else 0:10.2f}  "
                     f"{n / requests if requests else 0:10.2f}")
    return "\n".join(lines) + "\n"


def worker_pids(host):
    """PIDs of the pipesd workers in ``host`` (their comm is "pipesd wN")."""
    pids = subprocess.run(["ip", "netns", "pids", host.ns], capture_output=True,
                          text=True).stdout.split()
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().startswith("pipesd w"):
                    out.append(pid)
        except OSError:
            pass
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--event", default="cpu-clock")
    ap.add_argument("--function", choices=["identity", "xor"], default="identity")
    ap.add_argument("--workload", default="blast-4streams")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--mtu", type=int, default=9000)
    ap.add_argument("--keep-data", action="store_true", help="keep perf.data next to the report")
    ap.add_argument("--mode", default=None,
                    help="profile another lab mode instead (e.g. haproxy); implies --cpu")
    ap.add_argument("--count", action="store_true",
                    help="also count, on the middlebox CPU, system calls by name, softirq "
                         "runs and packets received (perf stat on tracepoints), per MB and "
                         "per request")
    ap.add_argument("--cpu", action="store_true",
                    help="record the whole middlebox CPU (softirqs, capture, every process) "
                         "instead of the pipesd workers: the fair view to compare modes")
    args = ap.parse_args()
    workloads = {w.name: w for w in iperf3_workloads() + blast_workloads() + wrk_workloads()}
    if args.workload not in workloads:
        ap.error(f"--workload: one of {', '.join(workloads)}")
    if args.mode:
        mode, args.cpu = make_mode(args.mode), True
    else:
        mode = PipesdXor() if args.function == "xor" else Pipesd("identity")
    if not mode.supports(workloads[args.workload]):
        ap.error(f"{mode.name} cannot run {args.workload} (xor changes the bytes: use blast-*)")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = tempfile.mkdtemp(prefix="srv6pipes-perf-")
    data = os.path.join(workdir, "perf.data")
    Testbed = load_testbed()
    with Testbed(proxies=1, mtu=args.mtu, topology="line") as tb:
        lab = Lab(tb, PINNINGS["split"], workdir)
        prepare_endpoints(lab)
        lab.servers.start()
        mode.setup(lab)
        try:
            print("check:", mode.check(lab), flush=True)
            pids = [] if args.cpu else worker_pids(tb.hosts["p1"])
            if not pids and not args.cpu:
                raise SystemExit("no pipesd worker found in p1")
            cpu = PINNINGS["split"].middlebox_cpus if args.cpu else None
            target = ["-a", "-C", cpu] if args.cpu else ["-p", ",".join(pids)]
            result = {}
            load = threading.Thread(target=lambda: result.update(
                workloads[args.workload].run(lab, args.seconds + 2)))
            load.start()
            time.sleep(1)                # record the steady state, not the ramp-up
            counting = None
            if args.count:
                counting = subprocess.Popen(
                    ["perf", "stat", "-x", ",", "-e", ",".join(COUNT_EVENTS), "-a", "-C",
                     PINNINGS["split"].middlebox_cpus, "--", "sleep", str(args.seconds)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            rec = subprocess.run(["perf", "record", "-e", args.event, "-g", "-o", data,
                                  *target, "--", "sleep", str(args.seconds)],
                                 capture_output=True, text=True)
            counts = parse_perf_stat(counting.communicate()[1]) if counting else None
            load.join()
        finally:
            mode.teardown(lab)
    if rec.returncode != 0 or not os.path.exists(data):
        raise SystemExit(f"perf record failed: {rec.stderr.strip()[-500:]}")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    out = os.path.join(RESULTS_DIR, f"perf-{stamp}-{mode.name}-{args.workload}.txt")
    what = f"CPU {cpu}" if args.cpu else f"pipesd workers {pids}"
    header = (f"# perf record -e {args.event} -g, {what}, {mode.name}, "
              f"{args.workload}, MTU {args.mtu}, {args.seconds} s; load result: "
              f"{result.get('bits_per_second', 0) / 1e9:.2f} Gb/s, "
              f"{result.get('requests_per_second', 0):.0f} req/s\n")
    by_comm = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children",
                              "--sort", "comm,dso", "-g", "none"], capture_output=True, text=True)
    by_sym = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children",
                             "--sort", "dso,symbol", "-g", "none", "--percent-limit", "0.5"],
                            capture_output=True, text=True)
    if counts is not None:
        header += count_report(counts, result, args.seconds)
    with open(out, "w") as f:
        f.write(header + "\n## by shared object\n" + by_comm.stdout
                + "\n## by symbol (>= 0.5%)\n" + by_sym.stdout)
    if args.keep_data:
        os.replace(data, out[:-4] + ".data")
    subprocess.run(["rm", "-rf", workdir])
    print(header.strip())
    print("\n".join(by_sym.stdout.splitlines()[:40]))
    print(f"report: {out}")


if __name__ == "__main__":
    main()
