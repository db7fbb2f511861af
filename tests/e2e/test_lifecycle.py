"""pipesd as a process: kernel state, crash recovery, supervision, reload, privileges,
resource limits. One fresh C - P1 - S testbed per test."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from srv6pipes import kernelsetup
from srv6pipes.lab.apps import Pipesd

from tests.e2e.e2ekit import (ECHO_PORT, connection_outcome, identity_address, kernel_state,
                              name_for, read_to_eof, roundtrip_ok, wait_for)

pytestmark = pytest.mark.e2e


def test_no_kernel_state_left_after_sigterm(line):
    tb, lab = line
    p1 = tb.hosts["p1"]
    name = name_for("term")
    before = kernel_state(p1, name)
    proxy = Pipesd(p1, tb.locator("p1"), name)
    during = kernel_state(p1, name)
    assert during["nft"] != before["nft"] and during["shm"] and during["control"]
    assert "NFQUEUE" in during["ip6tables"] + during["nft"]
    assert roundtrip_ok(lab, tb)
    assert proxy.stop(signal.SIGTERM) == 0
    assert kernel_state(p1, name) == before


def test_kill_9_then_restart_cleans_up_and_serves(line):
    tb, lab = line
    p1 = tb.hosts["p1"]
    name = name_for("crash")
    before = kernel_state(p1, name)
    first = Pipesd(p1, tb.locator("p1"), name)
    children = [w["pid"] for w in first.stats()["workers"]]
    first.proc.send_signal(signal.SIGKILL)
    first.stop()                                      # reaps it, closes its log
    # Children follow through their parent-death signal.
    assert wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in children))
    assert kernel_state(p1, name) != before           # the crash left state behind...
    second = Pipesd(p1, tb.locator("p1"), name)       # ...which the restart cleans up first
    assert roundtrip_ok(lab, tb)
    assert second.stop() == 0
    assert kernel_state(p1, name) == before


def test_dead_worker_is_replaced(line):
    tb, lab = line
    proxy = Pipesd(tb.hosts["p1"], tb.locator("p1"), name_for("respawn"))
    try:
        victim = proxy.stats()["workers"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        replaced = wait_for(lambda: [w["pid"] for w in proxy.stats()["workers"]
                                     if w["pid"] and w["pid"] != victim and w["index"] == 0], 15)
        assert replaced, "worker 0 was not restarted"
        assert len(proxy.stats()["workers"]) == 2
        assert all(roundtrip_ok(lab, tb) for _ in range(10))
    finally:
        proxy.stop()


def test_processes_are_named_pinned_and_unprivileged(line):
    tb, _ = line
    proxy = Pipesd(tb.hosts["p1"], tb.locator("p1"), name_for("priv"))
    try:
        workers = proxy.stats()["workers"]
        net_admin_raw = (1 << 12) | (1 << 13)
        cpus = set()
        for worker in workers:
            pid = worker["pid"]
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                assert handle.read().startswith(f"pipesd: worker {worker['index']}".encode())
            with open(f"/proc/{pid}/status") as handle:
                status = dict(line.split(":\t", 1) for line in handle if ":\t" in line)
            assert int(status["CapEff"], 16) == net_admin_raw
            assert int(status["CapPrm"], 16) == net_admin_raw
            cpus.add(status["Cpus_allowed_list"].strip())
        assert len(cpus) == min(len(workers), os.cpu_count())   # one CPU each
    finally:
        proxy.stop()


def capture_processes(name: str) -> dict[int, int]:
    """{capture index: pid} of pipesd instance `name`, from the process titles."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                title = handle.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        words = title.split()
        if words[:2] == ["pipesd:", "capture"] and title.endswith(f"[{name}]"):
            found[int(words[2])] = int(entry)
    return found


