#!/usr/bin/env python3
"""Control-plane numbers on the campus testbed (a benchmark, not a test): run it under the
exclusive lock of COORDINATION-style shared machines, as root.

    python bench/run_control.py               # ~5 minutes
    python bench/run_control.py --quick       # shorter runs, fewer repetitions

1. DNS: lookups answered per second for a binding that is already installed (the path a
   client's repeated lookups take), closed loop with WINDOW queries in flight from c1, and
   latency p50/p99 at that rate and at half of it (open loop, paced). Twice: the same
   question repeated (the controller's answer cache), and every question in another
   letter case (0x20: the whole path, parse to answer). Load generator on CPU 0,
   controller on CPU 1.
2. Failover: the proxy carrying a binding is killed (SIGKILL of its pipesd, a crash);
   time until the first new connection from the unchanged client succeeds through the
   other proxy (attempts every 10 ms, 300 ms connect timeout), and the controller's own
   detect -> installed-at-the-router time. Probes every 0.2 s, 2 failures = down.
3. End.B6 per connection: wrk, one 1 KB request per connection (Connection: close), from
   c1 to lighttpd on s through pipesd identity on p3, steered by (a) a plain seg6 inline
   route [p3], (b) a binding [BSID] expanded by End.B6 at a1 without HMAC, (c) the same
   signed with HMAC and p3 started with --require-hmac. Also p3's capture CPU per SYN
   (utime + stime of the capture process over the SYNs it saw).

Results are printed and written to bench/results/control-<timestamp>.json.
"""
import argparse
import datetime
import ipaddress
import json
import os
import pathlib
import random
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from srv6pipes.addressplan import AddressPlan  # noqa: E402
from srv6pipes.agent.kernel import BindingKernel  # noqa: E402
from srv6pipes.controller import dnsquery  # noqa: E402
from srv6pipes.controller.messages import Binding  # noqa: E402
from srv6pipes.lab.apps import Lighttpd, Pipesd  # noqa: E402
from srv6pipes.lab.campus import ROUTERS, CampusLab  # noqa: E402
from srv6pipes.lab.testbed import Testbed  # noqa: E402

RESULTS = os.path.join(HERE, "results")
WINDOW = 32
NAME = "www.campus.lab"
CLIENT_CPU, SERVER_CPU = 0, 1


def pin(pid: int, cpu: int) -> None:
    subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(pid)], capture_output=True)


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else None


# -- 1. DNS --------------------------------------------------------------------------------

class CaseVariants:
    """The query with its name in another letter case each time (DNS 0x20, 2^20 of them
    before one repeats): the same question to the controller's logic, never the same
    bytes for its answer cache."""

    def __init__(self, wire: bytes):
        self.wire = wire
        self.letters = [i for i in range(12, len(wire) - 4) if 97 <= wire[i] <= 122][:20]
        self.count = 0

    def __call__(self) -> bytes:
        self.count += 1
        data = bytearray(self.wire)
        for bit, at in enumerate(self.letters):
            if self.count >> bit & 1:
                data[at] -= 32
        return bytes(data)


def dns_load(host, server, next_wire, seconds: float, rate: float | None):
    """From ``host``: queries (fresh ids, bytes from ``next_wire()``) for ``seconds``;
    closed loop with WINDOW in flight (rate None) or paced at ``rate``/s. Returns
    (answered/s, latencies)."""
    os.sched_setaffinity(0, {CLIENT_CPU})
    with host.enter():
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.connect(server)
    sock.setblocking(False)
    sent: dict[int, float] = {}
    latencies = []
    next_id = random.randrange(65536)
    start = time.perf_counter()
    end = start + seconds
    interval = 1.0 / rate if rate else 0.0
    next_send = start
    import select
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        can_send = len(sent) < WINDOW if rate is None else now >= next_send
        if can_send:
            next_id = (next_id + 1) & 0xFFFF
            try:
                sock.send(struct.pack("!H", next_id) + next_wire()[2:])
                sent[next_id] = now
            except BlockingIOError:
                pass
            next_send += interval
        timeout = 0 if (rate is None and len(sent) < WINDOW) else \
            max(0, min(10, (next_send - time.perf_counter()) * 1000)) if rate else 10
        for _ in poller.poll(timeout):
            while True:
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    break
                sent_at = sent.pop(struct.unpack("!H", data[:2])[0], None)
                if sent_at is not None:
                    latencies.append(time.perf_counter() - sent_at)
        # Queries unanswered for a second are lost (dropped by the rate limit?): forget them.
        if len(sent) >= WINDOW and rate is None:
            stale = [i for i, t in sent.items() if now - t > 1.0]
            for i in stale:
                sent.pop(i)
    elapsed = time.perf_counter() - start
    sock.close()
    os.sched_setaffinity(0, set(range(os.cpu_count())))
    return len(latencies) / elapsed, latencies


