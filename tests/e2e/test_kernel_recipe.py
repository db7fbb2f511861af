"""The kernel recipe of docs/design.md section 3, end to end, without the real proxy.

c --SRH[fc00:1::1:0:0, s]--> p1 --> s on a Testbed(proxies=1). In p1: the rules of
``srv6pipes.kernelsetup`` and a tiny thread-based transparent proxy written here (listener with
IPV6_TRANSPARENT + SO_REUSEPORT on [::]:PORT; per accepted connection an outbound transparent
socket bound to the client's address and port, connected to the accepted socket's local
address = the server). No NFQUEUE reader runs: ``--queue-bypass`` lets the SYNs through.

This is the reference the real daemon follows: if it fails, the kernel does not behave as
docs/design.md says.
"""
from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from srv6pipes import kernelsetup

pytestmark = pytest.mark.e2e

IPV6_TRANSPARENT = 75  # linux/in6.h
TCP_SAVE_SYN = 27  # linux/tcp.h
TCP_SAVED_SYN = 28
PROXY_PORT = 5000
HTTP_PORT = 8080
FUNCTION = 0x1_0000_0000  # function 1, parameters 0: fc00:1::1:0:0 in fc00:1::/80

SERVER = textwrap.dedent(
    """
    # HTTP file server that logs, per request, the peer address and port it saw.
    import functools, hashlib, http.server, socket, sys

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_POST(self):  # upload: answer with the length and SHA-256 of the body
            body = self.rfile.read(int(self.headers["Content-Length"]))
            reply = f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, fmt, *args):
            host, port = self.client_address[:2]
            print("PEER", host, port, fmt % args, flush=True)

    class Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6

    Server(("::", int(sys.argv[1])), functools.partial(Handler, directory=sys.argv[2])).serve_forever()
    """
)


class TransparentProxy:
    """Minimal transparent TCP proxy, one thread per direction; records what it saw."""

    def __init__(self, host, port: int):
        self.host = host
        self.flows: list[dict] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: set[socket.socket] = set()  # closed at close() to unblock threads
        with host.enter():  # the socket belongs to the namespace it was created in
            self.listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            self.listener.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self.listener.setsockopt(socket.IPPROTO_TCP, TCP_SAVE_SYN, 1)
            self.listener.bind(("::", port))
            self.listener.listen(64)
            self.listener.settimeout(0.1)
        except BaseException:
            self.listener.close()
            raise
        self._spawn(self._accept_loop)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if not self._stop.is_set():
                    self.errors.append(exc)
                return
            self._spawn(self._handle, conn, peer)

    def _handle(self, conn: socket.socket, peer) -> None:
        out = None
        self._sockets.add(conn)
        try:
            local = conn.getsockname()
            flow = {"peer": peer[:2], "local": local[:2],
                    "saved_syn": conn.getsockopt(socket.IPPROTO_TCP, TCP_SAVED_SYN, 1024)}
            self.flows.append(flow)
            with self.host.enter():
                out = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            self._sockets.add(out)
            out.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            out.bind(peer[:2])  # the client's own address and port: the server sees c
            out.settimeout(5)
            out.connect(local[:2])  # the final destination, as the SRH loop left it
            out.settimeout(None)
            flow["onward"] = out.getsockname()[:2]
        except BaseException as exc:
            if not self._stop.is_set():
                self.errors.append(exc)
            conn.close()
            if out is not None:
                out.close()
            return
        done = threading.Barrier(2, action=lambda: (conn.close(), out.close()))
        self._spawn(self._pump, conn, out, done)
        self._spawn(self._pump, out, conn, done)

    def _pump(self, src: socket.socket, dst: socket.socket, done: threading.Barrier) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
            dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if not self._stop.is_set():
                self.errors.append(exc)
        finally:
            try:
                done.wait(timeout=10)
            except threading.BrokenBarrierError:
                pass

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        for sock in list(self._sockets):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(timeout=5)
        for sock in self._sockets:
            sock.close()


