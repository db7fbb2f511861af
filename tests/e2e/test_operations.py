"""What an operator runs: `pipesd --check`, `pipesctl reload` across a kernel change with
traffic flowing, pipesctl's tables and its Prometheus output. One C - P1 - S testbed per
test."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from srv6pipes.lab.apps import Pipesd

from tests.e2e.e2ekit import (identity_address, kernel_state, name_for, read_to_eof,
                              wait_for)

pytestmark = pytest.mark.e2e

PIPESD = [sys.executable, "-m", "srv6pipes.cli"]
PIPESCTL = [sys.executable, "-c", "import sys; from srv6pipes.cli import pipesctl_main; "
            "sys.exit(pipesctl_main(sys.argv[1:]))"]


def syn_retransmissions(host) -> int:
    """The namespace's TcpExt TCPSynRetrans: SYNs a client had to send again."""
    lines = [line.split() for line in host.run(["cat", "/proc/net/netstat"]).stdout.splitlines()
             if line.startswith("TcpExt:")]
    return int(dict(zip(lines[0][1:], lines[1][1:]))["TCPSynRetrans"])


# -- pipesd --check -----------------------------------------------------------------------------
def test_check_passes_in_a_ready_namespace_and_changes_nothing(line):
    tb, _ = line
    p1 = tb.hosts["p1"]
    name = name_for("chk")
    before = kernel_state(p1, name)
    result = p1.run([*PIPESD, "--check", "--locator", str(tb.locator("p1")), "--name", name],
                    check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    for feature in ("seg6", "tproxy, socket match", "NFQUEUE", "SOCK_DESTROY",
                    "TCP port 7000 is free"):
        assert feature in result.stdout
    assert "ip -6 rule add fwmark" in result.stdout and "# pipesd would start" in result.stdout
    assert "FAIL" not in result.stdout
    assert kernel_state(p1, name) == before


def test_check_fails_on_what_would_stop_a_start(line, trusted_path):
    """A missing keyring, a taken port, a module that crashes while loading, another
    daemon on the control socket: one FAIL line each, exit 2, no traceback."""
    from srv6pipes.modules import module_path

    tb, _ = line
    p1 = tb.hosts["p1"]
    crashing = trusted_path / "crashing.py"
    crashing.write_text("import os\ndef init():\n    pass\nos.abort()\nFUNCTIONS = []\n")
    crashing.chmod(0o644)
    # From a root-only folder, wherever the checkout is (one under /tmp would be refused).
    caesar = shutil.copy(module_path("vf_caesar"), trusted_path)
    running = Pipesd(p1, tb.locator("p1"), name_for("chkrun"), workers=1)
    try:
        result = p1.run([*PIPESD, "--check", "--locator", str(tb.locator("p1")),
                         "--name", running.name, "--keyring", "/nonexistent/keyring",
                         "--modules", f"{crashing},{caesar}"], check=False)
    finally:
        running.stop()
    out = result.stdout
    assert result.returncode == 2, out + result.stderr
    assert "Traceback" not in out + result.stderr
    failures = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert any("--keyring" in line and "/nonexistent/keyring" in line for line in failures)
    assert any("--port 7000" in line for line in failures)
    assert any("crashing.py" in line and "crashed" in line for line in failures)
    assert any("another pipesd answers" in line for line in failures)
    assert any(line.startswith("ok   modules:") and "caesar" in line
               for line in out.splitlines())
    assert "pipesd would not start" in out


def test_dry_run_refuses_a_missing_keyring(line):
    tb, _ = line
    result = tb.hosts["p1"].run([*PIPESD, "--dry-run", "--locator", str(tb.locator("p1")),
                                 "--keyring", "/nonexistent"], check=False)
    assert result.returncode == 2 and "FAIL files: --keyring" in result.stdout


# -- reload: make-before-break ------------------------------------------------------------------
def test_reload_changing_kernel_settings_fails_no_connection(line, tmp_path):
    """`pipesctl reload` with a new fwmark, routing table and rule priority (three times,
    back and forth): the new rules
    are in place before the old ones go, so a long flow and a stream of new connections
    (one every few ms) see no failure, no client SYN is ever sent twice and every one of
    them is intercepted."""
    tb, lab = line
    p1, c = tb.hosts["p1"], tb.hosts["c"]
    config = tmp_path / "pipesd.toml"
    config.write_text("fwmark = 1\nroute_table = 100\nrule_priority = 100\n")
    name = name_for("mbb")
    before = kernel_state(p1, name)
    proxy = Pipesd(p1, tb.locator("p1"), name, workers=1, extra=("--config", str(config)))
    stop = threading.Event()
    outcomes: list[str] = []

    def stream():
        while not stop.is_set():
            try:
                payload = os.urandom(2000)
                outcomes.append("ok" if lab.echo_roundtrip([identity_address(tb)], payload,
                                                           timeout=10)[1] == payload
                                else "corrupt")
            except Exception as exc:  # noqa: BLE001 - every failure counts
                outcomes.append(repr(exc))

    try:
        flow = lab.connect([identity_address(tb)])
        header = b""
        while len(header) < 64:
            header += flow.recv(64 - len(header))
        flow.sendall(b"before;")
        retrans = syn_retransmissions(c)
        accepted = proxy.stats()["totals"]["worker"]["accepted"]
        threads = [threading.Thread(target=stream, daemon=True) for _ in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        # Back and forth: each reload is a chance for a gap to show.
        settings = [(0x40, 150), (1, 100), (0x40, 150)]
        for generation, (mark, table) in enumerate(settings, start=2):
            config.write_text(f"fwmark = {mark}\nroute_table = {table}\n"
                              f"rule_priority = {table}\n")
            reply = proxy.ctl("reload")
            assert json.loads(reply.stdout)["generation"] == generation
            other = 100 if table == 150 else 150

            def switched():
                rules = p1.run(["ip", "-6", "rule"]).stdout
                return f"lookup {table}" in rules and f"lookup {other}" not in rules
            assert wait_for(switched, 10), p1.run(["ip", "-6", "rule"]).stdout
            time.sleep(1.0)
        flow.sendall(b"after")
        flow.shutdown(socket.SHUT_WR)
        assert read_to_eof(flow) == b"before;after"
        stop.set()
        for thread in threads:
            thread.join(30)
        failures = [o for o in outcomes if o != "ok"]
        assert len(outcomes) > 50 and not failures, (len(outcomes), failures[:5])
        assert syn_retransmissions(c) == retrans
        # Every one went through pipesd: none slipped past while interception was off
        # (the kernel would then route it straight to S, the payload intact).
        assert proxy.stats()["totals"]["worker"]["accepted"] - accepted == len(outcomes)
        nft = p1.run(["nft", "list", "table", "inet", f"srv6pipes_{name}"]).stdout
        assert "0x00000040" in nft and "0x00000001" not in nft
    finally:
        stop.set()
        proxy.stop()
    assert kernel_state(p1, name) == before


def test_reload_with_a_bad_config_keeps_serving(line, tmp_path):
    tb, lab = line
    config = tmp_path / "pipesd.toml"
    config.write_text("queue_num = 0\n")
    proxy = Pipesd(tb.hosts["p1"], tb.locator("p1"), name_for("badrl"), workers=1,
                   extra=("--config", str(config)))
    try:
        config.write_text("queue_num = 70000\n")
        reply = proxy.ctl("reload", check=False)
        assert reply.returncode == 1
        assert "reload refused: queue_num (in" in reply.stderr and "0-65535" in reply.stderr
        config.write_text("route_table = 254\n")
        assert "must not be 254" in proxy.ctl("reload", check=False).stderr
        payload = os.urandom(10_000)
        assert lab.echo_roundtrip([identity_address(tb)], payload)[1] == payload
        assert proxy.stats()["generation"] == 1
    finally:
        proxy.stop()


# -- pipesctl output ----------------------------------------------------------------------------
def test_pipesctl_tables_json_and_prometheus_metrics(line):
    from prometheus_client.parser import text_string_to_metric_families

    tb, lab = line
    p1 = tb.hosts["p1"]
    proxy = Pipesd(p1, tb.locator("p1"), name_for("out"), workers=2)
    try:
        payload = os.urandom(30_000)
        assert lab.echo_roundtrip([identity_address(tb)], payload)[1] == payload
        ctl = [*PIPESCTL, "--name", proxy.name]
        table = p1.run([*ctl, "stats"]).stdout
        assert "functions" in table and "identity" in table and "bytes_up" in table
        assert not table.lstrip().startswith("{")
        functions = p1.run([*ctl, "functions"]).stdout.splitlines()
        assert functions[0].split() == ["id", "name", "module", "kind", "workers",
                                        "active_flows"]
        assert functions[1].split()[:3] == ["0", "identity", "builtin"]
        as_json = json.loads(p1.run([*ctl, "-j", "stats"]).stdout)
        assert as_json["totals"]["functions"]["identity"]["bytes_up"] >= len(payload)

        text = p1.run([*ctl, "metrics"]).stdout
        families = {f.name: f for f in text_string_to_metric_families(text)}
        up = [s for s in families["srv6pipes_function_bytes"].samples
              if s.labels == {"function": "identity", "direction": "up"}]
        assert up[0].name == "srv6pipes_function_bytes_total" and up[0].value >= len(payload)
        assert families["srv6pipes_accepted"].type == "counter"
        assert families["srv6pipes_accepted"].samples[0].value >= 1
        assert families["srv6pipes_workers"].type == "gauge"
        info = families["srv6pipes_info"].samples[0].labels
        assert info["name"] == proxy.name and info["locator"] == str(tb.locator("p1"))

        port = 9469
        server = p1.popen([*ctl, "serve-metrics", "--listen", f"[::1]:{port}"])
        try:
            scraped = wait_for(lambda: scrape(p1, f"http://[::1]:{port}/metrics"), 10)
            assert scraped and "srv6pipes_function_bytes_total" in scraped
        finally:
            server.terminate()
            server.wait(10)
    finally:
        proxy.stop()


def scrape(host, url: str):
    with host.enter():
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode()
        except OSError:
            return None


def test_pipesd_metrics_listen_serves_prometheus_and_follows_reloads(line, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    tb, lab = line
    p1 = tb.hosts["p1"]
    config = tmp_path / "pipesd.toml"
    config.write_text('metrics_listen = "[::1]:9470"\n')
    proxy = Pipesd(p1, tb.locator("p1"), name_for("mtr"), workers=1,
                   extra=("--config", str(config)))
    try:
        payload = os.urandom(20_000)
        assert lab.echo_roundtrip([identity_address(tb)], payload)[1] == payload
        text = wait_for(lambda: scrape(p1, "http://[::1]:9470/metrics"), 10)
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert families["srv6pipes_accepted"].samples[0].value >= 1
        title = p1.run(["ps", "-eo", "args"]).stdout
        assert f"pipesd: metrics [{proxy.name}]" in title
        config.write_text('metrics_listen = "[::1]:9471"\n')
        proxy.ctl("reload")
        assert wait_for(lambda: scrape(p1, "http://[::1]:9471/metrics"), 10)
        assert wait_for(lambda: scrape(p1, "http://[::1]:9470/metrics") is None, 10)
        config.write_text("")
        proxy.ctl("reload")
        assert wait_for(lambda: scrape(p1, "http://[::1]:9471/metrics") is None, 10)
        config.write_text('metrics_listen = "[::1]:9472"\n')
        proxy.ctl("reload")
        assert wait_for(lambda: scrape(p1, "http://[::1]:9472/metrics"), 10)
    finally:
        proxy.stop()
    assert scrape(p1, "http://[::1]:9470/metrics") is None
    assert scrape(p1, "http://[::1]:9472/metrics") is None   # the metrics child went too


def test_pipesctl_without_a_daemon_names_the_socket_and_the_hint(line):
    tb, _ = line
    result = subprocess.run([*PIPESCTL, "--name", "nosuchinstance", "stats"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "/nosuchinstance.sock" in result.stderr and "--name" in result.stderr