def queue_state(host) -> list[dict]:
    """The host namespace's NFQUEUE queues (/proc/net/netfilter/nfnetlink_queue): number,
    packets waiting for a verdict, packets ever queued."""
    text = host.run(["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
    return [{"queue": int(f[0]), "waiting": int(f[2]), "sequence": int(f[7])}
            for f in (line.split() for line in text.splitlines())]


def queue_sequences(host) -> dict[int, int]:
    """{queue number: packets ever queued to it} in the host's namespace."""
    return {q["queue"]: q["sequence"] for q in queue_state(host)}


def test_one_capture_per_cpu_reads_the_syns_its_cpu_receives(line):
    """With two workers, two captures: each pinned to its worker's CPU, with only
    CAP_NET_ADMIN, bound to its own queue; a SYN sent (so received: veth) on CPU k is
    queued to queue k modulo 2, the queue of the capture running on CPU k."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    tb, lab = line
    p1 = tb.hosts["p1"]
    name = name_for("fan")
    proxy = Pipesd(p1, tb.locator("p1"), name, workers=2, extra=("--queue-num", "4"))
    try:
        rules = p1.run(["ip6tables-legacy-save", "-t", kernelsetup.IP6TABLES_TABLE]).stdout
        assert "--queue-balance 4:5" in rules and "--queue-cpu-fanout" in rules
        captures = capture_processes(name)
        assert sorted(captures) == [0, 1]
        capture_cpus = {}
        for index, pid in captures.items():
            with open(f"/proc/{pid}/status") as handle:
                status = dict(line.split(":\t", 1) for line in handle if ":\t" in line)
            assert int(status["CapEff"], 16) == 1 << 12
            capture_cpus[index] = int(status["Cpus_allowed_list"])
        assert sorted(capture_cpus.values()) == cpus[:2]
        assert set(queue_sequences(p1)) == {4, 5}
        saved = os.sched_getaffinity(0)
        try:
            for cpu in cpus[:2]:
                before = queue_sequences(p1)
                os.sched_setaffinity(0, {cpu})   # this thread sends the SYN on `cpu`
                assert roundtrip_ok(lab, tb)
                os.sched_setaffinity(0, saved)
                after = queue_sequences(p1)
                grown = {q for q in after if after[q] > before[q]}
                assert grown == {4 + cpu % 2}, (cpu, before, after)
        finally:
            os.sched_setaffinity(0, saved)
        assert proxy.stats()["totals"]["worker"]["table_hits"] == 2
    finally:
        proxy.stop()


def test_queued_syns_are_accepted_in_batches(line):
    """SYNs that wait in the queue together get one accept verdict per batch (at most
    capture.VERDICT_BATCH SYNs each), and every one of them is then served."""
    from srv6pipes.capture import VERDICT_BATCH

    tb, lab = line
    p1 = tb.hosts["p1"]
    name = name_for("batch")
    proxy = Pipesd(p1, tb.locator("p1"), name, workers=1)
    sockets = []
    count = 3 * VERDICT_BATCH
    try:
        [capture_pid] = capture_processes(name).values()
        before = proxy.stats()["srh_table"]
        os.kill(capture_pid, signal.SIGSTOP)   # the SYNs pile up in the queue meanwhile
        try:
            for _ in range(count):
                sock = lab.client_socket([identity_address(tb)])
                sock.setblocking(False)
                sock.connect_ex((str(tb.hosts["s"].addr), ECHO_PORT))
                sockets.append(sock)
            assert wait_for(lambda: sum(q["waiting"] for q in queue_state(p1)) == count, 5)
        finally:
            os.kill(capture_pid, signal.SIGCONT)
        assert wait_for(lambda: all(connected(sock) for sock in sockets), 10)
        after = proxy.stats()["srh_table"]
        assert after["syn_seen"] - before["syn_seen"] == count
        batches = after["verdict_batches"] - before["verdict_batches"]
        assert count // VERDICT_BATCH <= batches < count // 4, batches
        assert wait_for(lambda: proxy.stats()["totals"]["worker"]["table_hits"] == count, 10)
    finally:
        for sock in sockets:
            sock.close()
        proxy.stop()


def connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


def test_sighup_reload_keeps_established_flows(line, tmp_path):
    tb, lab = line
    config = tmp_path / "pipesd.toml"
    config.write_text("workers = 2\n")
    proxy = Pipesd(tb.hosts["p1"], tb.locator("p1"), name_for("hup"), workers=None,
                   extra=("--config", str(config)))
    try:
        old = {w["pid"] for w in proxy.stats()["workers"]}
        sock = lab.connect([identity_address(tb)])
        header = b""
        while len(header) < 64:
            header += sock.recv(64 - len(header))
        sock.sendall(b"before reload;")
        config.write_text("workers = 1\n")
        proxy.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: [w for w in proxy.stats()["workers"]
                                 if not w["draining"] and w["pid"] not in old], 10)
        sock.sendall(b"after reload")
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == b"before reload;after reload"
        assert wait_for(lambda: len(proxy.stats()["workers"]) == 1, 15)
        assert roundtrip_ok(lab, tb)
    finally:
        proxy.stop()


def test_full_flow_table_resets_new_connections_and_recovers(line):
    tb, lab = line
    proxy = Pipesd(tb.hosts["p1"], tb.locator("p1"), name_for("full"),
                   workers=1, extra=("--max-flows", "5"))
    try:
        held = [lab.connect([identity_address(tb)]) for _ in range(5)]
        outcome = connection_outcome(
            lambda: lab.client_socket([identity_address(tb)]), (str(lab.s.addr), ECHO_PORT))
        assert outcome in ("reset", "eof")
        totals = proxy.stats()["totals"]["functions"]["identity"]
        assert totals["flows_rejected"] >= 1
        for sock in held:
            sock.close()
        assert wait_for(lambda: proxy.stats()["totals"]["functions"]["identity"]["flows_active"] == 0)
        assert roundtrip_ok(lab, tb)
    finally:
        proxy.stop()


def test_exhausted_file_descriptors_reset_and_recover(line):
    """A worker with few descriptors: excess connections are reset and counted, the
    daemon stays up and serves again once descriptors are free."""
    tb, lab = line
    p1 = tb.hosts["p1"]
    proxy = Pipesd(p1, tb.locator("p1"), name_for("nofd"), workers=1)
    worker = proxy.stats()["workers"][0]["pid"]
    try:
        subprocess.run(["prlimit", f"--pid={worker}", "--nofile=40:40"], check=True)
        held = []
        outcomes = []
        for _ in range(30):
            try:
                sock = lab.connect([identity_address(tb)], timeout=3)
                held.append(sock)
                sock.settimeout(3)
                outcomes.append("data" if sock.recv(64) else "eof")
            except (ConnectionResetError, TimeoutError, socket.timeout) as exc:
                outcomes.append(type(exc).__name__)
        assert outcomes.count("data") >= 3
        assert "ConnectionResetError" in outcomes
        worker_stats = proxy.stats()["totals"]
        assert (worker_stats["worker"]["fd_exhausted"]
                + worker_stats["functions"]["identity"]["splice_fallbacks"]) >= 1
        for sock in held:
            sock.close()
        assert wait_for(lambda: proxy.stats()["totals"]["functions"]["identity"]["flows_active"] == 0)
        assert proxy.stats()["workers"][0]["pid"] == worker      # still the same process
        assert roundtrip_ok(lab, tb)
    finally:
        for sock in locals().get("held", []):
            sock.close()
        proxy.stop()


def test_dry_run_prints_and_installs_nothing(line):
    tb, _ = line
    p1 = tb.hosts["p1"]
    before = kernel_state(p1, "dry")
    result = p1.run([sys.executable, "-m", "srv6pipes.cli", "--dry-run", "--locator",
                     str(tb.locator("p1")), "--name", "dry"])
    assert "tproxy" in result.stdout and "ip -6 rule add fwmark" in result.stdout
    assert "NFQUEUE" in result.stdout or "queue" in result.stdout
    assert kernel_state(p1, "dry") == before


def test_bad_command_line_is_a_clear_error(line):
    tb, _ = line
    result = tb.hosts["p1"].run([sys.executable, "-m", "srv6pipes.cli", "--locator",
                                 "fc00:1::1/80"], check=False)
    assert result.returncode == 2 and "--locator" in result.stderr


def test_pipesctl_address_and_functions(line):
    tb, _ = line
    pipesctl = [sys.executable, "-c", "import sys; from srv6pipes.cli import pipesctl_main;"
                " sys.exit(pipesctl_main(sys.argv[1:]))"]
    out = subprocess.run(pipesctl + ["address", "fc00:1::/80", "xor", "42"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "fc00:1::1:0:2a"
    out = subprocess.run(pipesctl + ["address", "fc00:1::/80", "0"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "fc00:1::"
    bad = subprocess.run(pipesctl + ["address", "fc00:1::/80", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "nope" in bad.stderr
    proxy = Pipesd(tb.hosts["p1"], tb.locator("p1"), name_for("fn"))
    try:
        functions = json.loads(proxy.ctl("functions").stdout)
        assert [(f["id"], f["name"]) for f in functions] == [
            (0, "identity"), (1, "xor"), (2, "xor-passes"), (3, "compress"), (4, "decompress"),
            (5, "encrypt"), (6, "decrypt"), (7, "dpi"), (8, "count")]
        assert all(f["workers"] == [0, 1] and f["module"] == "builtin" for f in functions)
    finally:
        proxy.stop()


def delete_queue_rule(host) -> None:
    """Takes the NFQUEUE rule away, as if the capture were bypassed."""
    import shlex

    rules = host.run(["ip6tables-legacy-save", "-t", kernelsetup.IP6TABLES_TABLE]).stdout
    spec = next(line for line in rules.splitlines() if "NFQUEUE" in line)
    host.run(["ip6tables-legacy", "-w", "10", "-t", kernelsetup.IP6TABLES_TABLE, "-D",
              *shlex.split(spec)[1:]])


def test_table_miss_falls_back_to_saved_syn(line):
    """With the NFQUEUE rule gone (queue bypassed), workers recover the SRH from
    TCP_SAVED_SYN and count the fallback."""
    tb, lab = line
    p1 = tb.hosts["p1"]
    proxy = Pipesd(p1, tb.locator("p1"), name_for("miss"))
    try:
        delete_queue_rule(p1)
        assert all(roundtrip_ok(lab, tb) for _ in range(5))
        worker = proxy.stats()["totals"]["worker"]
        assert worker["saved_syn_fallbacks"] == 5 and worker["table_misses"] == 5
    finally:
        proxy.stop()


def test_syn_cookie_connections_are_intercepted(line):
    """Every SYN answered with a cookie (tcp_syncookies=2): the BPF program hands the first
    ACK to the listener, which validates the cookie; the SRH is the one the capture recorded
    from the SYN, so the connection is proxied with the client's address kept. With
    --syn-cookies reset the kernel resets it, as it always did."""
    tb, lab = line
    p1 = tb.hosts["p1"]
    proxy = Pipesd(p1, tb.locator("p1"), name_for("cookie"))
    try:
        assert proxy.stats()["kernel"]["cookie_interception"] == "on"
        p1.run(["sysctl", "-qw", "net.ipv4.tcp_syncookies=2"])   # cookies for every SYN
        for _ in range(20):
            payload = os.urandom(5000)
            peer, echoed, local = lab.echo_roundtrip([identity_address(tb)], payload)
            assert echoed == payload and peer == local
        stats = proxy.stats()
        assert stats["kernel"]["syncookies_sent"] >= 20
        assert stats["kernel"]["syncookies_recv"] >= 20
        assert stats["kernel"]["syncookies_failed"] == 0
        assert stats["totals"]["worker"]["table_hits"] >= 20
    finally:
        p1.run(["sysctl", "-qw", "net.ipv4.tcp_syncookies=1"])
        proxy.stop()
    assert "srv6pipes" not in p1.run("tc filter show dev to-c ingress").stdout
    proxy = Pipesd(p1, tb.locator("p1"), name_for("nocookie"), extra=("--syn-cookies", "reset"))
    try:
        assert proxy.stats()["kernel"]["cookie_interception"].startswith("off")
        p1.run(["sysctl", "-qw", "net.ipv4.tcp_syncookies=2"])
        outcome = connection_outcome(lambda: lab.client_socket([identity_address(tb)]),
                                     (str(lab.s.addr), ECHO_PORT))
        assert outcome == "reset"
    finally:
        p1.run(["sysctl", "-qw", "net.ipv4.tcp_syncookies=1"])
        proxy.stop()


def test_sigterm_drains_established_flows(line):
    tb, lab = line
    proxy = Pipesd(tb.hosts["p1"], tb.locator("p1"), name_for("drain"))
    sock = lab.connect([identity_address(tb)])
    try:
        sock.sendall(b"first;")
        # The handshake completes in the kernel; wait until a worker has taken the flow
        # (a connection still in the accept queue is not established through pipesd).
        assert wait_for(lambda: proxy.stats()["totals"]["functions"]
                        .get("identity", {}).get("flows_active") == 1)
        proxy.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)                 # the daemon is draining, our flow must survive
        assert proxy.proc.poll() is None
        sock.sendall(b"second")
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock)[64:] == b"first;second"
        assert proxy.stop(timeout=10) == 0
    finally:
        sock.close()
        proxy.stop()


def test_workers_that_cannot_boot_stop_the_master_with_a_clear_error(line):
    """The port is taken by a listener without SO_REUSEPORT: every worker fails to boot;
    the master gives up (exit 1) instead of re-forking forever, and cleans up."""
    tb, _ = line
    p1 = tb.hosts["p1"]
    name = name_for("boot")
    before = kernel_state(p1, name)
    with p1.enter():
        squatter = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        squatter.bind(("::", 7000))
        squatter.listen(1)
        result = p1.run([sys.executable, "-m", "srv6pipes.cli", "--locator", str(tb.locator("p1")),
                         "--name", name, "--workers", "1"], check=False, timeout=60)
    finally:
        squatter.close()
    assert result.returncode == 1
    assert "failed to boot" in result.stderr and "Address already in use" in result.stderr
    assert kernel_state(p1, name) == before


def test_sighup_applies_new_kernel_settings_and_capture(line, tmp_path):
    """A reload that changes the queue number and the return mode reinstalls the kernel
    state and restarts the capture on the new queue; nothing of the old set-up is left."""
    tb, lab = line
    p1 = tb.hosts["p1"]
    config = tmp_path / "pipesd.toml"
    config.write_text("queue_num = 0\ncaptures = 2\n")
    name = name_for("hupk")
    before = kernel_state(p1, name)
    proxy = Pipesd(p1, tb.locator("p1"), name, extra=("--config", str(config)))
    try:
        assert roundtrip_ok(lab, tb)
        # Off-path return mode: one capture, so the two queues become one (queue 3).
        config.write_text('queue_num = 3\nreturn_mode = "reverse"\n')
        proxy.proc.send_signal(signal.SIGHUP)

        def reloaded():
            rules = p1.run(["ip6tables-legacy-save", "-t", kernelsetup.IP6TABLES_TABLE]).stdout
            routing = p1.run(["ip", "-6", "rule"]).stdout
            return ("--queue-num 3" in rules and "--queue-balance" not in rules
                    and "lookup main" in routing)
        assert wait_for(reloaded, 10)
        assert wait_for(lambda: sorted(capture_processes(name)) == [0], 10)
        hits = proxy.stats()["totals"]["worker"]["table_hits"]
        # The new capture binds queue 3 within its restart backoff; then SYNs hit the table.
        assert wait_for(lambda: roundtrip_ok(lab, tb) and
                        proxy.stats()["totals"]["worker"]["table_hits"] > hits, 15)
    finally:
        proxy.stop()
    assert kernel_state(p1, name) == before


def test_modules_and_function_files_given_at_start(line, trusted_path):
    """--modules loads into every worker; a bad keyring or pattern file stops the start with
    a clear message (and leaves no kernel state)."""
    from srv6pipes.lab.apps import LabError
    from srv6pipes.modules import module_path

    tb, lab = line
    keyring = trusted_path / "keyring"
    keyring.write_text("1 " + "ab" * 32 + "\n")
    keyring.chmod(0o644)  # others may read it: refused
    with pytest.raises(LabError, match="keyring"):
        Pipesd(tb.hosts["p1"], tb.locator("p1"), name_for("badkeys"),
               extra=("--keyring", str(keyring)))
    patterns = trusted_path / "patterns"
    patterns.write_text("x" * 300 + "\n")
    with pytest.raises(LabError, match="1 to 255 bytes"):
        Pipesd(tb.hosts["p1"], tb.locator("p1"), name_for("badpat"),
               extra=("--dpi-patterns", str(patterns)))
    assert kernel_state(tb.hosts["p1"], name_for("badpat"))["nft"] == ""
    # From a folder only root can write, wherever the checkout is (a clone under /tmp is
    # refused: /tmp is writable by all).
    caesar = shutil.copy(module_path("vf_caesar"), trusted_path)
    proxy = Pipesd(tb.hosts["p1"], tb.locator("p1"), name_for("mods"),
                   extra=("--modules", caesar))
    try:
        listed = {f["name"]: f for f in json.loads(proxy.ctl("functions").stdout)}
        assert listed["caesar"]["module"] == "vf_caesar"
        assert listed["caesar"]["workers"] == [0, 1]
        peer, echoed, local = lab.echo_roundtrip([lab.address("p1", "caesar", 0)], b"hi")
        assert echoed == b"hi"
    finally:
        proxy.stop()
