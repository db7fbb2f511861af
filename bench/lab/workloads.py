"""Workloads, run from c against the servers in s, each bounded in time.

A workload is a name, a kind and its settings; ``run(lab)`` returns one sample: a dict
with the primary metric ``bits_per_second`` (what the ratios compare) and details.
"""
import json
import os
from dataclasses import dataclass, field

import sys

from .servers import BLAST, BLAST_PORT, IPERF_PORT

WRK_SCRIPT = """\
-- Print wrk's exact totals as JSON (its text summary rounds the byte count).
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"bytes":%d,"duration_us":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"latency_p50_us":%d,"latency_p99_us":%d}\\n',
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str                 # "iperf3" or "wrk"
    params: dict = field(default_factory=dict)

    def run(self, lab, duration):
        runner = {"iperf3": run_iperf3, "wrk": run_wrk, "blast": run_blast}[self.kind]
        return runner(lab, duration, **self.params)


def iperf3_workloads():
    return [Workload("iperf3-1stream", "iperf3", {"streams": 1}),
            Workload("iperf3-4streams", "iperf3", {"streams": 4})]


def blast_workloads():
    return [Workload("blast-1stream", "blast", {"streams": 1}),
            Workload("blast-4streams", "blast", {"streams": 4})]


def wrk_workloads():
    """Keep-alive runs first: the close runs leave thousands of TIME_WAIT sockets behind."""
    sizes = ("1KB", "100KB", "10MB")
    return ([Workload(f"wrk-{size}-keepalive", "wrk", {"file": size, "keepalive": True})
             for size in sizes]
            + [Workload(f"wrk-{size}-close", "wrk", {"file": size, "keepalive": False})
               for size in sizes])


def run_iperf3(lab, duration, streams):
    """iperf3 -c from c to s for ``duration`` seconds with ``streams`` parallel streams.

    Uses the receiver's count (sum_received): bytes that made it through the middlebox.
    """
    c, s = lab.tb.hosts["c"], lab.tb.hosts["s"]
    pin = lab.pinning.taskset(lab.pinning.client_cpus)
    res = c.run([*pin, "iperf3", "-c", str(s.addr), "-p", str(IPERF_PORT), "-t", str(duration),
                 "-P", str(streams), "-J", "--connect-timeout", "3000"],
                check=False, timeout=duration + 20)
    return parse_iperf3(res.stdout, res.stderr)


def parse_iperf3(stdout, stderr=""):
    """One sample from ``iperf3 -J`` output: the receiver's rate (bytes that made it
    through the middlebox), the sender's, retransmits and both ends' CPU. Raises
    WorkloadError on iperf3's own error or unreadable output."""
    try:
        report = json.loads(stdout)
    except json.JSONDecodeError:
        report = {"error": (stderr or stdout)[-500:]}
    if "error" in report:
        raise WorkloadError(f"iperf3 failed: {report['error']}")
    end = report["end"]
    return {
        "bits_per_second": end["sum_received"]["bits_per_second"],
        "sender_bits_per_second": end["sum_sent"]["bits_per_second"],
        "bytes": end["sum_received"].get("bytes"),
        "retransmits": end["sum_sent"].get("retransmits"),
        "client_cpu_percent": end["cpu_utilization_percent"]["host_total"],
        "server_cpu_percent": end["cpu_utilization_percent"]["remote_total"],
    }


def run_blast(lab, duration, streams):
    """blast.py from c to s: bulk TCP whose payload nobody checks (for byte-changing functions).

    Counts bytes written until the sink acknowledged the end of each stream (its EOF).
    """
    c, s = lab.tb.hosts["c"], lab.tb.hosts["s"]
    pin = lab.pinning.taskset(lab.pinning.client_cpus)
    res = c.run([*pin, sys.executable, BLAST, "send", str(s.addr), str(BLAST_PORT),
                 str(duration), str(streams)], check=False, timeout=duration + 40)
    return parse_blast(res.returncode, res.stdout, res.stderr)


def parse_blast(returncode, stdout, stderr=""):
    """One sample from ``blast.py send``: its last line of JSON. Raises WorkloadError when
    it printed none or a stream failed."""
    try:
        report = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise WorkloadError(f"blast failed (rc {returncode}): {stderr.strip()[-500:]}")
    if report["errors"]:
        raise WorkloadError(f"blast failed: {report['errors'][:3]}")
    return {"bits_per_second": report["bits_per_second"], "bytes": report["bytes"]}


def run_wrk(lab, duration, file, keepalive, threads=2, connections=50, timeout=5):
    """wrk from c: ``threads`` threads, ``connections`` connections, fetching ``file``.

    ``keepalive=False`` adds ``Connection: close``: one TCP connection per request, so the
    middlebox's per-connection work (two handshakes for a proxy) dominates small files.
    ``timeout`` (s): wrk counts a request older than this as a timeout error (it does not
    abort it); long lossy paths need more than the default.
    """
    c = lab.tb.hosts["c"]
    script = os.path.join(lab.workdir, "summary.lua")
    if not os.path.exists(script):
        with open(script, "w") as f:
            f.write(WRK_SCRIPT)
    pin = lab.pinning.taskset(lab.pinning.client_cpus)
    header = [] if keepalive else ["-H", "Connection: close"]
    res = c.run([*pin, "wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s",
                 "--timeout", f"{timeout}s", *header, "-s", script, lab.servers.url(file)],
                check=False, timeout=duration + 30)
    return parse_wrk(res.returncode, res.stdout, res.stderr)


def parse_wrk(returncode, stdout, stderr=""):
    """One sample from a wrk run: the ``WRKJSON`` line our done() hook prints.

    wrk counts every byte it reads (headers and partial bodies included), so
    ``bits_per_second`` is what crossed the path even when large files do not complete.
    Raises WorkloadError when wrk failed or printed no totals.
    """
    line = next((l for l in stdout.splitlines() if l.startswith("WRKJSON ")), None)
    if returncode != 0 or line is None:
        raise WorkloadError(f"wrk failed (rc {returncode}): {(stderr or stdout)[-500:]}")
    raw = json.loads(line.split(" ", 1)[1])
    seconds = raw["duration_us"] / 1e6
    if seconds <= 0:
        raise WorkloadError(f"wrk reported a duration of {raw['duration_us']} us")
    errors = {k: raw[k] for k in ("connect", "read", "write", "status", "timeout") if raw[k]}
    return {
        "bits_per_second": raw["bytes"] * 8 / seconds,
        "requests_per_second": raw["requests"] / seconds,
        "requests": raw["requests"],
        "bytes": raw["bytes"],
        "errors": errors,
        "latency_p50_ms": raw["latency_p50_us"] / 1000,
        "latency_p99_ms": raw["latency_p99_us"] / 1000,
    }


class WorkloadError(RuntimeError):
    """A load run produced no usable number."""
