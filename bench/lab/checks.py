"""Before a mode is measured: prove the traffic takes the mode's path and arrives right.

A benchmark that silently measured the router while claiming to measure a proxy (a TPROXY
rule that does not match, a seg6 route that is not used) would be worse than none.
"""
import json
import subprocess
import sys
import time

from .servers import BLAST, BLAST_PORT, HTTP_PORT


class CheckFailed(RuntimeError):
    """The mode does not do what it claims; its numbers would be meaningless."""


def check_http_path(lab, mode, attempts=2):
    """:func:`path_evidence`, retried once after a pause (a stray failure is not a verdict)."""
    for attempt in range(attempts):
        try:
            return path_evidence(lab, mode)
        except CheckFailed:
            if attempt + 1 == attempts:
                raise
            time.sleep(2)


def path_evidence(lab, mode):
    """The 100 KB file arrives intact, and each middlebox proxies (or only forwards) a
    bulk transfer.

    During a 2-second blast transfer (a sender that keeps its connection busy; a download
    could already sit whole in socket buffers), every host of ``mode.hosts`` (p1, or p1 and
    p2 for a chain) must hold an established TCP connection on the blast port when
    ``mode.proxied``, and none while forwarding packets when not.
    Returns the evidence as a dict (``blast_bytes``: what the transfer delivered).
    """
    c, s = lab.tb.hosts["c"], lab.tb.hosts["s"]
    boxes = [lab.tb.hosts[name] for name in mode.hosts]
    res = c.run(["sh", "-c", f"curl -sS --max-time 5 {lab.servers.url('100KB')} | sha256sum"],
                check=False, timeout=15)
    got = res.stdout.split()[0] if res.stdout.split() else ""
    if got != lab.servers.sha256["100KB"]:
        raise CheckFailed(f"{mode.name}: 100KB download corrupted or failed "
                          f"({res.stderr.strip()[-200:]})")
    forwarded_before = [ip6_forwarded(box) for box in boxes]
    bulk = c.popen([sys.executable, BLAST, "send", str(s.addr), str(BLAST_PORT), "2", "1"],
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    n_sockets = [len(box.run(["ss", "-Htn", "state", "established",
                              f"( sport = :{BLAST_PORT} or dport = :{BLAST_PORT} )"]
                             ).stdout.strip().splitlines()) for box in boxes]
    try:
        out, err = bulk.communicate(timeout=40)
    except subprocess.TimeoutExpired:
        bulk.kill()
        out, err = bulk.communicate()
    forwarded = [ip6_forwarded(box) - before for box, before in zip(boxes, forwarded_before)]
    evidence = {"sha256_100KB_ok": True}
    for box, n, fwd in zip(mode.hosts, n_sockets, forwarded):
        evidence[f"{box}_established_blast"] = n
        evidence[f"{box}_forwarded_packets"] = fwd
    evidence["blast"] = out.strip()[-200:] or err.strip()[-200:]
    try:
        evidence["blast_bytes"] = json.loads(out.strip().splitlines()[-1])["bytes"]
    except (ValueError, IndexError, KeyError, TypeError):
        evidence["blast_bytes"] = None
    if bulk.returncode != 0:
        raise CheckFailed(f"{mode.name}: bulk transfer failed ({evidence})")
    for box, n, fwd in zip(mode.hosts, n_sockets, forwarded):
        if mode.proxied and n < 1:
            raise CheckFailed(f"{mode.name}: {box} holds no TCP connection during a bulk "
                              f"transfer: traffic is not proxied there ({evidence})")
        if not mode.proxied and (n or fwd < 100):
            raise CheckFailed(f"{mode.name}: {box} does not just forward ({evidence})")
    return evidence


def ip6_forwarded(host):
    """The host's Ip6OutForwDatagrams counter."""
    for line in host.run(["cat", "/proc/net/snmp6"]).stdout.splitlines():
        if line.startswith("Ip6OutForwDatagrams"):
            return int(line.split()[1])
    return 0


XOR_PROBE = r"""
import hashlib, socket, sys
dst, port, key = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
req = b"GET /1KB HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n"
s = socket.create_connection((dst, port), timeout=5)
s.sendall(bytes(b ^ key for b in req))
data = b""
while chunk := s.recv(65536):
    data += chunk
data = bytes(b ^ key for b in data)
head, _, body = data.partition(b"\r\n\r\n")
print(head.split(b"\r\n")[0].decode(errors="replace"), hashlib.sha256(body).hexdigest())
"""


def check_xor(lab, mode, key):
    """XOR an HTTP request with ``key`` in c, let p1 XOR it back, un-XOR the reply.

    The reply is "200" with the right body only if p1 XORed both directions with ``key``.
    """
    s = lab.tb.hosts["s"]
    res = lab.tb.hosts["c"].run([sys.executable, "-c", XOR_PROBE, str(s.addr), str(HTTP_PORT),
                                 str(key)], check=False, timeout=20)
    out = res.stdout.split()
    if not (len(out) >= 3 and out[1] == "200" and out[-1] == lab.servers.sha256["1KB"]):
        raise CheckFailed(f"{mode.name}: xor {key} probe failed: {res.stdout.strip()[:200]} "
                          f"{res.stderr.strip()[-300:]}")
    return {"xor_key": key, "status_line_after_unxor": " ".join(out[:3]), "body_sha256_ok": True}


def cpu_busy(seconds=0.5):
    """Fraction of all CPUs busy over ``seconds`` (from /proc/stat)."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)      # idle + iowait, total
    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def wait_quiet(limit=0.15, patience=30.0):
    """Wait (up to ``patience`` s) until the machine is idle before load runs.

    The lab shares 2 cores with whatever else runs on the machine; a busy core during a
    run is charged to whichever mode happens to be measured. Returns the last sample.
    """
    deadline = time.monotonic() + patience
    busy = cpu_busy()
    while busy > limit and time.monotonic() < deadline:
        busy = cpu_busy(1.0)
    if busy > limit:
        print(f"   WARNING: {busy:.0%} of the CPUs busy before measuring (others' load)",
              flush=True)
    return busy
