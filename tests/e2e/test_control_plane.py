"""The whole control plane on the campus testbed (pipes/lab/campus.py): pipes-controller
with its DNS front end on ctl, pipes-agent on the access routers a1 (staff) and a2
(students), pipesd + serve-health on p1, p2 (the failover pair) and p3, an echo server on
s. Real tools where a person would use them (dig), real sockets otherwise."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import sys
import time

import dns.message
import dns.rcode
import pytest

from srv6pipes import client, srhhmac
from srv6pipes.controller import dnsquery, messages
from srv6pipes.lab.campus import ROUTERS, CampusLab
from srv6pipes.lab import testbed
from srv6pipes.srh import SRH

from tests.e2e.e2ekit import ECHO_PORT, EchoServer, connection_outcome, kernel_snapshot, wait_for

pytestmark = pytest.mark.e2e

NAME = "www.campus.lab"
HOSTS = ("a1", "a2", "p1", "p2", "p3", "ctl", "c1", "c2")


@pytest.fixture(scope="module")
def lab(trusted_path_factory):
    if os.geteuid() != 0:
        pytest.skip("end-to-end tests build network namespaces: run as root")
    with testbed.Testbed(topology="campus") as tb:
        before = {name: kernel_snapshot(tb.hosts[name]) for name in HOSTS}
        workdir = str(trusted_path_factory.mktemp("campus"))
        campus = CampusLab(tb, workdir, f"cp{os.getpid() % 100000}")
        echo = EchoServer(tb.hosts["s"])
        try:
            campus.start()
            campus.echo = echo
            yield campus
        finally:
            echo.close()
            campus.stop()
        # Every component removed what it installed: routes, rules, nft tables, HMAC keys.
        for name in HOSTS:
            assert kernel_snapshot(tb.hosts[name]) == before[name], name
        for router in ROUTERS:
            assert tb.hosts[router].run(["ip", "sr", "hmac", "show"]).stdout.strip() == ""
        assert not [f for f in os.listdir("/run/srv6pipes") if campus.name in f]


def resolve(lab, host, chain, name=NAME):
    with lab.tb.hosts[host].enter():
        return client.resolve(name, chain, controller=lab.dns, use_cache=False)


def echo_via(lab, host, chain, payload=b"through the chain", timeout=10.0):
    """client.connect from ``host``; returns (peer the server saw, bytes echoed)."""
    with lab.tb.hosts[host].enter():
        sock = client.connect((NAME, ECHO_PORT), chain, controller=lab.dns, timeout=timeout)
    with sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = bytearray()
        while chunk := sock.recv(65536):
            data += chunk
    return bytes(data[:64]).split()[0].decode(), bytes(data[64:])


def binding_of(lab, bsid):
    return next(b for b in lab.controller_stats()["bindings"] if b["bsid"] == str(bsid))


def test_dig_gets_a_binding_segment(lab):
    txt = lab.dig("c1", f"encrypt.decrypt._pipes.{NAME}", "TXT")
    assert "status: NOERROR" in txt.stdout
    assert '"v=srv6pipes1"' in txt.stdout and '"server=fd00:d::1"' in txt.stdout
    bsid = txt.stdout.split('"bsid=')[1].split('"')[0]
    assert bsid.startswith("fd00:a1::b:")
    aaaa = lab.dig("c1", f"encrypt.decrypt._pipes.{NAME}", "AAAA", "+short")
    assert aaaa.stdout.split() == ["fd00:d::1"]
    srh = lab.dig("c1", f"encrypt.decrypt._pipes.{NAME}", "TYPE65280", "+short")
    assert srh.stdout.startswith("\\# 40 ")
    wire = bytes.fromhex("".join(srh.stdout.split()[2:]))
    assert [str(a) for a in SRH.parse(wire).path] == [bsid, "fd00:d::1"]
    plain = lab.dig("c1", NAME, "AAAA", "+short")
    assert plain.stdout.split() == ["fd00:d::1"]


def test_chain_keeps_the_client_address(lab):
    payload = os.urandom(1 << 20)
    peer, echoed = echo_via(lab, "c1", ["encrypt", "decrypt"], payload, timeout=30)
    assert peer == "fd00:c1::1" and echoed == payload
    binding = binding_of(lab, resolve(lab, "c1", ["encrypt", "decrypt"]).bsid)
    assert binding["proxies"][1] == "p3" and binding["proxies"][0] in ("p1", "p2")
    stats = lab.proxies[binding["proxies"][0]].stats()
    assert stats["srh_table"]["stacked"] >= 1
    assert stats["totals"]["functions"]["encrypt"]["bytes_up"] >= len(payload)


def test_students_get_their_checks_only(lab):
    refused = lab.dig("c2", f"encrypt.decrypt._pipes.{NAME}", "TXT")
    assert "status: REFUSED" in refused.stdout and "policy:" in refused.stdout
    with pytest.raises(client.ResolveError) as error:
        resolve(lab, "c2", ["encrypt", "decrypt"])
    assert error.value.rcode == dns.rcode.REFUSED
    peer, echoed = echo_via(lab, "c2", ["dpi"], b"students' traffic")
    assert (peer, echoed) == ("fd00:c2::1", b"students' traffic")
    assert resolve(lab, "c2", ["dpi"]).bsid.exploded.startswith("fd00:00a2:")


@pytest.mark.parametrize("name, status, reason", [
    (f"rot13._pipes.{NAME}", "NXDOMAIN", "unknown function"),
    ("dpi._pipes.ftp.campus.lab", "NXDOMAIN", "unknown server name"),
    (f"_pipes.{NAME}", "NXDOMAIN", "no function"),
    ("nowhere.example", "REFUSED", "no upstream"),
])
def test_bad_requests_get_an_explained_rcode(lab, name, status, reason):
    result = lab.dig("c1", name, "TXT")
    assert f"status: {status}" in result.stdout and reason in result.stdout


def test_client_outside_every_access_router_is_refused(lab):
    result = lab.dig("ctl", f"dpi._pipes.{NAME}", "TXT")
    assert "status: REFUSED" in result.stdout and "no access router serves" in result.stdout


def test_hand_crafted_srh_is_dropped_at_the_edge(lab):
    refused = lab.agent_stats("a1")["edge"]["refused"]
    p1 = lab.tb.locator("p1")[(1 << 32) | 42]            # xor 42 at p1
    forged = SRH.from_path([p1, lab.tb.hosts["s"].addr])

    def make():
        with lab.tb.hosts["c1"].enter():
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, 57, forged.to_bytes())
        return sock
    assert connection_outcome(make, (str(lab.tb.hosts["s"].addr), ECHO_PORT), 1) == "timeout"
    assert lab.agent_stats("a1")["edge"]["refused"] > refused


def test_syn_bypassing_the_access_router_is_refused_at_the_proxy(lab):
    """ctl reaches p3 without an access router: no HMAC, or a forged one."""
    s, ctl = lab.tb.hosts["s"].addr, lab.tb.hosts["ctl"]
    unsigned = SRH.from_path([lab.tb.locator("p3")[0], s])       # identity at p3
    forged = srhhmac.sign(unsigned, ctl.addr.packed, ROUTERS["a1"][2], b"guess")
    before = lab.proxies["p3"].stats()["srh_table"]["hmac_refused"]
    for srh in (unsigned, forged):
        def make(srh=srh):
            with ctl.enter():
                sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_IPV6, 57, srh.to_bytes())
            return sock
        assert connection_outcome(make, (str(s), ECHO_PORT), 1) == "timeout"
    assert wait_for(lambda: lab.proxies["p3"].stats()["srh_table"]["hmac_refused"] >= before + 2)


def test_route_helper_steers_an_unmodified_program(lab):
    c1 = lab.tb.hosts["c1"]
    pipesctl = [sys.executable, "-c", "import sys; from srv6pipes.cli import pipesctl_main; "
                "sys.exit(pipesctl_main(sys.argv[1:]))"]
    route = c1.run([*pipesctl, "route", NAME, "--chain", "compress,decompress", "--controller",
                    f"[{lab.dns[0]}]:{lab.dns[1]}", "--dev", "to-a1", "--apply", "-j"])
    applied = json.loads(route.stdout)
    try:
        assert applied["segments"] == [applied["controller"]["bsid"]]
        assert applied["mtu"] == 1500 - applied["controller"]["overhead"]
        shown = c1.run(["ip", "-6", "route", "show", "fd00:d::1/128"]).stdout
        assert "encap seg6 mode inline" in shown and f"mtu lock {applied['mtu']}" in shown
        # A plain socket, no SRH of its own: the route adds [BSID, S].
        with c1.enter():
            sock = socket.create_connection((str(lab.tb.hosts["s"].addr), ECHO_PORT), timeout=20)
        payload = b"compressible " * 100_000
        with sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            data = bytearray()
            while chunk := sock.recv(65536):
                data += chunk
        assert bytes(data[:64]).split()[0] == b"fd00:c1::1" and bytes(data[64:]) == payload
        compress = lab.proxies[binding_of(lab, applied["controller"]["bsid"])["proxies"][0]]
        assert compress.stats()["totals"]["functions"]["compress"]["flows_started"] >= 1
    finally:
        deleted = c1.run([*pipesctl, "route", str(lab.tb.hosts["s"].addr), "--via",
                          str(applied["segments"][0]), "--dev", "to-a1", "--delete"])
    assert "removed" in deleted.stdout
    for args, named in ((["fd00:d::1", "--via", "fc00:1::/80:nosuch"], "nosuch"),
                        ([NAME, "--via", "fc00:1::/80:xor"], "give the server's IPv6 address"),
                        (["fd00:d::1", "--via", "fc00:1::/80:xor:0x1ffffffff"], "does not fit"),
                        ([NAME, "--chain", "rot13"], "unknown function"),
                        (["fd00:d::1"], "either --via"),
                        (["fd00:d::1", "--via", "fc00:1::/80:xor", "--dev", "nope0"], "nope0")):
        command = [*pipesctl, "route", *args, "--controller", f"[{lab.dns[0]}]:{lab.dns[1]}"]
        if "--dev" not in args:
            command += ["--dev", "to-a1"]
        bad = c1.run(command, check=False)
        assert bad.returncode == 2 and named in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_fuzzed_queries_are_dropped_and_counted(lab):
    rng = random.Random(8)
    valid = dnsquery.make_query(NAME, ["dpi"]).to_wire()
    packets = [rng.randbytes(rng.randrange(0, 300)) for _ in range(150)]
    for _ in range(150):  # valid queries with bytes flipped
        data = bytearray(valid)
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        packets.append(bytes(data))
    before = lab.controller_stats()["counters"].get("malformed", 0)
    with lab.tb.hosts["c1"].enter():
        udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        tcp = socket.create_connection(lab.dns, timeout=5)
    with udp, tcp:
        for packet in packets:
            udp.sendto(packet, lab.dns)
        tcp.sendall(struct.pack("!H", 40) + b"\x00" * 7)  # a truncated TCP message, then EOF
    time.sleep(0.5)
    stats = lab.controller_stats()
    assert stats["counters"]["malformed"] > before
    assert lab.controller.proc.poll() is None
    answer = lab.dig("c1", f"dpi._pipes.{NAME}", "TXT", "+tcp")
    assert "status: NOERROR" in answer.stdout


def _agent_exchange(lab, router, data: bytes) -> bytes:
    host, port = lab.tb.hosts[router].addr, 7200
    with lab.tb.hosts["ctl"].enter():
        sock = socket.create_connection((str(host), port), timeout=5)
    with sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def test_agent_refuses_unauthenticated_and_malformed_requests(lab):
    key = messages.load_key(lab.agent_key)
    good = messages.seal({"type": "status", "router": "a1"}, key)
    wrong_key = messages.seal({"type": "sync", "router": "a1", "bindings": []}, b"k" * 32)
    bad_body = messages.seal({"type": "sync", "router": "a1", "bindings": [{"binding": {}}]}, key)
    outside = messages.seal({"type": "sync", "router": "a1", "bindings": [{"binding": {
        "bsid": "fd00:a2::b:1", "segments": ["fc00:3::"], "server": "fd00:d::1",
        "clients": ["fd00:c1::/64"]}, "lifetime": 30}]}, key)
    bindings = len(lab.agent_stats("a1")["bindings"])
    before = lab.agent_stats("a1")["counters"]
    assert _agent_exchange(lab, "a1", wrong_key) == b""                 # no reply
    assert _agent_exchange(lab, "a1", b"\xff\xff\xff\xff") == b""      # absurd length
    assert _agent_exchange(lab, "a1", struct.pack("!I", 5) + b"{]}x!") == b""
    assert _agent_exchange(lab, "a1", good)[4:]                         # answered once ...
    assert _agent_exchange(lab, "a1", good) == b""                      # ... replay refused
    reply, _ = messages.open_frame(_agent_exchange(lab, "a1", bad_body)[4:], key, None)
    assert reply["type"] == "error" and "binding" in reply["error"]
    reply, _ = messages.open_frame(_agent_exchange(lab, "a1", outside)[4:], key, None)
    assert reply["failed"] and "outside this router's block" in reply["failed"][0]["error"]
    after = lab.agent_stats("a1")["counters"]
    for reason in ("bad_mac", "too_large", "malformed", "replay", "bad_request",
                   "refused_bindings"):
        assert after.get(reason, 0) > before.get(reason, 0), reason
    assert lab.agents["a1"].proc.poll() is None
    # The refused sync withdrew nothing it should not have: the controller's next sync
    # puts back what the "outside" sync (a valid frame listing other bindings) removed.
    assert wait_for(lambda: len(lab.agent_stats("a1")["bindings"]) == bindings, 10)


def test_failover_moves_the_binding_and_the_client_changes_nothing(lab):
    resolution = resolve(lab, "c1", ["xor", "xor"])
    assert echo_via(lab, "c1", ["xor", "xor"])[0] == "fd00:c1::1"
    first = binding_of(lab, resolution.bsid)["proxies"][0]
    other = {"p1": "p2", "p2": "p1"}[first]
    victim = lab.proxies[first]
    flows = lab.proxies[other].stats()["totals"]["functions"].get("xor", {}).get("flows_started", 0)
    victim.proc.send_signal(signal.SIGKILL)   # a crash: no clean-up
    victim.proc.wait(5)
    try:
        # Its workers drain and exit; the controller notices and moves the binding.
        assert wait_for(lambda: binding_of(lab, resolution.bsid)["proxies"][0] == other, 10)
        binding = binding_of(lab, resolution.bsid)
        assert binding["generation"] >= 2 and binding["bsid"] == str(resolution.bsid)
        # The client keeps its cached answer (same BSID), and the next connection works.
        peer, echoed = echo_via(lab, "c1", ["xor", "xor"], b"after the crash")
        assert (peer, echoed) == ("fd00:c1::1", b"after the crash")
        assert lab.proxies[other].stats()["totals"]["functions"]["xor"]["flows_started"] > flows
        event = lab.controller_stats()["failovers"][-1]
        assert first in event["down"] and event["bindings_moved"] >= 1
    finally:
        # The crashed pipesd left its kernel state; a new one cleans it up at start.
        victim.log_file.close()
        lab.start_proxy_daemon(first)
    assert wait_for(lambda: lab.controller_stats()["proxies"][first]["healthy"], 10)


def test_agent_crash_keeps_bindings_and_restart_reconciles(lab):
    resolution = resolve(lab, "c1", ["identity"])
    agent = lab.agents["a1"]
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(5)
    agent.log_file.close()
    # Crashed: the kernel still expands the binding.
    assert echo_via(lab, "c1", ["identity"])[0] == "fd00:c1::1"
    lab.start_agent("a1")
    assert any(b["bsid"] == str(resolution.bsid) for b in lab.agent_stats("a1")["bindings"])
    assert wait_for(lambda: lab.agent_stats("a1")["counters"].get("requests_sync", 0) >= 1, 10)
    assert echo_via(lab, "c1", ["identity"])[0] == "fd00:c1::1"


def test_reload_shrinks_the_block_until_it_is_exhausted(lab):
    """SIGHUP with a block of 3 bindings: the ones outside it are withdrawn, and the next
    new binding beyond three gets SERVFAIL (the block is full)."""
    config = lab.controller_config
    with open(config) as handle:
        original = handle.read()
    try:
        with open(config, "w") as handle:
            handle.write(original.replace('block = "fd00:a1::b:0/112"',
                                          'block = "fd00:a1::b:0/126"'))
        lab.controller.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: all(b["bsid"] in ("fd00:a1::b:1", "fd00:a1::b:2", "fd00:a1::b:3")
                                    for b in lab.controller_stats()["bindings"]
                                    if b["router"] == "a1"), 10)
        chains = [["identity"], ["dpi"], ["count", "dpi"], ["identity", "identity"],
                  ["xor", "xor"], ["encrypt", "decrypt"], ["compress", "decompress"]]
        outcomes = []
        for chain in chains:
            try:
                resolve(lab, "c1", chain)
                outcomes.append("ok")
            except client.ResolveError as exc:
                outcomes.append(str(exc))
        assert outcomes.count("ok") == 3
        assert all("full" in o for o in outcomes if o != "ok")
        assert lab.controller_stats()["counters"]["block_exhausted"] >= 4
    finally:
        with open(config, "w") as handle:
            handle.write(original)
        lab.controller.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
    assert lab.controller.proc.poll() is None


def test_controller_restart_adopts_what_the_agents_hold(lab):
    resolution = resolve(lab, "c1", ["identity", "identity"])
    assert echo_via(lab, "c1", ["identity", "identity"])[0] == "fd00:c1::1"
    assert lab.controller.stop() == 0            # SIGTERM: a clean exit
    lab.start_controller()
    stats = lab.controller_stats()
    assert stats["counters"].get("bindings_adopted", 0) >= 1
    assert any(b["bsid"] == str(resolution.bsid) for b in stats["bindings"])
    # The agents kept it (the first sync did not wipe it): the client's cached answer
    # still works, and a new lookup gets the same BSID.
    assert echo_via(lab, "c1", ["identity", "identity"])[0] == "fd00:c1::1"
    time.sleep(2.5)  # past a sync interval
    assert echo_via(lab, "c1", ["identity", "identity"])[0] == "fd00:c1::1"
    assert resolve(lab, "c1", ["identity", "identity"]).bsid == resolution.bsid


def test_pipes_run_steers_curl_without_privileges(lab, tmp_path):
    """pipes-run (LD_PRELOAD): curl fetches through compress,decompress by name, pipes-run
    and curl holding no capability at all (what root could do, they cannot: no route, no
    raw socket); curl itself unchanged. Other connections are untouched."""
    import hashlib

    from srv6pipes.lab.apps import Lighttpd

    www = tmp_path / "www"
    www.mkdir()
    body = b"compressible " * 50_000
    (www / "page").write_bytes(body)
    os.chmod(tmp_path, 0o755)
    server = Lighttpd(lab.tb.hosts["s"], str(www), port=80)
    c1 = lab.tb.hosts["c1"]
    controller = f"[{lab.dns[0]}]:{lab.dns[1]}"
    # No capability, bounding set empty (uid 0 stays: this python lives under /root).
    unprivileged = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]
    run = [*unprivileged, sys.executable, "-m", "srv6pipes.preload"]
    def compressed_flows():
        return sum(proxy.stats()["totals"]["functions"].get("compress", {}).get(
            "flows_started", 0) for proxy in lab.proxies.values())

    capabilities = c1.run([*unprivileged, "grep", "^CapEff", "/proc/self/status"]).stdout
    assert capabilities.split()[1] == "0" * 16, capabilities
    try:
        before = compressed_flows()
        fetched = c1.run(["sh", "-c", f"{' '.join(run)} --via compress,decompress "
                          f"--controller {controller} -- curl -sS http://{NAME}/page | sha256sum"])
        assert fetched.stdout.split()[0] == hashlib.sha256(body).hexdigest(), fetched
        assert compressed_flows() == before + 1        # through the chain, once
        # Steering goes by address: the server's address on a closed port goes through the
        # chain too (the proxy resets what the server refused: curl 56); another host's
        # does not (refused by that host: curl 7). pipes-run exits with curl's status.
        for host, status in ((lab.tb.hosts["s"].addr, 56), (lab.dns[0], 7)):
            ended = c1.run([*run, "--via", "compress,decompress", "--controller", controller,
                            "--to", NAME, "--", "curl", "-sS", "-o", "/dev/null",
                            f"http://[{host}]:1/"], check=False)
            assert ended.returncode == status, ended
        refused = c1.run([*run, "--via", "rot13", "--controller", controller, "--",
                          "curl", f"http://{NAME}/page"], check=False)
        assert refused.returncode == 2 and "unknown function" in refused.stderr, refused
        assert "Traceback" not in refused.stderr and len(refused.stderr.splitlines()) == 1
        server.stop()                  # lighttpd writes its access log out when it stops
        assert server.clients_seen() == ["fd00:c1::1"]     # the client's own address
    finally:
        server.stop()
