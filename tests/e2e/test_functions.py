"""Virtual functions through the real datapath: C - P1 - P2 - S, pipesd on P1 and P2.

Chains that undo each other restore the bytes both ways; single proxies show what travels on
the P1 - P2 - S segment; dpi and faulty functions reset only their own flow; modules are
loaded and unloaded while the daemons run.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import threading
import time
import zlib

import pytest

from srv6pipes import vf_crypto
from srv6pipes.modules import module_path

from tests.e2e.e2ekit import ECHO_PORT, connection_outcome, digest, read_to_eof, wait_for

pytestmark = pytest.mark.e2e

HERE = os.path.dirname(os.path.abspath(__file__))
MODULES = os.path.join(HERE, "..", "modules")
SINK_PORT = 9100
KEY_ID = 7

CHAINS = {
    "xor": ("xor", "xor", 0x42),
    "xor-passes": ("xor-passes", "xor-passes", 3),
    "compress": ("compress", "decompress", 0),
    "encrypt": ("encrypt", "decrypt", KEY_ID),
}


def functions(lab, proxy):
    return json.loads(lab.proxies[proxy].ctl("functions").stdout)


def function_totals(lab, proxy, name):
    return lab.proxies[proxy].stats()["totals"]["functions"].get(name, {})


def ctl(lab, proxy, *args):
    return lab.proxies[proxy].ctl(*args, check=False)


class Sink:
    """A server on S that keeps what each connection sent (to EOF), then closes."""

    def __init__(self, lab, port=SINK_PORT):
        with lab.s.enter():
            self.listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("::", port))
        self.listener.listen(16)
        self.listener.settimeout(30)
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        conn.settimeout(30)
        self.received.append(read_to_eof(conn))

    def close(self):
        self.thread.join(30)
        self.listener.close()


def send_to_sink(lab, segments, payload):
    sink = Sink(lab)
    try:
        sock = lab.connect(segments, port=SINK_PORT)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        read_to_eof(sock)
    finally:
        sink.close()
    assert len(sink.received) == 1
    return sink.received[0]


# -- chains that undo each other ---------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 1000, 1 << 20, 8 << 20])
@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_chain_restores_the_bytes_both_ways(lab, chain, size):
    first, second, params = CHAINS[chain]
    payload = os.urandom(size // 2) + bytes(size - size // 2)  # half noise, half zeros
    segments = [lab.address("p1", first, params), lab.address("p2", second, params)]
    peer, echoed, local = lab.echo_roundtrip(segments, payload)
    assert peer == local, "the server must see the client's own address and port"
    assert digest(echoed) == digest(payload)


def test_compress_shrinks_what_travels_after_it(lab):
    """One compress proxy: the server receives a raw deflate stream of the payload."""
    payload = b"srv6pipes compresses this line. " * 20000
    wire = send_to_sink(lab, [lab.address("p1", "compress", 1)], payload)
    assert len(wire) < len(payload) // 10
    assert zlib.decompressobj(-15).decompress(wire) == payload


def test_compress_flushes_each_read_so_interactive_traffic_flows(lab):
    """A request smaller than any buffer gets through compress -> decompress and back at
    once: nothing waits for more data or for the end of the stream."""
    segments = [lab.address("p1", "compress", 0), lab.address("p2", "decompress", 0)]
    sock = lab.connect(segments, timeout=5)
    try:
        header = b""
        while len(header) < 64:
            header += sock.recv(64 - len(header))
        for line in (b"ping\n", b"pong pong\n", b"x" * 3):
            sock.sendall(line)
            got = b""
            while len(got) < len(line):
                got += sock.recv(100)
            assert got == line
    finally:
        sock.close()


def test_encrypt_sends_ciphertext_with_a_fresh_salt_per_flow(lab):
    payload = b"the same secret twice " * 100
    wires = [send_to_sink(lab, [lab.address("p1", "encrypt", KEY_ID)], payload)
             for _ in range(2)]
    for wire in wires:
        assert len(wire) == len(payload) + vf_crypto.SALT_SIZE
        assert payload[:32] not in wire
    assert wires[0] != wires[1], "two flows must never share a keystream"


def test_encrypt_with_an_unknown_key_id_resets_the_flow(lab):
    before = function_totals(lab, "p1", "encrypt").get("vf_resets", 0)
    sock_target = (str(lab.s.addr), ECHO_PORT)
    segments = [lab.address("p1", "encrypt", 99), lab.address("p2", "decrypt", 99)]
    outcome = connection_outcome(lambda: lab.client_socket(segments), sock_target)
    assert outcome == "reset"
    assert wait_for(lambda: function_totals(lab, "p1", "encrypt").get("vf_resets", 0) > before)


# -- dpi and count ---------------------------------------------------------------------------
def _exchange_then_outcome(sock, pieces, pause=0.2):
    """Sends pieces as separate TCP segments; returns 'reset' or 'ok' (echo complete)."""
    try:
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(pause)
        sock.shutdown(socket.SHUT_WR)
        read_to_eof(sock)
        return "ok"
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    except OSError as exc:  # shutdown() after the RST arrived
        if exc.errno == errno.ENOTCONN:
            return "reset"
        raise
    finally:
        sock.close()


def test_dpi_blocks_a_pattern_split_across_tcp_segments(lab):
    before = function_totals(lab, "p1", "dpi").get("vf_resets", 0)
    pattern = b"FORBIDDEN-PATTERN"
    for cut in (1, 9, len(pattern) - 1):
        sock = lab.connect([lab.address("p1", "dpi")], timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        outcome = _exchange_then_outcome(sock, [b"hello " + pattern[:cut], pattern[cut:] + b"!"])
        assert outcome == "reset", f"pattern cut at {cut} was not blocked"
    assert wait_for(lambda: function_totals(lab, "p1", "dpi").get("vf_resets", 0) >= before + 3)


def test_dpi_matches_binary_patterns_and_passes_clean_traffic(lab):
    clean = os.urandom(1 << 20).replace(b"\xde\xad\xbe\xef", b"")
    peer, echoed, local = lab.echo_roundtrip([lab.address("p1", "dpi")], clean)
    assert digest(echoed) == digest(clean)
    sock = lab.connect([lab.address("p1", "dpi")], timeout=10)
    assert _exchange_then_outcome(sock, [os.urandom(70000) + b"\xde\xad", b"\xbe\xef"]) == "reset"


def test_count_reports_bytes_and_flows_per_client_prefix(lab):
    payload = os.urandom(300_000)
    for _ in range(3):
        lab.echo_roundtrip([lab.address("p1", "count", 64)], payload)

    def entry():
        per_worker = lab.proxies["p1"].stats()["function_stats"]
        rows = [row for stats in per_worker.values() for row in stats["count"]
                if row["prefix"] == "fd00:c::/64"]
        return rows and {k: sum(r[k] for r in rows) for k in ("flows", "bytes_up", "bytes_down")}

    totals = wait_for(lambda: (entry() or {}).get("flows", 0) >= 3 and entry())
    assert totals["flows"] >= 3
    assert totals["bytes_up"] >= 3 * len(payload)
    assert totals["bytes_down"] >= 3 * (len(payload) + 64)
    # Only this test uses count: exactly its three flows and their bytes, no more.
    assert totals == {"flows": 3, "bytes_up": 3 * len(payload),
                      "bytes_down": 3 * (len(payload) + 64)}


# -- modules at run time -------------------------------------------------------------------
@pytest.fixture(scope="module")
def mods(trusted_path_factory):
    """The test modules, copied where root may load them from (a checkout under /tmp may
    not: pipesd refuses files others could have written)."""
    import shutil

    folder = trusted_path_factory.mktemp("modules")
    for source in (module_path("vf_caesar"), os.path.join(MODULES, "chaos.py"),
                   os.path.join(MODULES, "faulty.py")):
        shutil.copy(source, folder)
    return folder


@pytest.fixture
def chaos_c(trusted_path):
    from tests.support.cmodules import build_c_module

    return build_c_module(os.path.join(MODULES, "chaos_c.c"), trusted_path)


def test_load_c_and_python_modules_then_unload(lab, mods, chaos_c):
    paths = [mods / "vf_caesar.so", mods / "chaos.py", chaos_c]
    try:
        for path in paths:
            for proxy in ("p1", "p2"):
                result = ctl(lab, proxy, "load", path)
                assert result.returncode == 0, result.stderr
        listed = {f["name"]: f for f in functions(lab, "p1") if "name" in f}
        for name in ("caesar", "uncaesar", "chaos-py", "chaos-c"):
            assert listed[name]["workers"] == [0, 1], listed[name]
        payload = os.urandom(3 << 20)
        for first, second in (("caesar", "uncaesar"), ("chaos-py", "chaos-c")):
            segments = [lab.address("p1", first, 13), lab.address("p2", second, 13)]
            peer, echoed, local = lab.echo_roundtrip(segments, payload)
            assert digest(echoed) == digest(payload), (first, second)
        # caesar really transforms: one proxy alone changes what the server gets.
        wire = send_to_sink(lab, [lab.address("p1", "caesar", 1)], b"abc")
        assert wire == b"bcd"
    finally:
        for proxy in ("p1", "p2"):
            for name in ("vf_caesar", "chaos", "chaos_c"):
                ctl(lab, proxy, "unload", name)
    assert not {"caesar", "chaos-py", "chaos-c"} & {f.get("name") for f in functions(lab, "p1")}
    outcome = connection_outcome(lambda: lab.client_socket([lab.address("p1", "caesar", 1)]),
                                 (str(lab.s.addr), ECHO_PORT))
    assert outcome == "reset", "an unloaded function's address must be reset"


def test_bad_modules_are_refused_and_the_daemon_keeps_running(lab, mods, trusted_path):
    tmp_path = trusted_path
    from tests.support.cmodules import build_c_module

    broken_py = tmp_path / "broken.py"
    broken_py.write_text("raise ImportError('deliberately broken')\n")
    collide = tmp_path / "collide.py"
    collide.write_text("from srv6pipes.vfapi import Function\n"
                       "FUNCTIONS = [Function(1, 'not-xor', lambda c, d, b, e: b)]\n")
    crash_c = tmp_path / "crash.c"
    crash_c.write_text('#include "srv6pipes_vf.h"\n#include <signal.h>\nPIPES_VF_MODULE;\n'
                       "static int boom(void) { raise(SIGSEGV); return 0; }\n"
                       "static void *sp(uint32_t p, const struct pipes_flow_info *f) { return 0; }\n"
                       "static ssize_t pr(void *c, int d, const uint8_t *i, size_t *n, uint8_t *o,"
                       " size_t cap, int fl) { return 0; }\n"
                       "const struct pipes_func_desc all_funcs[] = {{ .id = 0x300, .name = \"crash\","
                       " .init = boom, .spawn = sp, .process = pr }, { 0 }};\n")
    crash_so = build_c_module(str(crash_c), tmp_path)
    cases = {
        str(broken_py): "deliberately broken",
        str(collide): "taken",
        crash_so: "crashed",
        str(tmp_path / "missing.so"): "no such file",
        str(mods / "vf_caesar.so"): None,  # loads; loading it twice is refused
    }
    try:
        for path, message in cases.items():
            result = ctl(lab, "p1", "load", path)
            if message is None:
                assert result.returncode == 0, result.stderr
                result = ctl(lab, "p1", "load", path)
                message = "already loaded"
            assert result.returncode != 0
            assert message in result.stderr, result.stderr
            assert ctl(lab, "p1", "ping").returncode == 0
    finally:
        ctl(lab, "p1", "unload", "vf_caesar")
    peer, echoed, local = lab.echo_roundtrip([lab.address("p1", "xor", 5)], b"still fine", 5)
    assert echoed == b"still fine"


def test_python_exception_resets_only_its_flow_and_is_counted(lab, mods):
    assert ctl(lab, "p1", "load", mods / "faulty.py").returncode == 0
    try:
        address = lab.address("p1", "faulty")
        healthy = lab.connect([address], timeout=10)
        healthy.sendall(b"first half ")
        for trigger, counter in ((b"BOOM", "vf_errors"), (b"BLOCK", "vf_resets")):
            sock = lab.connect([address], timeout=10)
            assert _exchange_then_outcome(sock, [b"x" * 100 + trigger]) == "reset"
            assert wait_for(lambda: function_totals(lab, "p1", "faulty").get(counter, 0) >= 1)
        healthy.sendall(b"second half")
        healthy.shutdown(socket.SHUT_WR)
        assert read_to_eof(healthy)[64:] == b"first half second half"
    finally:
        ctl(lab, "p1", "unload", "faulty")


def test_unload_drains_flows_in_use(lab, mods):
    """Unload while a flow uses the module: the flow runs to its end untouched, new flows
    are reset, the module is let go once the flow closed."""
    assert ctl(lab, "p1", "load", mods / "vf_caesar.so").returncode == 0
    unloaded = False
    try:
        address = lab.address("p1", "caesar", 0)  # k = 0: identity, so the echo is readable
        sock = lab.connect([address], timeout=10)
        sock.sendall(b"before ")
        result = ctl(lab, "p1", "unload", "vf_caesar")
        assert result.returncode == 0, result.stderr
        unloaded = True
        assert sum(json.loads(result.stdout)["draining_flows"].values()) == 1
        draining = [f for f in functions(lab, "p1") if f.get("draining")]
        assert [d["module"] for d in draining] == ["vf_caesar"]
        outcome = connection_outcome(lambda: lab.client_socket([address]),
                                     (str(lab.s.addr), ECHO_PORT))
        assert outcome == "reset"
        sock.sendall(b"after")
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock)[64:] == b"before after"
        assert wait_for(lambda: not any(f.get("draining") for f in functions(lab, "p1")))
    finally:
        if not unloaded:
            ctl(lab, "p1", "unload", "vf_caesar")


def test_a_restarted_worker_loads_the_modules_too(lab, mods):
    assert ctl(lab, "p1", "load", mods / "vf_caesar.so").returncode == 0
    try:
        worker_pids = [w["pid"] for w in lab.proxies["p1"].stats()["workers"]]
        os.kill(worker_pids[0], 9)
        assert wait_for(lambda: all(w["pid"] not in worker_pids[:1] and w["worker"]["pid"]
                                    for w in lab.proxies["p1"].stats()["workers"])
                        and len(lab.proxies["p1"].stats()["workers"]) == 2, timeout=20)
        listed = {f["name"]: f for f in functions(lab, "p1") if "name" in f}
        assert listed["caesar"]["workers"] == [0, 1]
        for _ in range(6):  # both workers get some of these (k = 0: identity)
            peer, echoed, local = lab.echo_roundtrip([lab.address("p1", "caesar", 0)], b"abc")
            assert echoed == b"abc"
    finally:
        ctl(lab, "p1", "unload", "vf_caesar")


def test_a_slow_worker_is_reported_not_replaced_and_catches_up(lab, mods):
    """A worker that does not answer (here: stopped) delays nothing and is not punished:
    `functions` answers after its short deadline, naming the late worker; a load that it
    cannot confirm is refused and rolled back; once it runs again it has caught up (it
    processes every request in order) and is the same process."""
    proxy = lab.proxies["p1"]
    stuck = proxy.stats()["workers"][0]["pid"]
    os.kill(stuck, signal.SIGSTOP)
    try:
        started = time.monotonic()
        listed = functions(lab, "p1")
        assert time.monotonic() - started < 4
        assert any("did not answer" in (f.get("error") or "") for f in listed), listed
        refused = ctl(lab, "p1", "load", mods / "vf_caesar.so")
        assert refused.returncode != 0 and "did not answer" in refused.stderr
    finally:
        os.kill(stuck, signal.SIGCONT)
    assert wait_for(lambda: all("error" not in f for f in functions(lab, "p1")))
    assert stuck in [w["pid"] for w in proxy.stats()["workers"]]
    listed = {f["name"]: f for f in functions(lab, "p1") if "name" in f}
    assert "caesar" not in listed            # the rolled-back load left nothing behind
    assert ctl(lab, "p1", "load", mods / "vf_caesar.so").returncode == 0
    try:
        listed = {f["name"]: f for f in functions(lab, "p1") if "name" in f}
        assert listed["caesar"]["workers"] == [0, 1]
    finally:
        ctl(lab, "p1", "unload", "vf_caesar")
