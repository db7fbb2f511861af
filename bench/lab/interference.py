"""How much the rest of the machine did while a load run was measured.

The lab shares its 2 cores with everything else running on the machine (other people's test
suites, for one). Work they do during a run is charged to whichever mode happens to be
measured, so each sample records two things:

* ``foreign_cpus``: CPU time of user processes that are neither this program nor inside the
  lab's namespaces, in CPUs (1.0 = one core the whole run). Kernel threads are left out:
  ksoftirqd does the lab's own packet processing too.
* ``foreign_net_mbps``: bytes received by the interfaces of every *other* named network
  namespace (/run/netns), in Mb/s. Other labs' packet processing runs in softirq context,
  charged to whatever process it interrupts, so process CPU time alone misses it.
"""
import ctypes
import os
import threading
import time

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

PF_KTHREAD = 0x00200000
CLK_TCK = os.sysconf("SC_CLK_TCK")


class ForeignLoad:
    def __init__(self, namespaces):
        self.own_names = set(namespaces)
        self.own_netns = set()
        for ns in namespaces:
            try:
                self.own_netns.add(os.stat(f"/run/netns/{ns}").st_ino)
            except OSError:
                pass
        self.me = os.getpid()

    def _foreign_ticks(self):
        ticks = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self.me:
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[6]) & PF_KTHREAD:
                    continue
                if os.stat(f"/proc/{entry}/ns/net").st_ino in self.own_netns:
                    continue
            except (OSError, IndexError, ValueError):
                continue        # exited meanwhile
            # utime, stime, cutime, cstime (fields 14-17 of proc(5); 0-based 11-14 here)
            ticks[entry] = sum(int(x) for x in fields[11:15])
        return ticks

    def _foreign_rx_bytes(self):
        """{namespace: bytes received on all its interfaces} for the other named namespaces.

        Read from a helper thread that enters each namespace in turn (setns affects only the
        calling thread; the thread then exits, so this process stays where it is).
        """
        try:
            names = [n for n in os.listdir("/run/netns") if n not in self.own_names]
        except OSError:
            return {}
        out = {}

        def visit():
            for name in names:
                try:
                    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
                except OSError:
                    continue
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        continue
                    with open("/proc/thread-self/net/dev") as f:
                        lines = f.read().splitlines()[2:]
                    out[name] = sum(int(l.split(":", 1)[1].split()[0]) for l in lines)
                except (OSError, ValueError, IndexError):
                    pass
                finally:
                    os.close(fd)

        t = threading.Thread(target=visit)
        t.start()
        t.join()
        return out

    def measure(self, fn):
        """Run ``fn()``; return (its result, a dict of what the rest of the machine did).

        The dict: ``foreign_cpus``, ``foreign_net_mbps`` (see the module) and ``cpu_busy``,
        busy fraction per CPU (everything, softirqs included): which core was the bottleneck.
        """
        net0, before, cpus0 = self._foreign_rx_bytes(), self._foreign_ticks(), per_cpu_ticks()
        t0 = time.monotonic()
        result = fn()
        t1 = time.monotonic()
        net1, after, cpus1 = self._foreign_rx_bytes(), self._foreign_ticks(), per_cpu_ticks()
        seconds = max(t1 - t0, 1e-3)
        used = sum(t - before[pid] for pid, t in after.items() if pid in before)
        rx = sum(b - net0[ns] for ns, b in net1.items() if ns in net0 and b >= net0[ns])
        busy = {}
        for cpu, (idle1, total1) in cpus1.items():
            idle0, total0 = cpus0.get(cpu, (idle1, total1))
            busy[cpu] = round(1 - (idle1 - idle0) / max(1, total1 - total0), 3)
        return result, {"foreign_cpus": round(used / CLK_TCK / seconds, 3),
                        "foreign_net_mbps": round(rx * 8 / seconds / 1e6, 1),
                        "cpu_busy": busy}


def per_cpu_ticks():
    """{"cpu0": (idle + iowait ticks, total ticks), ...} from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *fields = line.split()
                fields = [int(x) for x in fields]
                out[name] = (fields[3] + fields[4], sum(fields))
    return out
