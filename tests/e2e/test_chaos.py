"""The chaos suite: each failure found by probing pipesd as an attacker and as bad luck would,
replayed through the real datapath (C - P1 - S, pipesd on P1), with the fixed behaviour
asserted. Bounded in time; the large floods and fuzz runs are benchmarks in bench/.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import threading
import time

import pytest

from srv6pipes import control
from srv6pipes.addressplan import AddressPlan
from srv6pipes.lab.apps import Pipesd

from tests.e2e.e2ekit import (DOWNLOAD_PORT, ECHO_PORT, EchoServer, Lab, download_block,
                              wait_for)

pytestmark = pytest.mark.e2e


@pytest.fixture
def line(testbed):
    tb = testbed(proxies=1)
    server = EchoServer(tb.hosts["s"])
    yield tb, Lab(tb, {}, server)
    server.close()


def identity(tb):
    return AddressPlan(tb.locator("p1")).encode(0)


def name_for(test: str) -> str:
    return f"{test}{os.getpid()}"


def roundtrip_ok(lab, tb, size=20_000) -> bool:
    payload = os.urandom(size)
    return lab.echo_roundtrip([identity(tb)], payload)[1] == payload


class Download:
    """One client downloading `size` bytes from DOWNLOAD_PORT through P1, slowly enough to be
    cut mid-way. Records how it ended: 'complete', 'reset', or 'truncated' (a clean EOF
    before the end: what a client cannot tell from a complete file)."""

    def __init__(self, lab, tb, size, chunk=256 * 1024, pause=0.004):
        self.size = size
        self.outcome = None
        self.received = 0
        self.sock = lab.connect([identity(tb)], port=DOWNLOAD_PORT, timeout=30)
        self.thread = threading.Thread(target=self.run, args=(chunk, pause), daemon=True)
        self.thread.start()

    def run(self, chunk, pause):
        block = download_block()
        try:
            self.sock.sendall(f"{self.size}\n".encode())
            while True:
                data = self.sock.recv(chunk)
                if not data:
                    break
                offset = self.received % len(block)
                expected = (block[offset:] + block)[:len(data)] if offset + len(data) > len(block) \
                    else block[offset:offset + len(data)]
                if data != expected:
                    self.outcome = "corrupted"
                    return
                self.received += len(data)
                time.sleep(pause)
            self.outcome = "complete" if self.received == self.size else "truncated"
        except ConnectionResetError:
            self.outcome = "reset"
        except OSError as exc:
            self.outcome = f"error {exc}"
        finally:
            self.sock.close()

    def wait(self, timeout=60):
        self.thread.join(timeout)
        return self.outcome


# -- 3. a killed worker: every client gets all bytes or a reset, never a clean short EOF ------
def test_a_killed_worker_resets_its_flows_it_never_truncates_them(line):
    tb, lab = line
    proxy = Pipesd(tb.hosts["p1"], tb.locator("p1"), name_for("kill"), workers=2)
    try:
        downloads = [Download(lab, tb, 50 << 20) for _ in range(8)]
        assert wait_for(lambda: sum(d.received > (2 << 20) for d in downloads) == 8, 20)
        victim = proxy.stats()["workers"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        outcomes = [d.wait() for d in downloads]
        assert "truncated" not in outcomes and "corrupted" not in outcomes, outcomes
        assert set(outcomes) <= {"complete", "reset"}, outcomes
        assert "reset" in outcomes, "no flow was on the killed worker: the test proved nothing"
        # The daemon replaced the worker and serves.
        assert wait_for(lambda: all(w["pid"] != victim and w["worker"]["pid"]
                                    for w in proxy.stats()["workers"]), 15)
        assert roundtrip_ok(lab, tb)
    finally:
        proxy.stop()


# -- 7. flows without an end: timeouts and keepalive --------------------------------------------
def test_idle_flows_end_after_the_client_timeout_and_sigterm_is_prompt(line):
    tb, lab = line
    proxy = Pipesd(tb.hosts["p1"], tb.locator("p1"), name_for("idle"), workers=1,
                   extra=("--timeout-client", "2", "--timeout-server", "2",
                          "--drain-timeout", "30"))
    try:
        idle = lab.connect([identity(tb)])
        busy = lab.connect([identity(tb)])
        header = b""
        while len(header) < 64:
            header += idle.recv(64 - len(header))
        for _ in range(8):                      # busy talks every 0.5 s, idle is silent
            busy.sendall(b"x")
            time.sleep(0.5)
        idle.settimeout(5)
        with pytest.raises(ConnectionResetError):
            idle.recv(10)
        totals = proxy.stats()["totals"]["functions"]["identity"]
        assert totals["timeouts_client"] + totals["timeouts_server"] == 1
        assert totals["flows_active"] == 1      # busy lives on
        busy.close()
        # SIGTERM: the remaining flows end by their timeouts, well before --drain-timeout.
        started = time.monotonic()
        assert proxy.stop(timeout=20) == 0
        assert time.monotonic() - started < 10
        idle.close()
    finally:
        proxy.stop()


def test_a_client_that_vanished_without_a_reset_is_found_by_keepalive(line):
    """The client host loses its socket and its RST never arrives (dropped here); the
    server keeps its side open. Keepalive probes go unanswered and end the flow."""
    tb, lab = line
    c = tb.hosts["c"]
    proxy = Pipesd(tb.hosts["p1"], tb.locator("p1"), name_for("ka"), workers=1,
                   extra=("--keepalive", "1,1,2", "--timeout-client", "0",
                          "--timeout-server", "0"))
    try:
        sock = lab.connect([identity(tb)])
        assert wait_for(lambda: proxy.stats()["totals"]["functions"]
                        .get("identity", {}).get("flows_active") == 1)
        # From now on C answers nothing: no RST for the socket it is about to lose, none
        # for keepalive probes.
        c.run("nft add table inet chaos; nft add chain inet chaos out "
              "'{ type filter hook output priority 0; }'; "
              "nft add rule inet chaos out tcp dport 9000 drop; "
              "nft add chain inet chaos in '{ type filter hook input priority 0; }'; "
              "nft add rule inet chaos in tcp sport 9000 drop")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        sock.close()
        assert wait_for(lambda: proxy.stats()["totals"]["functions"]["identity"]
                        ["flows_active"] == 0, 15), "the vanished client's flow stayed"
        assert proxy.stats()["totals"]["functions"]["identity"]["flows_reset"] == 1
    finally:
        c.run("nft delete table inet chaos", check=False)
        proxy.stop()


# -- 4. hitless reload --------------------------------------------------------------------------
def parse_wrk(output: str) -> dict:
    """Requests and every kind of error from wrk's summary."""
    import re

    result = {"requests": 0, "errors": 0, "non2xx": 0}
    match = re.search(r"(\d+) requests in", output)
    if match:
        result["requests"] = int(match[1])
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if match:
        result["errors"] = sum(int(x) for x in match.groups())
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if match:
        result["non2xx"] = int(match[1])
    return result


