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

from srv6pipes.lab import fuzz
from srv6pipes.lab.apps import Pipesd

from tests.e2e.e2ekit import (DOWNLOAD_PORT, download_block, identity_address, name_for,
                              roundtrip_ok, wait_for)

pytestmark = pytest.mark.e2e


class Download:
    """One client downloading `size` bytes from DOWNLOAD_PORT through P1, slowly enough to be
    cut mid-way. Records how it ended: 'complete', 'reset', or 'truncated' (a clean EOF
    before the end: what a client cannot tell from a complete file)."""

    def __init__(self, lab, tb, size, chunk=256 * 1024, pause=0.004):
        self.size = size
        self.outcome = None
        self.received = 0
        self.sock = lab.connect([identity_address(tb)], port=DOWNLOAD_PORT, timeout=30)
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
        # Slow enough (>= 2 s each) to be cut mid-way even on a loaded machine.
        downloads = [Download(lab, tb, 50 << 20, pause=0.01) for _ in range(8)]
        assert wait_for(lambda: sum(d.received > (2 << 20) for d in downloads) == 8, 20)
        # The worker carrying the most of them (SO_REUSEPORT may put all on one).
        busiest = max(proxy.stats()["workers"], key=lambda w: w.get("functions", {}).get(
            "identity", {}).get("flows_active", 0))
        victim = busiest["pid"]
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
        idle = lab.connect([identity_address(tb)])
        busy = lab.connect([identity_address(tb)])
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
        sock = lab.connect([identity_address(tb)])
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
        tb.steer("c", "s", [identity_address(tb)], port=80)
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
        sock = lab.connect([identity_address(tb)], port=CLOSE_PORT, source_port=port)
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


# -- 1. the control socket: no message stops the daemon -------------------------------------
def test_100k_random_and_mutated_control_messages_leave_the_daemon_serving(line):
    tb, lab = line
    proxy = Pipesd(tb.hosts["p1"], tb.locator("p1"), name_for("fuzz"), workers=2)
    try:
        pids = sorted(w["pid"] for w in proxy.stats()["workers"])
        rng = random.Random(20261202)
        replies = 0
        for batch in range(100):                 # 100 connections x 1,000 messages
            messages = [fuzz.control_message(rng) for _ in range(1000)]
            replies_got = fuzz.control_batch(tb.hosts["p1"], proxy.control, messages)
            assert len(replies_got) == len(messages), f"batch {batch}: {len(replies_got)} replies"
            for reply in replies_got:
                assert isinstance(reply, dict) and type(reply["ok"]) is bool, reply
                if not reply["ok"]:
                    assert isinstance(reply["error"], str) and reply["error"], reply
            replies += len(replies_got)
        assert replies == 100_000
        # An endless line is refused and its connection closed; the daemon goes on.
        with tb.hosts["p1"].enter():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(10)
            sock.connect(proxy.control)
            try:
                sock.sendall(b"x" * (1 << 20))
            except OSError:
                pass
            assert b"longer than" in sock.recv(4096)
        stats = proxy.stats()
        assert sorted(w["pid"] for w in stats["workers"]) == pids    # no worker replaced
        assert stats["control"]["refused"] > 50_000
        assert roundtrip_ok(lab, tb)
        assert proxy.proc.poll() is None
    finally:
        proxy.stop()


# -- 2. root runs no code and reads no key from files others control --------------------------
EVIL_MODULE = """\
import os
open(os.path.join(os.path.dirname(__file__), "ran"), "w").write("module code ran as root")
from srv6pipes.vfapi import Function
FUNCTIONS = [Function(0x666, "evil", lambda ctx, d, data, eof: data)]
"""


def as_nobody(host, command: str):
    """Runs a shell command in host as the unprivileged user nobody (setpriv)."""
    return host.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                     "sh", "-c", command], check=False)


def test_modules_and_keys_that_others_control_are_refused(line, trusted_path):
    import shutil

    tb, lab = line
    p1 = tb.hosts["p1"]
    proxy = Pipesd(p1, tb.locator("p1"), name_for("trust"), workers=1)
    shared = trusted_path / "shared"                  # like /tmp: anyone may write here
    shared.mkdir()
    shared.chmod(0o1777)
    try:
        # The attacker, nobody, drops a module into the shared folder.
        made = as_nobody(p1, f"cat > {shared}/evil.py <<'EOF'\n{EVIL_MODULE}EOF\n")
        assert made.returncode == 0, made.stderr
        # A module nobody owns in root's folder, and nobody's symlink to a root module.
        owned_by_nobody = trusted_path / "theirs.py"
        shutil.copy(shared / "evil.py", owned_by_nobody)
        os.chown(owned_by_nobody, 65534, 65534)
        good = trusted_path / "good.py"
        good.write_text(EVIL_MODULE.replace("0x666", "0x667").replace('"evil"', '"good"'))
        link = trusted_path / "link.py"
        link.symlink_to(good)
        os.chown(link, 65534, 65534, follow_symlinks=False)
        cases = {shared / "evil.py": f"{shared}: directory writable by group or others",
                 owned_by_nobody: "file not owned by root",
                 link: "symbolic link not owned by root",
                 "/tmp/evil.py": "/tmp: directory writable by group or others"}
        for path, reason in cases.items():
            result = proxy.ctl("load", str(path), check=False)
            assert result.returncode != 0 and "refused" in result.stderr, result.stderr
            assert reason in result.stderr, result.stderr
        assert not (shared / "ran").exists() and not (trusted_path / "ran").exists(), \
            "untrusted module code ran as root"
        # The same code where only root writes loads, from a pinned private copy.
        mine = trusted_path / "mine.py"
        shutil.copy(shared / "evil.py", mine)
        loaded = json.loads(proxy.ctl("load", str(mine)).stdout)
        assert len(loaded["sha256"]) == 64
        # A keyring reached through nobody's symlink in the shared folder stops the start.
        keys = trusted_path / "keyring"
        keys.write_text("1 " + "ab" * 32 + "\n")
        keys.chmod(0o600)
        assert as_nobody(p1, f"ln -s {keys} {shared}/keyring").returncode == 0
        from srv6pipes.lab.apps import LabError

        with pytest.raises(LabError, match="keyring refused"):
            Pipesd(p1, tb.locator("p1"), name_for("trustkeys"), workers=1,
                   extra=("--keyring", f"{shared}/keyring"))
    finally:
        proxy.stop()


