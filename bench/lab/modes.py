"""What the middleboxes (p1, and p2 in a chain) are during a measurement.

Each mode has ``setup(lab)``, ``check(lab)`` (prove the traffic takes the mode's path, see
checks.py) and ``teardown(lab)``, and runs in a fresh testbed. ``hosts`` names the
middleboxes the mode occupies (``("p1",)`` unless said), ``proxied`` whether they terminate
the client's TCP connections; ``supports(workload)`` whether the mode can carry it.
"""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

from srv6pipes import kernelsetup
from srv6pipes.addressplan import AddressError, AddressPlan
from srv6pipes.functions import FunctionRegistry, UnknownFunction
from srv6pipes.lab.apps import wait_listening

from .checks import CheckFailed, check_http_path, check_xor
from .servers import BLAST_PORT, HTTP_PORT, IPERF_PORT


class ModeUnavailable(RuntimeError):
    """The mode cannot run on this machine (missing program, broken install)."""


def program(name):
    """The path of SRv6Pipes' command ``name`` (pipesd, pipesctl): the one installed with
    the Python running the benchmark (its environment's bin/), else the first on PATH.

    A benchmark run with /path/to/venv/bin/python must measure that venv's pipesd, not
    whichever other install PATH happens to find first.
    """
    here = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(here, os.X_OK):
        return here
    return shutil.which(name)


def steer(lab, segments):
    lab.tb.steer(client="c", dest="s", segments=list(segments))


def unsteer(lab):
    """Remove the client's seg6 route towards s (plain routing through p1 again)."""
    lab.tb.unsteer(client="c", dest="s")


class Mode:
    name = "?"
    hosts = ("p1",)         # the middleboxes this mode configures (and checks)
    proxied = False
    description = ""
    final_stats = None      # what the middlebox reported about itself, recorded in the JSON

    def setup(self, lab):
        pass

    def teardown(self, lab):
        pass

    def supports(self, workload):
        return True

    def check(self, lab):
        """Raise CheckFailed unless traffic takes this mode's path intact; return evidence."""
        return check_http_path(lab, self)

    def info(self):
        """Settings worth recording in the results."""
        return {"description": self.description}


class Router(Mode):
    """Plain IPv6 forwarding in p1 (or in every host of ``hosts``): no SRH, static routes."""
    name = "router"
    description = "p1 forwards (kernel IPv6 routing), no SRH"

    def __init__(self, hosts=("p1",), name=None):
        self.hosts = tuple(hosts)
        if name:
            self.name = name
        if self.hosts != ("p1",):
            self.description = (f"{', '.join(self.hosts)} forward (kernel IPv6 routing), "
                                "no SRH")


class RouterSRH(Mode):
    """The client adds an SRH whose segment is a seg6local End SID of p1, then s.

    p1 processes the SRH in the kernel (End: next segment, forward) and s receives a packet
    with an SRH (segments left 0); the testbed enables seg6 on every interface.
    """
    name = "router-srh"
    description = "p1 runs a seg6local End SID, client SRH [p1 End, s]"
    SID_HOST_BITS = 0xE0D

    def sid(self, lab):
        return lab.tb.locator("p1")[self.SID_HOST_BITS]

    def setup(self, lab):
        p1 = lab.tb.hosts["p1"]
        _, dev = _next_hop(p1, lab.tb.hosts["s"].addr)
        p1.run(["ip", "-6", "route", "add", f"{self.sid(lab)}/128", "encap", "seg6local",
                "action", "End", "dev", dev])
        steer(lab, [self.sid(lab)])

    def teardown(self, lab):
        unsteer(lab)
        lab.tb.hosts["p1"].run(["ip", "-6", "route", "del", f"{self.sid(lab)}/128"], check=False)