def test_five_reloads_under_load_fail_no_connection_and_corrupt_no_transfer(line, tmp_path):
    from srv6pipes.lab.apps import Lighttpd

    tb, lab = line
    config = tmp_path / "pipesd.toml"
    config.write_text("workers = 2\n")
    # Old workers drain their flows for up to --drain-timeout: long enough for the downloads.
    proxy = Pipesd(tb.hosts["p1"], tb.locator("p1"), name_for("hup"), workers=None,
                   extra=("--config", str(config), "--drain-timeout", "60"))
    www = tmp_path / "www"
    www.mkdir()
    (www / "1k").write_bytes(os.urandom(1024))
    server = Lighttpd(tb.hosts["s"], str(www), port=80, access_log=False)
    try:
        tb.steer("c", "s", [identity(tb)], port=80)
        downloads = [Download(lab, tb, 400 << 20, pause=0.008) for _ in range(2)]
        wrk = tb.hosts["c"].popen(["wrk", "-t2", "-c20", "-d10s", "-H", "Connection: close",
                                   f"http://[{tb.hosts['s'].addr}]/1k"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        generations = [proxy.stats()["generation"]]
        for _ in range(5):
            time.sleep(1.5)
            proxy.proc.send_signal(signal.SIGHUP)
            assert wait_for(lambda: proxy.stats()["generation"] > generations[-1], 10)
            generations.append(proxy.stats()["generation"])
        output, _ = wrk.communicate(timeout=30)
        result = parse_wrk(output)
        assert result["requests"] > 5000, output           # the load was real
        assert result["errors"] == 0 and result["non2xx"] == 0, output
        outcomes = [d.wait(120) for d in downloads]
        assert outcomes == ["complete", "complete"], outcomes
        assert generations == list(range(generations[0], generations[0] + 6))
        totals = proxy.stats()["totals"]["worker"]
        assert totals.get("malformed_srh", 0) == totals.get("no_srh", 0) == 0
    finally:
        server.stop()
        proxy.stop()


# -- 9. a stopped pipesd leaves no socket behind that black-holes routed traffic ---------------
def test_after_stop_routed_connections_from_the_same_client_port_work_at_once(line):
    from tests.e2e.e2ekit import CLOSE_PORT

    tb, lab = line
    proxy = Pipesd(tb.hosts["p1"], tb.locator("p1"), name_for("tw"), workers=1)
    ports = [31700 + i for i in range(5)]
    for port in ports:       # the server closes first: P1 holds the TIME_WAIT toward C
        sock = lab.connect([identity(tb)], port=CLOSE_PORT, source_port=port)
        while sock.recv(1024):
            pass
        sock.close()
    assert proxy.stop() == 0
    for port in ports:       # now plain routing through P1, same client ports
        started = time.monotonic()
        sock = lab.connect([], port=CLOSE_PORT, source_port=port, timeout=3)
        assert sock.recv(64), "no greeting"
        sock.close()
        assert time.monotonic() - started < 1.0
    assert "retired 5 TIME_WAIT sockets" in proxy.log()
