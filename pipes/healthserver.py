"""``pipesctl serve-health``: a proxy's health, over HTTP, for the controller's probes.

Runs next to pipesd on each proxy host (its own process: the master only supervises).
``GET /health`` asks pipesd for its statistics on the control socket and answers::

    200 {"ok": true, "name": "p1", "locator": "fc00:1::/80", "active_flows": 12,
         "functions": {"encrypt": 10, "count": 2}}         (active flows per function)
    503 {"ok": false, "error": "cannot talk to pipesd on ...: ..."}

The controller counts a proxy down after ``probe_failures`` probes in a row that fail
(connection refused or timed out, a 503, a body it cannot read) and reads
``active_flows`` as the proxy's load. The endpoint is read-only and says nothing
secret; bind it to a management address all the same. Anything but ``GET /health`` is
404; a slow client is cut off after a few seconds (one thread per request).
"""
from __future__ import annotations

import http.server
import json
import logging
import socket
import socketserver

from .control import ControlError, request

log = logging.getLogger("srv6pipes.health")

REQUEST_TIMEOUT = 3.0


def health_report(control_path: str, timeout: float = 1.0) -> tuple[int, dict]:
    """(HTTP status, body) for one probe: pipesd's active flows, or why it is unhealthy."""
    try:
        stats = request(control_path, "stats", timeout=timeout)["stats"]
    except (ControlError, KeyError, TypeError) as exc:
        return 503, {"ok": False, "error": str(exc)}
    functions = {name: counters.get("flows_active", 0)
                 for name, counters in stats.get("totals", {}).get("functions", {}).items()}
    return 200, {"ok": True, "name": stats.get("name"), "locator": stats.get("locator"),
                 "active_flows": sum(functions.values()), "functions": functions}


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True


def make_server(host: str, port: int, control_path: str) -> http.server.HTTPServer:
    """The HTTP server bound to [host]:port (call serve_forever / shutdown)."""
    def report() -> tuple[int, dict]:
        return health_report(control_path)

    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT
        server_version = "srv6pipes-health"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path != "/health":
                self._reply(404, {"ok": False, "error": "GET /health only"})
                return
            self._reply(*report())

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body, sort_keys=True).encode() + b"\n"
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt: str, *args) -> None:
            log.debug("%s " + fmt, self.address_string(), *args)

    return _Server((host, port), Handler)


def add_arguments(parser) -> None:
    """The ``pipesctl serve-health`` flags (cli.py adds the subparser; the control socket
    is pipesctl's own --control)."""
    parser.add_argument("--listen", required=True, metavar="[ADDR]:PORT",
                        help="where the controller probes (a management address)")


def run(args) -> int:
    """Serves until SIGTERM/SIGINT. Returns the exit code."""
    import re
    import signal
    import sys
    import threading

    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})", args.listen)
    if not match or not 1 <= int(match.group(2)) <= 65535:
        print(f"pipesctl serve-health: --listen {args.listen!r}: expected [IPv6 address]:port "
              "(port 1-65535)", file=sys.stderr)
        return 2
    try:
        server = make_server(match.group(1), int(match.group(2)), args.control)
    except OSError as exc:
        print(f"pipesctl serve-health: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              daemon=True)
    thread.start()
    stop.wait()
    server.shutdown()
    server.server_close()
    return 0