HAPROXY_CFG = """\
global
    nbthread {nbthread}
    {cpu_map}
    # The lab's file limit is 20000; HAProxy needs about 2 fds per connection.
    maxconn 4000
    log stdout format raw local0 err

defaults
    mode tcp
    option splice-auto
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend intercept
    bind :::{port} transparent
    default_backend s

backend s
    # Connect to s from the client's own address and port (TPROXY "usesrc clientip").
    source [::] usesrc clientip
    # No port: use the port the client connected to (80, 5201, 5202). Brackets keep the
    # last group of the IPv6 address from being read as a port.
    server s [{server}]
"""

HAPROXY_NFT = """\
table inet {table} {{
    chain prerouting {{
        type filter hook prerouting priority mangle + 1; policy accept;
        # TPROXY first (see docs/design.md section 3: with the socket rule first, SYNs that match a
        # TIME_WAIT socket stall).
        ip6 daddr {server} tcp dport {{ {ports} }} counter tproxy ip6 to :{port} meta mark set {mark} accept
        # Replies from s to the client's address belong to HAProxy's transparent sockets.
        meta l4proto tcp socket transparent 1 counter meta mark set {mark} accept
    }}
}}
"""


class HAProxy(Mode):
    """HAProxy 2.6 intercepting c -> s with TPROXY in p1 (the peer users would pick).

    The client talks to s directly; p1 diverts those connections to HAProxy, which connects
    to s with the client's address (fully transparent, like pipesd).
    """
    name = "haproxy"
    proxied = True
    description = ("HAProxy 2.6 in p1, nft TPROXY interception, mode tcp, splice-auto, "
                   "one thread per middlebox CPU (as pipesd's workers), usesrc clientip")
    PORT = 8080
    MARK = 0x5A
    TABLE = 190

    def __init__(self):
        self.proc = None
        self.nft_table = f"bench_haproxy_{os.getpid()}"

    def setup(self, lab):
        if not shutil.which("haproxy"):
            raise ModeUnavailable("haproxy is not installed")
        p1, s = lab.tb.hosts["p1"], lab.tb.hosts["s"]
        pin = lab.pinning
        # One thread per CPU the middlebox may use, as pipesd runs one worker per CPU.
        if pin.middlebox_cpus is None:
            nbthread, cpu_map = 2, "cpu-map auto:1/1-2 0-1"
        else:
            nbthread = pin.cpu_count(pin.middlebox_cpus)
            cpu_map = f"cpu-map 1/all {pin.middlebox_cpus}"
        cfg = os.path.join(lab.workdir, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(HAPROXY_CFG.format(nbthread=nbthread, cpu_map=cpu_map, port=self.PORT,
                                       server=s.addr))
        nft = os.path.join(lab.workdir, "haproxy.nft")
        with open(nft, "w") as f:
            f.write(HAPROXY_NFT.format(table=self.nft_table, server=s.addr, port=self.PORT,
                                       ports=f"{HTTP_PORT}, {IPERF_PORT}, {BLAST_PORT}", mark=self.MARK))
        p1.run(["ip", "-6", "rule", "add", "fwmark", str(self.MARK), "lookup", str(self.TABLE)])
        p1.run(["ip", "-6", "route", "add", "local", "::/0", "dev", "lo", "table", str(self.TABLE)])
        p1.run(["nft", "-f", nft])
        log = os.path.join(lab.workdir, "haproxy.log")
        self.proc = p1.popen([*lab.pinning.taskset(lab.pinning.middlebox_cpus),
                              "haproxy", "-db", "-f", cfg], stdout=open(log, "a"),
                             stderr=subprocess.STDOUT)
        try:
            wait_listening(p1, self.PORT)
        except RuntimeError as exc:
            raise ModeUnavailable(f"haproxy did not start ({exc}); log: {_tail(log)}") from exc

    def teardown(self, lab):
        p1 = lab.tb.hosts["p1"]
        if self.proc is not None:
            stop(self.proc)
            self.proc = None
        p1.run(["nft", "delete", "table", "inet", self.nft_table], check=False)
        p1.run(["ip", "-6", "rule", "del", "fwmark", str(self.MARK), "lookup", str(self.TABLE)],
               check=False)
        p1.run(["ip", "-6", "route", "flush", "table", str(self.TABLE)], check=False)


class Pipesd(Mode):
    """pipesd in one middlebox (``host``), the client steered through one of its function
    addresses: ``function`` (a built-in's name or id, see srv6pipes.functions) with
    ``params`` (the low bits of the address, see srv6pipes.addressplan)."""
    proxied = True

    def __init__(self, function, params=0, workers=None, host="p1", name=None):
        """workers None: pipesd's default, one per CPU of the middlebox's pinning (one in
        `split`, two unpinned), as HAProxy's threads are mapped."""
        self.function, self.params, self.workers = function, int(params), workers
        self.host = host
        self.hosts = (host,)
        self.name = name or f"pipesd-{function}"
        workers_text = "one worker per CPU" if workers is None else f"--workers {workers}"
        self.description = (f"pipesd ({workers_text}) in {host}, client SRH "
                            f"[{self.label()} @{host}, s]")
        self.proc = None
        self.final_stats = None     # pipesctl stats just before the daemon was stopped
        # Unique per run and host: other pipesd instances may run on this machine meanwhile,
        # and the daemons of a chain share /run and /dev/shm.
        self.daemon_name = f"bench{os.getpid()}{host}"
        self.control = f"/run/srv6pipes/{self.daemon_name}.sock"
        self.log = None

    def label(self):
        """The function as written in descriptions: ``xor-passes 0x2a01``, ``identity``."""
        if not self.params:
            return str(self.function)
        return f"{self.function} {self.params if self.params < 256 else hex(self.params)}"

    @staticmethod
    def available():
        """Raise ModeUnavailable with the reason when pipesd cannot be started."""
        for prog in ("pipesd", "pipesctl"):
            path = program(prog)
            if not path:
                raise ModeUnavailable(f"{prog} is not installed (pip install -e .)")
            res = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=30)
            if res.returncode != 0:
                last = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
                raise ModeUnavailable(f"`{prog} --help` fails: {last[0]}")

    def resolved(self):
        """The built-in function ``self.function`` names (srv6pipes.functions.Function)."""
        try:
            return FunctionRegistry().resolve(self.function)
        except UnknownFunction as exc:
            raise ModeUnavailable(f"pipesd has no function {self.function!r}: {exc}") from exc

    def address(self, lab):
        """The function address in the host's locator (default plan: 16 function bits,
        32 parameter bits, as pipesd runs here)."""
        try:
            return str(AddressPlan(lab.tb.locator(self.host)).encode(
                self.resolved().function_id, self.params))
        except AddressError as exc:
            raise ModeUnavailable(f"no address for {self.label()}: {exc}") from exc

    def setup(self, lab):
        self.start(lab)
        self.steer(lab)

    def start(self, lab):
        """Start the daemon in ``self.host`` and wait until it answers (no steering)."""
        self.available()
        self.resolved()
        host = lab.tb.hosts[self.host]
        os.makedirs(os.path.dirname(self.control), exist_ok=True)
        self.log = os.path.join(lab.workdir, f"{self.name}-{self.host}.log")
        # pipesd pins worker i to the i-th CPU of its affinity and by default runs one per
        # CPU: under taskset -c 1 (split pinning) one worker, unpinned one on each core.
        workers = [] if self.workers is None else ["--workers", str(self.workers)]
        cmd = [*lab.pinning.taskset(lab.pinning.middlebox_cpus),
               program("pipesd"), *workers,
               "--locator", str(lab.tb.locator(self.host)),
               "--port", "7000", "--name", self.daemon_name, "--control", self.control]
        self.proc = host.popen(cmd, stdout=open(self.log, "a"), stderr=subprocess.STDOUT)
        self._wait_ready(lab)

    def steer(self, lab):
        steer(lab, [self.address(lab)])

    def unsteer(self, lab):
        unsteer(lab)

    def _wait_ready(self, lab, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ModeUnavailable(f"pipesd exited with {self.proc.returncode}; "
                                      f"log: {_tail(self.log)}")
            if self.stats(lab) is not None:
                return
            time.sleep(0.2)
        raise ModeUnavailable(f"pipesd not ready after {timeout}s; log: {_tail(self.log)}")

    def stats(self, lab):
        """pipesctl stats as a dict, or None when the daemon does not answer."""
        res = lab.tb.hosts[self.host].run([program("pipesctl"), "-j", "--control",
                                           self.control, "stats"],
                                          check=False, timeout=10)
        if res.returncode != 0:
            return None
        try:
            return json.loads(res.stdout)
        except ValueError:
            return None

    def function_bytes_up(self, lab):
        """Bytes the function moved client -> server so far (pipesctl stats), 0 if none."""
        stats = self.stats(lab) or {}
        functions = stats.get("totals", {}).get("functions", {})
        return functions.get(self.resolved().name, {}).get("bytes_up", 0)

    def check(self, lab):
        return check_functions(lab, self, [self])

    def teardown(self, lab):
        self.unsteer(lab)
        self.stop(lab)

    def stop(self, lab):
        """Record the final stats, stop the daemon (SIGTERM, then SIGKILL after 15 s)."""
        if self.proc is not None:
            self.final_stats = self.stats(lab)
            code = stop(self.proc, timeout=15)
            if code not in (0, -signal.SIGTERM):
                print(f"   note: pipesd in {self.host} exited with {code}; "
                      f"log: {_tail(self.log)}", flush=True)
            self.proc = None

    def info(self):
        return {"description": self.description, "host": self.host,
                "function": self.function, "params": self.params, "workers": self.workers}


class PipesdChain(Mode):
    """One pipesd per middlebox (the paper's Fig. 10/11: p1 and p2), the client steered
    through the function address of each in turn: SRH [hop 1, hop 2, ..., s].

    Each hop is a :class:`Pipesd` with its own ``host``. With xor K on both, s receives the
    client's bytes (and c the server's) unchanged, so any workload can cross the chain.
    """
    proxied = True

    def __init__(self, hops, name):
        self.hops = list(hops)
        self.hosts = tuple(hop.host for hop in self.hops)
        self.name = name
        self.description = ("client SRH [" + ", ".join(f"{hop.label()} @{hop.host}"
                                                       for hop in self.hops)
                            + f", s], pipesd --workers {self.hops[0].workers or 'per CPU'} in each")
        self.final_stats = None

    def setup(self, lab):
        for hop in self.hops:
            hop.start(lab)
        steer(lab, [hop.address(lab) for hop in self.hops])

    def check(self, lab):
        return check_functions(lab, self, self.hops)

    def teardown(self, lab):
        unsteer(lab)
        for hop in self.hops:
            hop.stop(lab)
        self.final_stats = {hop.host: hop.final_stats for hop in self.hops}

    def info(self):
        return {"description": self.description, "hops": [hop.info() for hop in self.hops]}


def check_functions(lab, mode, daemons):
    """check_http_path, and proof that each daemon's function (not another) carried the
    check's bulk transfer: its bytes_up counter grew by at least 90% of what blast sent.

    Together with the intact download this shows, e.g., that both hops of an xor chain
    XORed (one alone would have corrupted the file) and that xor-passes ran its passes
    rather than the identity splice.
    """
    before = [daemon.function_bytes_up(lab) for daemon in daemons]
    evidence = check_http_path(lab, mode)
    sent = evidence.get("blast_bytes") or 0
    for daemon, start in zip(daemons, before):
        moved = daemon.function_bytes_up(lab) - start
        evidence[f"{daemon.host}_function_bytes_up"] = {daemon.resolved().name: moved}
        if sent <= 0 or moved < 0.9 * sent:
            raise CheckFailed(f"{mode.name}: {daemon.resolved().name} in {daemon.host} moved "
                              f"{moved} bytes of the check's {sent}: the transfer did not "
                              f"take that function ({evidence})")
    return evidence


class PipesdXor(Pipesd):
    """pipesd's xor function with a real key: blast workloads only.

    XOR changes the bytes, so neither HTTP (wrk) nor iperf3 (its control connection
    exchanges JSON, each data connection starts with a cookie the server checks) can cross
    it. blast.py never looks at the payload. The check XORs an HTTP request in the client
    and un-XORs the reply: a "200" with the right body proves both directions were XORed.
    """

    def __init__(self, key=42, workers=2):
        super().__init__("xor", params=key, workers=workers)
        self.key = key

    def supports(self, workload):
        return workload.kind == "blast"

    def check(self, lab):
        return check_xor(lab, self, self.key)


class PipesdSavedSyn(Pipesd):
    """pipesd identity without the SYN queue: once it runs, its NFQUEUE rule is deleted, so
    no SYN crosses the capture process and every worker takes the SRH from the kernel's
    saved copy of the SYN (TCP_SAVED_SYN, the table-miss fallback; counted as
    ``saved_syn_fallbacks`` in its stats). Measures what the queue costs per connection.

    What this path cannot do (the capture can): SYN-cookie connections have no saved SYN
    (reset); the SYN's SRH must be the packet's first extension header (the worker locates
    its own segment in it); return-path TLV marks, HMAC checks and the TIME_WAIT retirement
    the capture does per SYN do not happen.
    """

    def __init__(self, workers=None):
        super().__init__("identity", workers=workers, name="pipesd-savedsyn")
        self.description += "; its NFQUEUE rule deleted (workers read TCP_SAVED_SYN)"

    def start(self, lab):
        super().start(lab)
        host = lab.tb.hosts[self.host]
        comment = kernelsetup.COMMENT_PREFIX + self.daemon_name
        for table in (kernelsetup.IP6TABLES_TABLE, *kernelsetup.IP6TABLES_OLD_TABLES):
            rules = host.run(["ip6tables-legacy-save", "-t", table], check=False).stdout
            for line in rules.splitlines():
                if line.startswith("-A ") and comment in line and "NFQUEUE" in line:
                    host.run([kernelsetup.IP6TABLES, *kernelsetup.IP6TABLES_WAIT, "-t", table,
                              "-D", *shlex.split(line)[1:]])
                    return
        raise ModeUnavailable(f"no NFQUEUE rule commented {comment} to delete")

    def check(self, lab):
        evidence = super().check(lab)
        worker = (self.stats(lab) or {}).get("totals", {}).get("worker", {})
        evidence["table_hits"] = worker.get("table_hits")
        if worker.get("table_hits"):
            raise CheckFailed(f"{self.name}: {worker['table_hits']} SYNs still went through "
                              "the capture")
        return evidence


def _next_hop(host, dst):
    """(gateway, interface) ``host`` uses towards ``dst``."""
    out = host.run(["ip", "-6", "route", "get", str(dst)]).stdout.split()
    return out[out.index("via") + 1], out[out.index("dev") + 1]


def stop(proc, timeout=10):
    """SIGTERM ``proc`` (one we started), SIGKILL it after ``timeout`` seconds."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _tail(path, lines=5):
    try:
        with open(path) as f:
            return " | ".join(f.read().strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def make_mode(name):
    modes = {
        "router": Router,
        "router-srh": RouterSRH,
        "haproxy": HAProxy,
        "pipesd-identity": lambda: Pipesd("identity"),
        "pipesd-xor": PipesdXor,
        "pipesd-savedsyn": PipesdSavedSyn,
    }
    if name not in modes:
        raise SystemExit(f"unknown mode {name!r}; known: {', '.join(modes)}")
    return modes[name]()


MODE_NAMES = ["router", "router-srh", "pipesd-identity", "pipesd-xor", "pipesd-savedsyn",
              "haproxy"]
DEFAULT_MODES = ["router", "pipesd-identity", "pipesd-xor", "haproxy"]
