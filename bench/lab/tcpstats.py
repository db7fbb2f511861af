"""What TCP did in each host during a load run: the kernel's counters (what ``nstat``
shows) and a mid-run look at the connections (``ss -ti``).

Used by the lossy figures (Fig. 7 and 8) to explain their ratios: who retransmitted, how
(fast retransmit, loss probe, timeout), and each leg's RTT and congestion window. The
counters are per network namespace, so each host's are its own. Parsing is pure (unit
tested); reading runs ``cat``/``ss`` in the host.
"""
import re
import statistics

# The counters worth keeping per host and sample (the rest stays in the kernel).
COUNTERS = (
    "Tcp.ActiveOpens", "Tcp.PassiveOpens", "Tcp.InSegs", "Tcp.OutSegs", "Tcp.RetransSegs",
    "TcpExt.TCPFastRetrans", "TcpExt.TCPSlowStartRetrans", "TcpExt.TCPLossProbes",
    "TcpExt.TCPLossProbeRecovery", "TcpExt.TCPTimeouts", "TcpExt.TCPLostRetransmit",
    "TcpExt.TCPSackRecovery", "TcpExt.TCPDSACKRecv", "TcpExt.TCPDSACKOldSent",
    "TcpExt.TCPSpuriousRTOs", "TcpExt.TCPOFOQueue", "TcpExt.TCPRcvQDrop",
    "TcpExt.TCPRcvCollapsed", "TcpExt.TCPRcvPruned", "TcpExt.TCPBacklogDrop",
    "TcpExt.TCPAbortOnTimeout", "TcpExt.TCPSynRetrans",
)


def parse_counters(*texts):
    """``{"Tcp.RetransSegs": 12, ...}`` from the contents of /proc/net/snmp and
    /proc/net/netstat: each group is a header line and a value line with the same
    prefix (``Tcp: RtoAlgorithm ...`` then ``Tcp: 1 ...``)."""
    out = {}
    for text in texts:
        lines = text.splitlines()
        for names, values in zip(lines, lines[1:]):
            group, _, rest = names.partition(":")
            group2, _, numbers = values.partition(":")
            if group != group2 or not rest or rest.split()[0].lstrip("-").isdigit():
                continue
            if not numbers.split() or not numbers.split()[0].lstrip("-").isdigit():
                continue
            for name, value in zip(rest.split(), numbers.split()):
                out[f"{group}.{name}"] = int(value)
    return out


def read_counters(host):
    """The host's TCP counters now (see :func:`parse_counters`)."""
    res = host.run(["cat", "/proc/net/snmp", "/proc/net/netstat"], check=False)
    return parse_counters(res.stdout)


def delta(before, after, keys=COUNTERS):
    """``after - before`` for ``keys`` (counters only grow; a missing one counts as 0)."""
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys}


def retransmit_share(d):
    """Retransmitted segments per 100 sent (None without any), from a :func:`delta`."""
    sent = d.get("Tcp.OutSegs", 0)
    return 100.0 * d.get("Tcp.RetransSegs", 0) / sent if sent else None


_SS_FIELDS = {
    "rtt": re.compile(r"\brtt:([\d.]+)/([\d.]+)"),
    "cwnd": re.compile(r"\bcwnd:(\d+)"),
    "ssthresh": re.compile(r"\bssthresh:(\d+)"),
    "mss": re.compile(r"\bmss:(\d+)"),
    "retrans": re.compile(r"\bretrans:\d+/(\d+)"),
    "rcv_space": re.compile(r"\brcv_space:(\d+)"),
    "delivery_rate": re.compile(r"\bdelivery_rate ([\d.]+)([KMG]?)bps"),
    "unacked": re.compile(r"\bunacked:(\d+)"),
    "notsent": re.compile(r"\bnotsent:(\d+)"),
    "skmem_wmem_queued": re.compile(r"skmem:\(.*?\bw(\d+)"),
    "skmem_rmem_alloc": re.compile(r"skmem:\(r(\d+)"),
}
_SCALE = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}


def parse_ss(text):
    """The connections of ``ss -Htin`` output (``-m`` adds skmem): one dict per socket with
    ``local``, ``peer``, ``rtt_ms``, ``rttvar_ms``, ``cwnd``, ``ssthresh``, ``mss``,
    ``retrans`` (total), ``rcv_space``, ``delivery_rate`` (bit/s), ``unacked``,
    ``notsent``, ``wmem_queued``, ``rmem_alloc`` where ss printed them.

    Without -H ss prints a header line; with -i each socket takes two lines: the state line
    (``ESTAB 0 0 [local]:port [peer]:port``) and an indented line of details.
    """
    sockets = []
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if not line[0].isspace() and len(words) >= 5 and words[0] in ("ESTAB", "ESTABLISHED"):
            sockets.append({"local": words[3], "peer": words[4]})
            continue
        if line[0].isspace() and sockets:
            info = sockets[-1]
            for key, rx in _SS_FIELDS.items():
                m = rx.search(line)
                if not m:
                    continue
                if key == "rtt":
                    info["rtt_ms"], info["rttvar_ms"] = float(m.group(1)), float(m.group(2))
                elif key == "delivery_rate":
                    info[key] = float(m.group(1)) * _SCALE[m.group(2)]
                elif key.startswith("skmem_"):
                    info[key[len("skmem_"):]] = int(m.group(1))
                else:
                    info[key] = int(m.group(1))
    return sockets


def port_of(endpoint):
    """80 from ``[fd00:d::1]:80`` or ``fd00:d::1:80`` (ss prints both forms)."""
    return int(endpoint.rsplit(":", 1)[1]) if ":" in endpoint else None


def summarize_legs(sockets, server_port):
    """Per leg, the medians over its connections: ``to_server`` are the sockets whose peer
    port is ``server_port`` (this host connected to the server side), ``to_client`` those
    whose local port is (this host serves the client side; a transparent proxy's accepted
    sockets carry the server's port too). Returns {leg: {"connections": n, key: median}}."""
    legs = {"to_server": [], "to_client": []}
    for sock in sockets:
        if port_of(sock["peer"]) == server_port:
            legs["to_server"].append(sock)
        elif port_of(sock["local"]) == server_port:
            legs["to_client"].append(sock)
    out = {}
    for leg, socks in legs.items():
        if not socks:
            continue
        summary = {"connections": len(socks)}
        for key in ("rtt_ms", "cwnd", "ssthresh", "retrans", "rcv_space", "delivery_rate",
                    "unacked", "notsent", "wmem_queued", "rmem_alloc"):
            values = [s[key] for s in socks if key in s]
            if values:
                summary[key] = statistics.median(values)
        out[leg] = summary
    return out


def snapshot(host, server_port):
    """``ss -Htinm`` of the host's established connections to or from ``server_port``,
    summarized per leg (:func:`summarize_legs`)."""
    res = host.run(["ss", "-Htinm", "state", "established",
                    f"( sport = :{server_port} or dport = :{server_port} )"], check=False)
    # With a state filter ss leaves the state column out: put it back for parse_ss.
    lines = [("ESTAB " + l if l and not l[0].isspace() else l) for l in res.stdout.splitlines()]
    return summarize_legs(parse_ss("\n".join(lines)), server_port)
