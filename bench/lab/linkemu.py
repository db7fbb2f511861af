"""Long and lossy links for the lab: delay, loss and an optional rate cap per direction.

The paper (section V-B) put netem on every link. This kernel has no netem (nor fq), so
there are two backends, chosen per run (``backend="auto"``: netem when the kernel has it):

``netem``      ``tc qdisc replace dev to-B root netem delay D loss P [rate R]`` on the
               sending end of each direction (netem orphans the packets it holds, so the
               sender's TCP small queues are not charged for the delay).
``delayline``  bench/linkemu/delayline.c, compiled on first use: the receiving end queues
               what arrives on the link (``ip6tables-legacy -t raw -A PREROUTING -i to-A
               -j NFQUEUE``) and one delayline process per direction drops, holds and
               releases those packets in order. Its own comment says why at the receiving
               end and how memory stays bounded.

::

    with LinkEmulator(tb, cpus={"c": "0", "p1": "1", "s": "0"}) as emu:
        emu.add("c", "p1", LinkCondition(delay_ms=25, loss_pct=1))   # both directions
        emu.start()
        ...                                   # measure
    emu.stats                                 # per direction: what each line did

The testbed is IPv6 only, so is the delayline's rule. A delayline process releases the
rest of the receive path of every packet it accepts (its verdict runs it): where it is
pinned is where that host's packet processing happens, so it gets the host's CPUs.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
DELAYLINE_SOURCE = os.path.join(os.path.dirname(HERE), "linkemu", "delayline.c")
# Built next to the source's folder, ignored by git (bench/linkemu/build/).
DELAYLINE_BUILD_DIR = os.path.join(os.path.dirname(HERE), "linkemu", "build")
BACKENDS = ("auto", "netem", "delayline")
FIRST_QUEUE = 100          # pipesd's capture uses queue 0 by default; stay clear of it
QUEUE_LIMIT = 10000        # packets one direction may hold (kernel maxlen, netem limit)


class LinkEmulationError(RuntimeError):
    """The emulation could not be set up (no backend, build failed, a line did not start)."""


@dataclass(frozen=True)
class LinkCondition:
    """What one direction of a link does to packets: one-way delay (ms), independent loss
    (% of packets) and an optional rate cap (Mb/s, FIFO)."""
    delay_ms: float = 0.0
    loss_pct: float = 0.0
    rate_mbit: Optional[float] = None

    def __post_init__(self):
        if not (math.isfinite(self.delay_ms) and 0 <= self.delay_ms <= 10000):
            raise ValueError(f"delay_ms={self.delay_ms}: 0..10000")
        if not (math.isfinite(self.loss_pct) and 0 <= self.loss_pct < 100):
            raise ValueError(f"loss_pct={self.loss_pct}: 0 <= loss < 100")
        if self.rate_mbit is not None and not (math.isfinite(self.rate_mbit)
                                               and self.rate_mbit > 0):
            raise ValueError(f"rate_mbit={self.rate_mbit}: > 0 or None")

    def describe(self):
        """``25 ms, 1% loss`` (``no change`` when it does nothing)."""
        parts = []
        if self.delay_ms:
            parts.append(f"{self.delay_ms:g} ms")
        if self.loss_pct:
            parts.append(f"{self.loss_pct:g}% loss")
        if self.rate_mbit:
            parts.append(f"{self.rate_mbit:g} Mb/s")
        return ", ".join(parts) or "no change"

    def netem_args(self, limit=QUEUE_LIMIT):
        """The ``tc qdisc ... netem`` arguments for this condition."""
        args = ["netem", "limit", str(limit), "delay", f"{self.delay_ms:g}ms"]
        if self.loss_pct:
            args += ["loss", f"{self.loss_pct:g}%"]
        if self.rate_mbit:
            args += ["rate", f"{self.rate_mbit:g}mbit"]
        return args

    def delayline_args(self, queue, seed, limit=QUEUE_LIMIT, realtime=True):
        """The delayline command line (after the program) for this condition."""
        args = ["--queue", str(queue), "--delay-ms", f"{self.delay_ms:g}",
                "--loss-pct", f"{self.loss_pct:g}", "--limit", str(limit), "--seed", str(seed)]
        if self.rate_mbit:
            args += ["--rate-mbit", f"{self.rate_mbit:g}"]
        if realtime:
            args.append("--realtime")
        return args


def path_condition(conditions):
    """One direction of a path made of links with ``conditions``: the summed delay, and the
    loss of independent drops (1 - product of the survival rates), in the same units."""
    survive = 1.0
    for cond in conditions:
        survive *= 1 - cond.loss_pct / 100
    return {"delay_ms": sum(c.delay_ms for c in conditions),
            "loss_pct": (1 - survive) * 100}


def build_delayline(build_dir=DELAYLINE_BUILD_DIR, cc=None):
    """Compile delayline.c unless an up-to-date binary exists; returns its path.

    Needs a C compiler and libnetfilter-queue-dev (in the Makefile's APT_PACKAGES). The
    binary goes to ``build_dir`` (ignored by git), written atomically so that two runs
    building at once cannot see half a file.
    """
    target = os.path.join(build_dir, "delayline")
    if (os.path.exists(target)
            and os.path.getmtime(target) >= os.path.getmtime(DELAYLINE_SOURCE)):
        return target
    os.makedirs(build_dir, exist_ok=True)
    cc = cc or os.environ.get("CC") or shutil.which("cc") or "gcc"
    tmp = f"{target}.{os.getpid()}.tmp"
    res = subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-o", tmp, DELAYLINE_SOURCE,
                          "-lnetfilter_queue", "-lnfnetlink"],
                         capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise LinkEmulationError(f"cannot build delayline ({cc}): {res.stderr.strip()[-1500:]}"
                                 " (needs libnetfilter-queue-dev: make deps)")
    os.replace(tmp, target)
    return target


def netem_available(host):
    """Whether the kernel can run netem: tries a netem qdisc on ``host``'s loopback."""
    res = host.run(["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "0ms"],
                   check=False)
    if res.returncode != 0:
        return False
    host.run(["tc", "qdisc", "del", "dev", "lo", "root"], check=False)
    return True


@dataclass
class _Direction:
    """One emulated direction: packets from ``src`` to ``dst`` over their link."""
    src: str
    dst: str
    condition: LinkCondition
    queue: Optional[int] = None     # delayline: the NFQUEUE number in dst
    proc: Optional[subprocess.Popen] = None
    stats: Optional[dict] = None

    def name(self):
        return f"{self.src}->{self.dst}"


class LinkEmulator:
    """Delay, loss and rate caps on the links of a :class:`srv6pipes.lab.testbed.Testbed`.

    ``add()`` the conditions, ``start()``; ``stop()`` (also on leaving the with-block)
    removes everything and fills ``stats`` (one dict per direction). ``cpus`` maps a host
    name to the taskset CPU list its delay lines run on (None or missing: unpinned).
    """

    def __init__(self, tb, backend="auto", cpus=None, workdir=None, seed=1, realtime=True):
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r}: one of {BACKENDS}")
        self.tb, self.requested, self.cpus = tb, backend, dict(cpus or {})
        self.workdir, self.seed, self.realtime = workdir, seed, realtime
        self.directions: list[_Direction] = []
        self.backend = None
        self.stats: list[dict] = []
        self._rules: list[tuple] = []   # (host, rule argv) installed, removed at stop
        self._started = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def add(self, a, b, condition, both_ways=True):
        """Emulate ``condition`` on the link between hosts ``a`` and ``b`` (a -> b, and
        b -> a unless ``both_ways`` is false). Call before start()."""
        if self._started:
            raise LinkEmulationError("add() after start()")
        if b not in self.tb.hosts[a].interfaces:
            raise LinkEmulationError(f"no link between {a} and {b}")
        pairs = [(a, b), (b, a)] if both_ways else [(a, b)]
        for src, dst in pairs:
            if any(d.src == src and d.dst == dst for d in self.directions):
                raise LinkEmulationError(f"{src}->{dst} is already emulated")
            self.directions.append(_Direction(src, dst, condition))
        return self

    def choose_backend(self):
        """The backend this run uses: the requested one, or netem if the kernel has it."""
        if self.requested != "auto":
            return self.requested
        host = next(iter(self.tb.hosts.values()))
        return "netem" if netem_available(host) else "delayline"

    def start(self):
        self._started = True
        self.backend = self.choose_backend()
        try:
            if self.backend == "netem":
                for d in self.directions:
                    self._start_netem(d)
            else:
                program = build_delayline()
                queues = {}
                for i, d in enumerate(self.directions):
                    # One queue number per direction within the receiving namespace.
                    d.queue = queues[d.dst] = queues.get(d.dst, FIRST_QUEUE - 1) + 1
                    # Each direction its own seed: its losses independent of the others'.
                    self._start_delayline(program, d, seed=self.seed * 1000 + i)
        except BaseException:
            self.stop()
            raise
        return self

    # ------------------------------------------------------------------ netem

    def _start_netem(self, d):
        host = self.tb.hosts[d.src]
        dev = host.interfaces[d.dst].name
        # One skb per MTU packet, so that loss is per packet (netem drops a GSO skb whole).
        host.run(["ip", "link", "set", "dev", dev, "gso_max_segs", "1"])
        host.run(["tc", "qdisc", "replace", "dev", dev, "root", *d.condition.netem_args()])
        self._rules.append((host, ["tc", "qdisc", "del", "dev", dev, "root"]))

    def _netem_stats(self, d):
        host = self.tb.hosts[d.src]
        res = host.run(["tc", "-s", "-j", "qdisc", "show", "dev", host.interfaces[d.dst].name],
                       check=False)
        try:
            q = next(q for q in json.loads(res.stdout) if q.get("kind") == "netem")
        except (ValueError, StopIteration):
            return {"error": res.stderr.strip()[-300:]}
        return {"received": q.get("packets", 0) + q.get("drops", 0),
                "dropped": q.get("drops", 0), "accepted": q.get("packets", 0),
                "bytes": q.get("bytes", 0)}

    # ------------------------------------------------------------------ delayline

    def _start_delayline(self, program, d, seed):
        host = self.tb.hosts[d.dst]
        iface = host.interfaces[d.src].name
        argv = [program, *d.condition.delayline_args(d.queue, seed, realtime=self.realtime)]
        cpus = self.cpus.get(d.dst)
        if cpus:
            argv = ["taskset", "-c", cpus, *argv]
        log = (open(os.path.join(self.workdir, f"delayline-{d.src}-{d.dst}.log"), "a")
               if self.workdir else subprocess.DEVNULL)
        d.proc = host.popen(argv, stdout=subprocess.PIPE, stderr=log, text=True)
        if log is not subprocess.DEVNULL:
            log.close()
        # Bound before the rule: a queue without a listener drops everything.
        deadline = time.monotonic() + 10
        while not queue_bound(host, d.queue):
            if d.proc.poll() is not None or time.monotonic() > deadline:
                raise LinkEmulationError(f"delayline for {d.name()} did not start "
                                         f"(exit {d.proc.poll()})")
            time.sleep(0.02)
        rule = ["-t", "raw", "-A", "PREROUTING", "-i", iface, "-j", "NFQUEUE",
                "--queue-num", str(d.queue)]
        host.run(["ip6tables-legacy", "-w", *rule])
        self._rules.append((host, ["ip6tables-legacy", "-w", "-t", "raw", "-D", *rule[3:]]))

    # ------------------------------------------------------------------ stop

    def stop(self):
        """Remove the rules and qdiscs, stop the delay lines (they release what they hold
        first), collect ``stats``. Safe to call twice and after a failed start."""
        if self.backend == "netem" and self._rules:
            for d in self.directions:
                d.stats = {"direction": d.name(), "backend": "netem",
                           **asdict(d.condition), **self._netem_stats(d)}
                self.stats.append(d.stats)
        for host, argv in reversed(self._rules):
            host.run(argv, check=False)
        self._rules = []
        for d in self.directions:
            if d.proc is None:
                continue
            if d.proc.poll() is None:
                d.proc.send_signal(signal.SIGTERM)
            try:
                out, _ = d.proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                d.proc.kill()
                out, _ = d.proc.communicate()
            d.stats = parse_delayline_stats(out)
            d.stats.update({"direction": d.name(), "backend": "delayline",
                            "exit_code": d.proc.returncode})
            self.stats.append(d.stats)
            d.proc = None

    def describe(self):
        """{"a->b": "25 ms, 1% loss", ...} for the results' settings."""
        return {d.name(): d.condition.describe() for d in self.directions}


def queue_bound(host, queue):
    """Whether a process in ``host`` listens on NFQUEUE ``queue`` (per-namespace table)."""
    res = host.run(["cat", "/proc/net/netfilter/nfnetlink_queue"], check=False)
    return any(line.split()[:1] == [str(queue)] for line in res.stdout.splitlines())


def parse_delayline_stats(stdout):
    """The JSON line a delayline prints at exit, as a dict; ``{"error": ...}`` without one."""
    for line in reversed((stdout or "").strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {"error": f"no statistics from delayline: {(stdout or '')[-300:]!r}"}


def accuracy(stats):
    """What a run's delay lines say about themselves, for the results: the measured loss
    rate against the setting, the worst lateness, and any packet the kernel or the line
    dropped beyond the setting (``overloaded``: the line was past its ceiling)."""
    out = []
    for st in stats:
        if "error" in st:
            out.append({"direction": st.get("direction"), "error": st["error"]})
            continue
        received = st.get("received") or 0
        extra = sum(max(0, st.get(k) or 0) for k in
                    ("overflow", "enobufs", "kernel_queue_dropped", "kernel_user_dropped"))
        out.append({"direction": st.get("direction"), "received": received,
                    "loss_pct_set": st.get("loss_pct"),
                    "loss_pct_seen": (100.0 * st.get("dropped", 0) / received) if received else None,
                    "late_max_us": st.get("late_max_us"),
                    "late_over_1ms": st.get("late_over_1ms"),
                    "overloaded": extra > 0, "extra_drops": extra})
    return out
