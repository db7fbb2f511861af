"""Prometheus exposition of a pipesd's counters (`pipesctl metrics`).

Built from the reply of the control socket's `stats` request (commands.py: shared memory
only for the counters, so a scrape never disturbs a worker) with prometheus_client's
registry and text format. Names follow Prometheus conventions: the `srv6pipes_` prefix,
`_total` on counters, base units (`_bytes`, `_seconds`), one metric per meaning with labels
for its dimensions (`function`, `direction`), never a label per worker process (pids come
and go with every reload).

    pipesctl --name edge metrics > /var/lib/node_exporter/textfile/pipesd_edge.prom

is enough for node_exporter's textfile collector; `pipesd --metrics-listen [::1]:9469` (a
child process of the master, master.spawn_metrics) or `pipesctl serve-metrics --listen
[::1]:9469` serve the same text over HTTP for Prometheus to scrape (`serve`): each scrape is
one `stats` request to the control socket.
"""
from __future__ import annotations

import http.server
import socket
import socketserver
from typing import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

PREFIX = "srv6pipes"

# stats.WORKER_COUNTERS summed over every worker, old generations included.
WORKER_HELP = {
    "accepted": "Connections accepted by the transparent listeners",
    "table_hits": "Accepted connections whose SRH was found in the SRH table",
    "table_misses": "Accepted connections whose SRH was not in the SRH table",
    "saved_syn_fallbacks": "Table misses recovered from TCP_SAVED_SYN",
    "no_srh": "Connections reset: no SRH anywhere (SYN cookie, or sent without one)",
    "malformed_srh": "Connections reset: malformed SRH",
    "too_many_segments": "Connections reset: more segments than --max-segments",
    "not_our_segment": "Connections reset: active segment outside the locator",
    "unknown_function": "Connections reset: the function address names no loaded function",
    "onward_failed": "Onward sockets that could not be created, bound or connected",
    "onward_waited": "Onward connections that waited for the previous one to close",
    "accept_errors": "accept() errors",
    "fd_exhausted": "EMFILE/ENFILE on accept or on the onward socket",
    "hmac_refused": "Saved-SYN fallbacks refused: SRH HMAC missing or wrong",
}
# _relay.FUNCTION_COUNTERS, per function. bytes_up/bytes_down become one metric with a
# direction label; flows_active is a gauge.
FUNCTION_HELP = {
    "flows_started": "Flows started",
    "flows_closed": "Flows closed cleanly",
    "flows_reset": "Flows reset",
    "connect_failed": "Flows whose onward connection failed",
    "splice_fallbacks": "Directions that could not get a pipe and stayed on buffers",
    "flows_rejected": "Flows refused (flow table full)",
    "vf_resets": "Flows the function asked to reset (e.g. a DPI block)",
    "vf_errors": "Function failures (exception, error status, broken contract)",
    "splice_switches": "Identity directions moved from buffers to splice",
    "timeouts_connect": "Onward connects that timed out (also in connect_failed)",
    "timeouts_client": "Flows reset for client-side inactivity",
    "timeouts_server": "Flows reset for server-side inactivity",
}
SRH_TABLE_GAUGES = {"nslots": "Slots of the SRH table", "used": "Live entries of the SRH table"}
SRH_TABLE_SKIP = {"ttl_ms"}


def families(stats: dict) -> Iterator[Metric]:
    """The metric families for one `stats` reply."""
    info = GaugeMetricFamily(f"{PREFIX}_info", "pipesd instance (value 1)",
                             labels=["name", "version", "locator"])
    info.add_metric([stats.get("name", ""), stats.get("version", ""),
                     stats.get("locator", "")], 1)
    yield info
    yield GaugeMetricFamily(f"{PREFIX}_uptime_seconds", "Seconds since the master started",
                            value=stats.get("uptime_s", 0))
    yield GaugeMetricFamily(f"{PREFIX}_generation", "Worker generation (one more per reload)",
                            value=stats.get("generation", 0))
    workers = stats.get("workers", [])
    live = GaugeMetricFamily(f"{PREFIX}_workers", "Worker processes", labels=["state"])
    live.add_metric(["serving"], sum(1 for w in workers if not w.get("draining")))
    live.add_metric(["draining"], sum(1 for w in workers if w.get("draining")))
    yield live

    totals = stats.get("totals", {})
    for counter, value in sorted(totals.get("worker", {}).items()):
        yield CounterMetricFamily(f"{PREFIX}_{counter}", WORKER_HELP.get(counter, counter),
                                  value=value)

    functions = totals.get("functions", {})
    names = sorted(functions)
    active = GaugeMetricFamily(f"{PREFIX}_function_flows_active", "Open flows",
                               labels=["function"])
    transferred = CounterMetricFamily(f"{PREFIX}_function_bytes",
                                      "Bytes relayed (up: client to server)",
                                      labels=["function", "direction"])
    per_counter = {counter: CounterMetricFamily(f"{PREFIX}_function_{counter}", text,
                                                labels=["function"])
                   for counter, text in FUNCTION_HELP.items()}
    for name in names:
        values = functions[name]
        active.add_metric([name], values.get("flows_active", 0))
        transferred.add_metric([name, "up"], values.get("bytes_up", 0))
        transferred.add_metric([name, "down"], values.get("bytes_down", 0))
        for counter, family in per_counter.items():
            family.add_metric([name], values.get(counter, 0))
    yield active
    yield transferred
    yield from per_counter.values()

    for key, value in sorted(stats.get("srh_table", {}).items()):
        if key in SRH_TABLE_SKIP:
            continue
        if key in SRH_TABLE_GAUGES:
            yield GaugeMetricFamily(f"{PREFIX}_srh_table_{key}", SRH_TABLE_GAUGES[key],
                                    value=value)
        else:
            yield CounterMetricFamily(f"{PREFIX}_capture_{key}",
                                      f"SYN capture and SRH table: {key}", value=value)
    for key, value in sorted(stats.get("kernel", {}).items()):
        if isinstance(value, (int, float)):
            yield CounterMetricFamily(f"{PREFIX}_kernel_{key}",
                                      f"Namespace TcpExt counter {key}", value=value)
    for key, value in sorted(stats.get("control", {}).items()):
        yield CounterMetricFamily(f"{PREFIX}_control_{key}", f"Control socket: {key}",
                                  value=value)


class _StatsCollector:
    def __init__(self, stats: dict):
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        return families(self.stats)


def exposition(stats: dict) -> bytes:
    """The Prometheus text format (version 0.0.4) of one `stats` reply."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(stats))
    return generate_latest(registry)


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def make_server(host: str, port: int, control_path: str) -> http.server.HTTPServer:
    """An HTTP server on [host]:port answering GET /metrics (and /) with `exposition` of
    the daemon's `stats`, 503 when the daemon does not answer. Raises OSError on bind."""
    from .control import ControlError, request

    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 10
        server_version = "srv6pipes-metrics"

        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            try:
                body = exposition(request(control_path, "stats", timeout=5.0)["stats"])
                status = 200
            except ControlError as exc:
                body, status = f"pipesd unreachable: {exc}\n".encode(), 503
            self.send_response(status)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *values):  # noqa: A002 - http.server's signature
            pass

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        address_family = socket.AF_INET6
        daemon_threads = True

    return Server((host, port), Handler)