def bench_dns(tb, lab, seconds):
    wire = dnsquery.make_query(NAME, ["encrypt", "decrypt"]).to_wire()
    lab.dig("c1", f"encrypt.decrypt._pipes.{NAME}")          # the binding exists from here
    pin(lab.controller.proc.pid, SERVER_CPU)
    ms = lambda v: round(v * 1000, 3)  # noqa: E731
    result = {"window": WINDOW}
    # "repeat": one client asking the same question (the answer cache); "0x20": every
    # query's name in another letter case, so each one goes through the whole logic.
    for label, next_wire in (("repeat", lambda: wire), ("0x20", CaseVariants(wire))):
        rate, latencies = dns_load(tb.hosts["c1"], lab.dns, next_wire, seconds, None)
        half, half_latencies = dns_load(tb.hosts["c1"], lab.dns, next_wire, seconds, rate / 2)
        result[label] = {
            "answered_per_s": round(rate), "p50_ms": ms(percentile(latencies, 50)),
            "p99_ms": ms(percentile(latencies, 99)), "half_rate_per_s": round(half),
            "half_rate_p50_ms": ms(percentile(half_latencies, 50)),
            "half_rate_p99_ms": ms(percentile(half_latencies, 99))}
    stats = lab.controller_stats()
    result.update(controller_counters=stats["counters"], dns_counters=stats["dns"])
    return result


# -- 2. failover -----------------------------------------------------------------------------

def echo_once(host, s_addr, bsid_srh: bytes, mss: int, timeout: float) -> bool:
    with host.enter():
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, 57, bsid_srh)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        sock.settimeout(timeout)
        sock.connect((s_addr, 9000))
        sock.sendall(b"ping")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        return data.endswith(b"ping")
    except OSError:
        return False
    finally:
        sock.close()


def bench_failover(tb, lab, repeats):
    from srv6pipes import client
    from tests.e2e.e2ekit import EchoServer

    echo = EchoServer(tb.hosts["s"])
    results = []
    try:
        with tb.hosts["c1"].enter():
            resolution = client.resolve(NAME, ["xor", "xor"], controller=lab.dns, use_cache=False)
        srh, mss = resolution.srh_bytes(), resolution.mss()
        s_addr = str(tb.hosts["s"].addr)
        for _ in range(repeats):
            assert echo_once(tb.hosts["c1"], s_addr, srh, mss, 2.0)
            binding = next(b for b in lab.controller_stats()["bindings"]
                           if b["bsid"] == str(resolution.bsid))
            victim = binding["proxies"][0]
            before = lab.proxies[{"p1": "p2", "p2": "p1"}[victim]].stats()["totals"][
                "functions"].get("xor", {}).get("flows_started", 0)
            killed = time.monotonic()
            lab.proxies[victim].proc.send_signal(signal.SIGKILL)
            lab.proxies[victim].proc.wait(5)
            # The crashed master's workers stop accepting within 0.2 s: only a success
            # counted by the other proxy is a failover.
            other = lab.proxies[{"p1": "p2", "p2": "p1"}[victim]]
            first_ok = None
            while time.monotonic() - killed < 20:
                attempt = time.monotonic()
                if echo_once(tb.hosts["c1"], s_addr, srh, mss, 0.3) and other.stats()["totals"][
                        "functions"].get("xor", {}).get("flows_started", 0) > before:
                    first_ok = time.monotonic()
                    break
                time.sleep(max(0.0, 0.01 - (time.monotonic() - attempt)))
            event = lab.controller_stats()["failovers"][-1]
            results.append({"victim": victim, "to_first_success_ms":
                            round((first_ok - killed) * 1000, 1) if first_ok else None,
                            "controller_detect_to_installed_ms": event["detect_to_installed_ms"]})
            lab.proxies[victim].log_file.close()
            lab.start_proxy_daemon(victim)
            deadline = time.monotonic() + 10
            while not lab.controller_stats()["proxies"][victim]["healthy"]:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{victim} not healthy again")
                time.sleep(0.1)
    finally:
        echo.close()
    times = [r["to_first_success_ms"] for r in results if r["to_first_success_ms"] is not None]
    return {"runs": results, "median_ms": statistics.median(times) if times else None,
            "min_ms": min(times, default=None), "max_ms": max(times, default=None),
            "probe_interval_s": 0.2, "probe_failures": 2}


# -- 3. End.B6 cost per connection --------------------------------------------------------

def wrk(host, url, seconds):
    out = host.run(["taskset", "-c", str(CLIENT_CPU), "wrk", "-t", "1", "-c", "20",
                    "-d", f"{seconds}s", "-H", "Connection: close", url],
                   timeout=seconds + 30).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return float(match.group(1)) if match else 0.0, errors.group(1) if errors else ""