# -- 8. the rare resets of short connections: the onward 4-tuple still closing ----------------
def reconnect_from(lab, tb, port, source_port):
    """One connection through P1 from C:source_port; returns the greeting (EOF read)."""
    from tests.e2e.e2ekit import read_to_eof

    sock = lab.connect([identity_address(tb)], port=port, source_port=source_port, timeout=10)
    return read_to_eof(sock)


def test_a_client_port_reused_while_the_server_leg_still_closes(line):
    """The cause of the rare resets: the client's leg ends when P1 has acknowledged its FIN,
    the server leg one round trip later. A client reusing its port at once found the
    onward 4-tuple still taken (EADDRNOTAVAIL) and was reset. Here S loses P1's FIN for a
    while (the server leg stays in LAST_ACK): the new flow waits for the tuple, then goes."""
    from tests.e2e.e2ekit import CLOSE_PORT

    tb, lab = line
    s = tb.hosts["s"]
    proxy = Pipesd(tb.hosts["p1"], tb.locator("p1"), name_for("reuse"), workers=1)
    try:
        assert reconnect_from(lab, tb, CLOSE_PORT, 31801).startswith(b"fd00")
        s.run("nft add table inet lossy; nft add chain inet lossy in "
              "'{ type filter hook input priority 0; }'; "
              f"nft add rule inet lossy in tcp dport {CLOSE_PORT} 'tcp flags & fin == fin' drop")
        # S closes first (greeting), C reads to EOF and closes: P1's FIN toward S is lost.
        assert reconnect_from(lab, tb, CLOSE_PORT, 31802).startswith(b"fd00")
        timer = threading.Timer(0.15, lambda: s.run("nft delete table inet lossy"))
        timer.start()
        try:
            assert reconnect_from(lab, tb, CLOSE_PORT, 31802).startswith(b"fd00")
        finally:
            timer.join()
        worker = proxy.stats()["totals"]["worker"]
        assert worker.get("onward_waited", 0) >= 1, worker
        assert worker.get("onward_failed", 0) == 0, worker
    finally:
        s.run("nft delete table inet lossy", check=False)
        proxy.stop()


# -- 5. a SYN flood does not keep legitimate clients out -----------------------------------------
def test_a_spoofed_syn_flood_leaves_legitimate_clients_in(line, tmp_path):
    """A small flood (the 20k SYN/s one is bench/run_flood.py): spoofed SYNs toward the
    function address overflow the listeners' SYN queues, the kernel answers with cookies,
    and the cookie program hands their ACKs to the listener. Garbage SRHs are dropped by
    the capture before they take a place in a SYN queue."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "bench"))
    from lab.flood import Flood, probe, spoofed_routes
    from srv6pipes.lab.apps import Lighttpd
    from srv6pipes.srh import SRH

    tb, lab = line
    www = tmp_path / "www"
    www.mkdir()
    (www / "1k").write_bytes(os.urandom(1024))
    server = Lighttpd(tb.hosts["s"], str(www), port=80, access_log=False)
    # A small SYN queue so that a small flood overflows it (the listen backlog is capped by
    # somaxconn), as 20k SYN/s overflow the default one.
    tb.hosts["p1"].run(["sysctl", "-qw", "net.core.somaxconn=64"])
    proxy = Pipesd(tb.hosts["p1"], tb.locator("p1"), name_for("flood"), workers=2)
    try:
        srh = SRH.from_path([identity_address(tb), tb.hosts["s"].addr]).to_bytes()
        with spoofed_routes(tb):
            flood = Flood(tb.hosts["c"], tb.hosts["s"].addr, 80, 3000, 6, [identity_address(tb)])
            time.sleep(1)
            result = probe(tb.hosts["c"], tb.hosts["s"].addr, 80, "/1k", 60, 0.07, srh)
            flood.wait()
        stats = proxy.stats()
        assert stats["kernel"]["syncookies_sent"] > 1000, stats["kernel"]   # it did flood
        assert result.success_ratio >= 0.95, result.summary()
        assert stats["kernel"]["syncookies_failed"] == 0
        # Cookie connections reached pipesd's listener (the tc program) and were relayed.
        assert stats["kernel"]["syncookies_recv"] >= 1
        assert stats["totals"]["worker"]["table_hits"] >= result.successes
    finally:
        proxy.stop()
        server.stop()