def wait_listening(host, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with host.enter():
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(0.5)
            try:
                sock.connect((str(host.addr), port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.05)


def parse_saved_syn(data: bytes) -> dict:
    """IPv6 header + routing header (SRH) of the SYN saved by TCP_SAVE_SYN."""
    assert len(data) >= 40 + 8, data
    next_header = data[6]
    dst = ipaddress.IPv6Address(data[24:40])
    result = {"dst": dst, "next_header": next_header}
    if next_header == 43:  # routing header
        nh, hdrlen, rtype, segments_left, last_entry = struct.unpack("!BBBBB", data[40:45])
        segs = [ipaddress.IPv6Address(data[48 + 16 * i: 64 + 16 * i]) for i in range(last_entry + 1)]
        result.update(type=rtype, segments_left=segments_left, segments=segs, srh_len=(hdrlen + 1) * 8)
    return result


@pytest.fixture
def recipe_lab(request, testbed, tmp_path):
    """Testbed(proxies=1) with an HTTP server on s and the recipe + test proxy in p1.

    Indirect parametrization passes other Testbed arguments (mtu, topology).
    """
    tb = testbed(**{"proxies": 1, **getattr(request, "param", {})})
    c, p1, s = tb.hosts["c"], tb.hosts["p1"], tb.hosts["s"]
    www = tmp_path / "www"
    www.mkdir()
    payload = bytes(range(256)) * 1024  # 256 KiB: several windows through the relay
    (www / "file.bin").write_bytes(payload)
    (tmp_path / "server.py").write_text(SERVER)
    cfg = kernelsetup.KernelConfig(name="e2e", locator=tb.locator("p1"), port=PROXY_PORT)
    with open(tmp_path / "server.log", "w+") as log, contextlib.ExitStack() as undo:
        server = s.popen([sys.executable, str(tmp_path / "server.py"), str(HTTP_PORT), str(www)],
                         stdout=log, stderr=log)
        with p1.enter():
            kernelsetup.install(cfg)
        undo.callback(remove_in, p1, cfg)
        proxy = TransparentProxy(p1, PROXY_PORT)
        undo.callback(proxy.close)
        wait_listening(s, HTTP_PORT)
        assert server.poll() is None
        yield dict(tb=tb, c=c, p1=p1, s=s, cfg=cfg, proxy=proxy, payload=payload, log=log,
                   function=tb.locator("p1")[FUNCTION])


def remove_in(host, cfg) -> None:
    with host.enter():
        kernelsetup.remove(cfg)


def curl(c, s, path="/file.bin", check=True, connect_timeout=5, args=()):
    return c.run(
        ["curl", "-sS", "--max-time", "10", "--connect-timeout", str(connect_timeout),
         "-o", "-", "-w", "\n%{local_ip} %{local_port}", *args,
         f"http://[{s.addr}]:{HTTP_PORT}{path}"],
        check=check, text=False,
    )


def server_peers(log) -> list[tuple[str, int]]:
    log.flush()
    log.seek(0)
    return [(w[1], int(w[2])) for w in (line.split() for line in log) if w and w[0] == "PEER"]


def icmp6_in_errors(host) -> int:
    out = host.run(["cat", "/proc/net/snmp6"]).stdout  # /proc/net follows the reader's netns
    return int(next(line.split()[1] for line in out.splitlines() if line.startswith("Icmp6InErrors ")))


def nfqueue_syn_count(p1) -> int:
    out = p1.run(["ip6tables-legacy", "-w", "10", "-t", kernelsetup.IP6TABLES_TABLE, "-L",
                  "PREROUTING", "-n", "-v", "-x"]).stdout
    lines = [line for line in out.splitlines() if "srv6pipes:e2e" in line]
    assert len(lines) == 1, out
    return int(lines[0].split()[0])


def test_curl_through_transparent_proxy(recipe_lab):
    lab = recipe_lab
    tb, c, s, p1, proxy = lab["tb"], lab["c"], lab["s"], lab["p1"], lab["proxy"]
    function = lab["function"]
    assert str(function) == "fc00:1::1:0:0"
    route = tb.steer("c", "s", [function])
    assert "encap seg6 mode inline" in route
    syns_before = nfqueue_syn_count(p1)

    out = curl(c, s).stdout
    body, _, trailer = out.rpartition(b"\n")
    local_ip, local_port = trailer.decode().split()
    assert body == lab["payload"]
    assert ipaddress.IPv6Address(local_ip) == c.addr

    # The server saw the client's own address and port.
    assert server_peers(lab["log"]) == [(str(c.addr), int(local_port))]
    # The proxy accepted it: peer = c, local = the final destination (after the SRH loop).
    assert not proxy.errors, proxy.errors
    assert len(proxy.flows) == 1
    flow = proxy.flows[0]
    assert flow["peer"] == (str(c.addr), int(local_port))
    assert flow["local"] == (str(s.addr), HTTP_PORT)
    assert flow["onward"] == (str(c.addr), int(local_port))
    # The SYN went through the NFQUEUE rule once (bypassed: nobody reads queue 0).
    assert nfqueue_syn_count(p1) == syns_before + 1
    # TCP_SAVED_SYN: the SRH is there with the whole segment list, but after the loop:
    # DA = final destination and segments-left = 0 (the original index is lost).
    syn = parse_saved_syn(flow["saved_syn"])
    assert syn["next_header"] == 43 and syn["type"] == 4
    assert syn["dst"] == s.addr
    assert syn["segments_left"] == 0
    assert syn["segments"] == [s.addr, function]


def test_many_connections_and_port_steering(recipe_lab):
    """Sequential connections all go through; steering by port leaves other ports alone."""
    lab = recipe_lab
    tb, c, s, proxy = lab["tb"], lab["c"], lab["s"], lab["proxy"]
    tb.steer("c", "s", [lab["function"]], port=HTTP_PORT)
    ports = []
    for _ in range(20):
        out = curl(c, s, path="/").stdout
        ports.append(int(out.rpartition(b"\n")[2].split()[1]))
    assert [p for _, p in server_peers(lab["log"])] == ports
    assert len(proxy.flows) == 20 and not proxy.errors


def test_without_recipe_nothing_reaches_the_server(recipe_lab):
    """Control: once the recipe is removed, the function address is not deliverable."""
    lab = recipe_lab
    tb, c, s, p1 = lab["tb"], lab["c"], lab["s"], lab["p1"]
    tb.steer("c", "s", [lab["function"]])
    assert curl(c, s).returncode == 0
    with p1.enter():
        kernelsetup.remove(lab["cfg"])
    # p1 answers with ICMPv6 no-route, but the client's TCP ignores it: the error quotes the
    # packet as it left c's SRH code (DA = the segment, not s), tcp_v6_err finds no socket
    # (counted as Icmp6InErrors) and the SYN is retransmitted until the connect times out.
    icmp_errors = icmp6_in_errors(c)
    failed = curl(c, s, check=False, connect_timeout=1.5)
    assert failed.returncode == 28, failed.stderr  # CURLE_OPERATION_TIMEDOUT
    assert icmp6_in_errors(c) > icmp_errors
    assert len(server_peers(lab["log"])) == 1
    # Unsteered traffic is plain routing through p1 and still works.
    tb.unsteer("c", "s")
    assert curl(c, s).returncode == 0
    assert len(lab["proxy"].flows) == 1


@pytest.mark.parametrize("recipe_lab", [{"mtu": 1500}, {"mtu": 9000}], indirect=True, ids=["mtu1500", "mtu9000"])
def test_upload_and_download(recipe_lab, tmp_path):
    """Bulk data both ways; client-to-proxy packets carry the SRH (40 more bytes each)."""
    lab = recipe_lab
    tb, c, s, proxy = lab["tb"], lab["c"], lab["s"], lab["proxy"]
    tb.steer("c", "s", [lab["function"]])
    upload = bytes(reversed(range(256))) * 4096  # 1 MiB
    (tmp_path / "upload.bin").write_bytes(upload)
    out = curl(c, s, path="/", args=["--data-binary", f"@{tmp_path / 'upload.bin'}"]).stdout
    assert out.split(b"\n")[0].decode() == f"{len(upload)} {hashlib.sha256(upload).hexdigest()}"
    assert curl(c, s).stdout.rpartition(b"\n")[0] == lab["payload"]
    assert len(proxy.flows) == 2 and not proxy.errors


@pytest.mark.parametrize("recipe_lab", [{"topology": "star"}], indirect=True, ids=["star"])
def test_off_path_proxy_with_return_steering(recipe_lab):
    """Star: p1 is off the c-s path. Replies of the unmodified server reach the proxy because
    s steers them through another function address of p1 (docs/design.md section 4): they take
    the same mark-and-loop path, then the `socket transparent` lookup (DA = c) finds the
    proxy's onward socket."""
    lab = recipe_lab
    tb, c, s, proxy = lab["tb"], lab["c"], lab["s"], lab["proxy"]
    tb.steer("c", "s", [lab["function"]])
    tb.steer("s", "c", [tb.locator("p1")[2 << 32]])
    out = curl(c, s).stdout
    body, _, trailer = out.rpartition(b"\n")
    assert body == lab["payload"]
    port = int(trailer.split()[1])
    assert server_peers(lab["log"]) == [(str(c.addr), port)]
    assert len(proxy.flows) == 1 and not proxy.errors


@pytest.mark.parametrize("recipe_lab", [{"topology": "star"}], indirect=True, ids=["star"])
def test_off_path_proxy_without_return_steering_fails(recipe_lab):
    """Control for the test above: without the return route the server's SYN-ACK to the
    proxy's onward socket goes straight to c, and no request reaches the server."""
    lab = recipe_lab
    tb, c, s = lab["tb"], lab["c"], lab["s"]
    tb.steer("c", "s", [lab["function"]])
    failed = c.run(["curl", "-sS", "--max-time", "2", f"http://[{s.addr}]:{HTTP_PORT}/"], check=False)
    assert failed.returncode != 0
    assert server_peers(lab["log"]) == []


# ---------------------------------------------------------------------------- the Testbed itself


def test_testbed_line_builds_fast_and_routes_everything(testbed):
    started = time.monotonic()
    tb = testbed(proxies=2, mtu=9000)
    assert time.monotonic() - started < 2.0
    assert list(tb.hosts) == ["c", "p1", "p2", "s"]
    assert [str(tb.locator(p)) for p in ("p1", "p2")] == ["fc00:1::/80", "fc00:2::/80"]
    for a in tb.hosts.values():
        for b in tb.hosts.values():
            if a is not b:
                assert a.ping(b.addr), f"{a.name} -> {b.name}"
    link = tb.hosts["p1"].run(["ip", "-o", "link", "show", "to-p2"]).stdout
    assert " mtu 9000 " in link
    sysctls = tb.hosts["c"].run(
        "cat /proc/sys/net/ipv6/conf/to-p1/accept_dad /proc/sys/net/ipv6/conf/to-p1/seg6_enabled "
        "/proc/sys/net/ipv6/conf/all/forwarding").stdout.split()
    assert sysctls == ["0", "1", "1"]
    addrs = tb.hosts["c"].run(["ip", "-6", "addr"]).stdout
    assert "tentative" not in addrs


@pytest.mark.parametrize("kw, names", [
    ({"proxies": 0}, ["c", "r", "s"]),
    ({"proxies": 2, "topology": "star"}, ["r", "c", "p1", "p2", "s"]),
])
def test_testbed_other_shapes(testbed, kw, names):
    tb = testbed(**kw)
    assert list(tb.hosts) == names
    for a in tb.hosts.values():
        for b in tb.hosts.values():
            if a is not b:
                assert a.ping(b.addr), f"{a.name} -> {b.name}"


def test_testbed_teardown_leaves_nothing(tmp_path):
    from srv6pipes.lab.testbed import Testbed

    with pytest.raises(RuntimeError, match="boom"):
        with Testbed(proxies=1) as tb:
            names = [h.ns for h in tb.hosts.values()]
            sleeper = tb.hosts["s"].popen(["sleep", "60"])
            # Not tracked: started behind the testbed's back, must die with the namespace.
            tb.hosts["c"].run("sleep 60 >/dev/null 2>&1 & echo $! > " + str(tmp_path / "pid"))
            raise RuntimeError("boom")
    assert sleeper.returncode is not None
    stray = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and _alive(stray):
        time.sleep(0.02)
    assert not _alive(stray)
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in netns for name in names)


def test_testbed_cleanup_stale(testbed):
    from srv6pipes.lab.testbed import Testbed

    tb = testbed(proxies=1)
    names = sorted(h.ns for h in tb.hosts.values())
    assert Testbed.cleanup_stale(tb.prefix) == names  # as if the run had crashed
    assert Testbed.cleanup_stale(tb.prefix) == []
    tb.close()  # nothing left to delete: no error


def test_enter_switches_only_the_calling_thread(testbed):
    tb = testbed(proxies=0)
    netns = lambda: os.stat("/proc/thread-self/ns/net").st_ino  # noqa: E731
    before = netns()
    look, seen = threading.Event(), []

    def other_thread():
        look.wait(5)
        seen.append(netns())

    other = threading.Thread(target=other_thread)
    other.start()
    with tb.hosts["r"].enter():
        inside = netns()
        look.set()
        other.join()
        # A thread started inside inherits the namespace (clone copies the caller's).
        child = []
        t = threading.Thread(target=lambda: child.append(netns()))
        t.start()
        t.join()
    assert inside != before and seen == [before] and child == [inside]
    assert netns() == before


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_testbed_prefix_clash_leaves_the_other_alone(testbed):
    from srv6pipes.lab.testbed import TestbedError

    first = testbed(proxies=0)
    with pytest.raises(TestbedError, match="already exist"):
        testbed(proxies=0, prefix=first.prefix)
    assert first.hosts["c"].ping(first.hosts["s"].addr)