def capture_cpu(pipesd) -> float:
    """utime + stime (seconds) of pipesd's capture process."""
    pids = pipesd.host.run(["pgrep", "-f", f"pipesd: capture \\[{pipesd.name}\\]"],
                           check=False).stdout.split()
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def bench_end_b6(seconds, repeats, workdir):
    docroot = os.path.join(workdir, "www")
    os.makedirs(docroot, exist_ok=True)
    with open(os.path.join(docroot, "1k"), "wb") as handle:
        handle.write(os.urandom(1024))
    keyring = os.path.join(workdir, "hmac.keys")
    with open(os.open(keyring, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
        handle.write("".join(f"{k} {s}\n" for _, _, k, s in ROUTERS.values()))
    key_id, secret = ROUTERS["a1"][2], ROUTERS["a1"][3].encode()
    rows = {}
    with Testbed(topology="campus") as tb:
        c1, a1, p3, s = (tb.hosts[n] for n in ("c1", "a1", "p3", "s"))
        server = Lighttpd(s, docroot, access_log=False, prefix=("taskset", "-c", str(CLIENT_CPU)))
        p3f = AddressPlan(tb.locator("p3")).encode(0)
        bsid = ipaddress.IPv6Network(ROUTERS["a1"][1])[1]
        variants = [("plain seg6 route [p3]", "plain"),
                    ("End.B6 binding at a1", "binding"),
                    ("End.B6 binding at a1, HMAC, p3 --require-hmac", "binding-hmac")]
        url = f"http://[{s.addr}]/1k"
        try:
            for label, mode in variants:
                extra = ["--hmac-keyring", keyring, "--workers", "1"]
                if mode == "binding-hmac":
                    extra.append("--require-hmac")
                pipesd = Pipesd(p3, tb.locator("p3"), f"bench{os.getpid()}", workers=None,
                                extra=tuple(extra))
                kernel = None
                try:
                    for pid in p3.run(["pgrep", "-f", f"pipesd.*bench{os.getpid()}"]).stdout.split():
                        pin(int(pid), SERVER_CPU)
                    if mode == "plain":
                        tb.steer("c1", "s", [p3f], mtu=1400)
                    else:
                        with a1.enter():
                            kernel = BindingKernel(
                                "bench", ipaddress.IPv6Network(ROUTERS["a1"][1]), [],
                                (key_id, secret) if mode == "binding-hmac" else None,
                                state_dir=pathlib.Path(workdir))
                            kernel.start()
                            kernel.apply(Binding(bsid, (p3f,), s.addr,
                                                 (ipaddress.IPv6Network(ROUTERS["a1"][0]),)), 3600)
                        tb.steer("c1", "s", [bsid], mtu=1400)
                    samples, cpu = [], []
                    for _ in range(repeats):
                        syns = pipesd.stats()["srh_table"]["syn_seen"]
                        used = capture_cpu(pipesd)
                        rps, errors = wrk(c1, url, seconds)
                        syns = pipesd.stats()["srh_table"]["syn_seen"] - syns
                        samples.append(rps)
                        cpu.append((capture_cpu(pipesd) - used) / max(1, syns) * 1e6)
                    table = pipesd.stats()["srh_table"]
                    rows[label] = {"requests_per_s": round(statistics.median(samples)),
                                   "runs": [round(x) for x in samples],
                                   "capture_cpu_us_per_syn": round(statistics.median(cpu), 1),
                                   "stacked": table["stacked"], "hmac_refused": table["hmac_refused"],
                                   "wrk_errors": errors}
                finally:
                    tb.unsteer("c1", "s")
                    if kernel is not None:
                        with a1.enter():
                            kernel.stop()
                    pipesd.stop()
        finally:
            server.stop()
    base = rows["plain seg6 route [p3]"]["requests_per_s"]
    for row in rows.values():
        row["x_plain"] = round(row["requests_per_s"] / base, 3) if base else None
        if row["requests_per_s"]:
            row["us_per_connection"] = round(1e6 / row["requests_per_s"], 1)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["dns", "failover", "endb6"], action="append")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (network namespaces)", file=sys.stderr)
        return 2
    seconds, repeats = (3, 2) if args.quick else (5, 5)
    only = set(args.only or ["dns", "failover", "endb6"])
    workdir = tempfile.mkdtemp(prefix="sp-bench-control-")
    result = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": f"{os.cpu_count()} CPUs, {os.uname().release}"}
    if only & {"dns", "failover"}:
        with Testbed(topology="campus") as tb:
            lab = CampusLab(tb, workdir, "bench")
            try:
                lab.start()
                if "dns" in only:
                    result["dns"] = bench_dns(tb, lab, seconds * 2)
                    print(json.dumps(result["dns"], indent=1))
                if "failover" in only:
                    result["failover"] = bench_failover(tb, lab, repeats)
                    print(json.dumps(result["failover"], indent=1))
            finally:
                lab.stop()
    if "endb6" in only:
        result["end_b6"] = bench_end_b6(seconds, 3 if not args.quick else 1, workdir)
        print(json.dumps(result["end_b6"], indent=1))
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"control-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    with open(path, "w") as handle:
        json.dump(result, handle, indent=1)
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
