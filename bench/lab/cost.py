"""What a load run cost the middlebox: CPU time per request and per GB.

Two measures, taken around every load run (``CostMeter.measure``):

* ``proxy_cpu_seconds``: user + system time of every process in the middlebox's network
  namespaces (pipesd's master, capture and workers; HAProxy's threads; nothing for the
  router), from /proc/PID/stat. Softirq work that the kernel does for these processes'
  packets is only partly in it: on veth, a packet's receive processing runs in the
  *sender's* context, whoever that is.
* ``cpu_seconds``: busy time of every CPU (/proc/stat: everything but idle and iowait,
  softirq included) and ``softirq_seconds`` the softirq part of it. With ``split`` pinning
  the middlebox has CPU 1 to itself (its processes and, through RPS, its packet
  processing), so that CPU's busy time is the **whole middlebox cost** (``box``), the
  router's forwarding included; unpinned, every CPU also runs the endpoints, and the sum
  over all CPUs (``all CPUs``) is only comparable between modes of the same run.

``per_unit`` turns a sample into cost per unit of work: microseconds per request for short
HTTP transfers, CPU seconds per GB (10^9 bytes moved) for the bulk ones.
"""
import os
import statistics
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
PF_KTHREAD = 0x00200000

# wrk rows whose files are at most this big are charged per request, the rest per byte.
PER_REQUEST_MAX_BYTES = 100 * 1024


def namespace_inodes(names):
    """Inodes of the named network namespaces (/run/netns/NAME) that exist."""
    out = set()
    for name in names:
        try:
            out.add(os.stat(f"/run/netns/{name}").st_ino)
        except OSError:
            pass
    return out


def process_ticks(netns_inodes):
    """{pid: utime + stime ticks} of the user processes inside ``netns_inodes``."""
    ticks = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino not in netns_inodes:
                continue
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue            # exited meanwhile, or not ours to read
        if int(fields[6]) & PF_KTHREAD:
            continue
        ticks[entry] = int(fields[11]) + int(fields[12])    # utime, stime
    return ticks


def parse_proc_stat(text):
    """{"cpu0": {"busy": ticks, "softirq": ticks}, ...} from the text of /proc/stat."""
    out = {}
    for line in text.splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *values = line.split()
            values = [int(x) for x in values]
            # user nice system idle iowait irq softirq steal guest guest_nice; guest time is
            # already inside user (proc(5)), so the first eight make the total.
            total = sum(values[:8])
            out[name] = {"busy": total - values[3] - values[4], "softirq": values[6]}
    return out


def cpu_ticks():
    with open("/proc/stat") as f:
        return parse_proc_stat(f.read())


def process_delta(before, after):
    """Ticks the processes used between two ``process_ticks`` snapshots (a process started
    meanwhile counts from zero; one that exited meanwhile is lost)."""
    return sum(t - before.get(pid, 0) for pid, t in after.items() if t >= before.get(pid, 0))


def cpu_delta(before, after):
    """{cpu: {"busy": seconds, "softirq": seconds}} between two ``cpu_ticks`` snapshots."""
    out = {}
    for cpu, now in after.items():
        then = before.get(cpu, now)
        out[cpu] = {k: round((now[k] - then[k]) / CLK_TCK, 3) for k in ("busy", "softirq")}
    return out


class CostMeter:
    """Measures the middlebox's CPU around a load run.

    ``middlebox_cpus``: the taskset list the middlebox is pinned to ("1"), or None when it
    is not pinned (then the ``box`` cost is the sum over all CPUs, marked as such).
    """

    def __init__(self, namespaces, middlebox_cpus):
        self.netns = namespace_inodes(namespaces)
        self.middlebox_cpus = middlebox_cpus

    def measure(self, fn):
        """Run ``fn()``; return (its result, the cost fields to add to its sample)."""
        procs0, cpus0, t0 = process_ticks(self.netns), cpu_ticks(), time.monotonic()
        result = fn()
        procs1, cpus1, t1 = process_ticks(self.netns), cpu_ticks(), time.monotonic()
        cpus = cpu_delta(cpus0, cpus1)
        return result, cost_fields(process_delta(procs0, procs1) / CLK_TCK, cpus,
                                   self.middlebox_cpus, t1 - t0)


def cpu_names(cpulist):
    """``"1"``, ``"0-1"``, ``"0,2"`` -> ["cpu1"], ["cpu0", "cpu1"], ["cpu0", "cpu2"]."""
    out = []
    for part in cpulist.split(","):
        low, _, high = part.partition("-")
        out += [f"cpu{i}" for i in range(int(low), int(high or low) + 1)]
    return out


def cost_fields(proxy_seconds, cpus, middlebox_cpus, seconds):
    """The fields a sample gets: ``proxy_cpu_seconds``, ``box_cpu_seconds`` (the middlebox
    CPUs' busy time when pinned, else every CPU's), ``box_softirq_seconds``, ``box_scope``
    ("middlebox" or "all CPUs"), the per-CPU detail and the window's length."""
    box = cpu_names(middlebox_cpus) if middlebox_cpus else sorted(cpus)
    return {
        "proxy_cpu_seconds": round(proxy_seconds, 3),
        "box_cpu_seconds": round(sum(cpus[c]["busy"] for c in box if c in cpus), 3),
        "box_softirq_seconds": round(sum(cpus[c]["softirq"] for c in box if c in cpus), 3),
        "box_scope": "middlebox" if middlebox_cpus else "all CPUs",
        "cpu_seconds": cpus,
        "window_seconds": round(seconds, 3),
    }


def unit(workload):
    """``"request"`` or ``"GB"``: what a workload's cost is counted per."""
    if workload.startswith("wrk-"):
        size = workload.split("-")[1]
        number, scale = size[:-2], {"KB": 1024, "MB": 1024 * 1024, "GB": 1 << 30}[size[-2:]]
        if int(number) * scale <= PER_REQUEST_MAX_BYTES:
            return "request"
    return "GB"


def per_unit(sample, workload):
    """{"proxy": cost, "box": cost, "softirq": cost} of one sample in ``unit(workload)``:
    microseconds per request or CPU seconds per GB; None where the sample lacks the data."""
    if not sample or "error" in sample or "proxy_cpu_seconds" not in sample:
        return None
    if unit(workload) == "request":
        work, scale = sample.get("requests"), 1e6
    else:
        moved = sample.get("bytes")
        work, scale = (moved / 1e9 if moved else None), 1.0
    if not work:
        return None
    return {"proxy": sample["proxy_cpu_seconds"] * scale / work,
            "box": sample["box_cpu_seconds"] * scale / work,
            "softirq": sample["box_softirq_seconds"] * scale / work}


def median_cost(samples, workload):
    """Median of each ``per_unit`` field over the samples that have one (None if none)."""
    costs = [c for c in (per_unit(s, workload) for s in samples) if c]
    if not costs:
        return None
    return {k: statistics.median(c[k] for c in costs) for k in costs[0]}
