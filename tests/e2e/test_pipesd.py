"""pipesd through the real kernel datapath: namespaces C - P1 - P2 - S, pipesd on P1 and P2."""
from __future__ import annotations

import os
import socket
import time

import pytest

from srv6pipes.srh import SRH
from srv6pipes.lab.apps import Lighttpd

from tests.e2e.e2ekit import (CLOSE_PORT, ECHO_PORT, RESET_PORT, connection_outcome, digest, read_to_eof, wait_for,
                    xor_bytes)

pytestmark = pytest.mark.e2e

SIZES = [0, 1, 1000, 65536, 1 << 20, 8 << 20]


def totals(lab, proxy):
    return lab.proxies[proxy].stats()["totals"]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("function", ["identity", "xor"])
def test_single_proxy_bytes_intact_and_server_sees_client(lab, function, size):
    key = 42 if function == "xor" else 0
    payload = os.urandom(size)
    peer, echoed, local = lab.echo_roundtrip([lab.address("p1", function, key)], payload, key)
    assert peer == local, "the server must see the client's own address and port"
    assert digest(echoed) == digest(payload)


@pytest.mark.slow
@pytest.mark.parametrize("function", ["identity", "xor"])
def test_64_megabytes_both_ways_through_a_chain(lab, function):
    key = 7 if function == "xor" else 0
    payload = os.urandom(64 << 20)
    segments = [lab.address("p1", function, key), lab.address("p2", function, key)]
    peer, echoed, local = lab.echo_roundtrip(segments, payload, 0, timeout=120)
    assert peer == local
    assert digest(echoed) == digest(payload)


def test_server_receives_xored_bytes_through_one_xor_proxy(lab):
    """xor really transforms (it is not a silent identity): the server's plain-text peer
    header reaches the client xored with the key by the single xor proxy on the way."""
    sock = lab.connect([lab.address("p1", "xor", 0x5A)])
    try:
        raw_header = b""
        while len(raw_header) < 64:
            chunk = sock.recv(64 - len(raw_header))
            assert chunk
            raw_header += chunk
    finally:
        sock.close()
    assert raw_header != xor_bytes(raw_header, 0x5A)
    address, port = xor_bytes(raw_header, 0x5A).decode().split()
    assert address == str(lab.c.addr)


def test_chain_xor_then_xor_restores_the_original(lab):
    payload = os.urandom(300_000)
    segments = [lab.address("p1", "xor", 99), lab.address("p2", "xor", 99)]
    peer, echoed, local = lab.echo_roundtrip(segments, payload)
    assert peer == local and echoed == payload


def test_half_close_client_still_receives_full_reply(lab):
    payload = os.urandom(2 << 20)
    sock = lab.connect([lab.address("p1", "identity"), lab.address("p2", "xor", 3)])
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)     # our side is done; the reply must still arrive in full
    received = read_to_eof(sock)
    assert xor_bytes(received[:64], 3).split()[0].decode() == str(lab.c.addr)
    assert digest(received[64:]) == digest(payload)


@pytest.mark.parametrize("function", ["identity", "xor"])
def test_server_reset_reaches_the_client(lab, function):
    sock = lab.connect([lab.address("p1", function, 1)], port=RESET_PORT)
    sock.sendall(b"hello")
    with pytest.raises(ConnectionResetError):
        for _ in range(100):
            if not sock.recv(4096):
                pytest.fail("got a FIN where the server sent a reset")
    sock.close()


def client_socket(lab, srh: SRH | None = None):
    """A connection_outcome() socket factory: lab.client_socket with srh (None: no SRH)."""
    return lambda: lab.client_socket([], srh)


def via(lab, *segments):
    return SRH.from_path([*segments, lab.s.addr])


def test_unknown_function_is_reset_promptly_and_counted(lab):
    before = totals(lab, "p1")["worker"].get("unknown_function", 0)
    started = time.monotonic()
    outcome = connection_outcome(client_socket(lab, via(lab, lab.address("p1", 0x7777))),
                                 (str(lab.s.addr), ECHO_PORT))
    assert outcome == "reset"
    assert time.monotonic() - started < 2
    assert wait_for(lambda: totals(lab, "p1")["worker"]["unknown_function"] == before + 1)


def test_no_srh_to_a_function_address_is_dropped_by_the_capture(lab):
    """A SYN to a function address without an SRH cannot be proxied: the capture drops it
    (it never takes a place in the listener's SYN queue) and counts it."""
    before = lab.proxies["p1"].stats()["srh_table"].get("no_srh", 0)
    outcome = connection_outcome(client_socket(lab),
                                 (str(lab.address("p1", "identity")), ECHO_PORT), timeout=2)
    assert outcome == "timeout"
    assert wait_for(lambda: lab.proxies["p1"].stats()["srh_table"]["no_srh"] >= before + 1)
    assert totals(lab, "p1")["worker"].get("no_srh", 0) == 0


def test_segments_left_zero_is_reset(lab):
    """An SRH already at its end whose final destination is our function address."""
    function_address = lab.address("p1", "identity")
    srh = SRH([function_address, lab.s.addr], segments_left=0)
    before = totals(lab, "p1")["worker"].get("malformed_srh", 0)
    outcome = connection_outcome(client_socket(lab, srh), (str(function_address), ECHO_PORT))
    assert outcome == "reset"
    assert wait_for(lambda: totals(lab, "p1")["worker"]["malformed_srh"] >= before + 1)


def test_too_many_segments_is_reset(lab):
    # 60 segments: within what the kernel accepts, more than pipesd's --max-segments (32)
    middle = [lab.address("p2", "identity")] * 58
    srh = SRH.from_path([lab.address("p1", "identity"), *middle, lab.s.addr])
    before = totals(lab, "p1")["worker"].get("too_many_segments", 0)
    outcome = connection_outcome(client_socket(lab, srh), (str(lab.s.addr), ECHO_PORT))
    assert outcome == "reset"
    assert wait_for(lambda: totals(lab, "p1")["worker"]["too_many_segments"] >= before + 1)


def test_server_refusing_resets_the_client(lab):
    before = totals(lab, "p1")["functions"].get("identity", {}).get("connect_failed", 0)
    outcome = connection_outcome(client_socket(lab, via(lab, lab.address("p1", "identity"))),
                                 (str(lab.s.addr), 9099))
    assert outcome == "reset"
    assert wait_for(lambda: totals(lab, "p1")["functions"]["identity"]["connect_failed"]
                    == before + 1)


def test_clients_that_vanish_leave_the_daemon_serving(lab):
    for _ in range(50):
        sock = lab.connect([lab.address("p1", "xor", 5)])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        sock.close()   # RST right after the handshake
    assert wait_for(lambda: totals(lab, "p1")["functions"]["xor"]["flows_active"] == 0)
    payload = os.urandom(10_000)
    assert lab.echo_roundtrip([lab.address("p1", "xor", 5)], payload, 5)[1] == payload


def test_thousand_concurrent_connections_complete(lab):
    segments = [lab.address("p1", "identity"), lab.address("p2", "xor", 17)]
    payload = os.urandom(2000)
    sockets = [lab.connect(segments, timeout=30) for _ in range(1000)]
    for sock in sockets:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
    failures = sum(read_to_eof(sock, 65536)[64:] != payload for sock in sockets)
    assert failures == 0


def test_unmodified_curl_steered_by_client_seg6_route(lab, tmp_path):
    body = os.urandom(200_000)
    (tmp_path / "f.bin").write_bytes(body)
    os.chmod(tmp_path, 0o755)
    server = Lighttpd(lab.s, str(tmp_path), port=8080)
    try:
        lab.tb.steer(client="c", dest="s",
                     segments=[lab.address("p1", "xor", 1), lab.address("p2", "xor", 1)])
        result = lab.c.run(["sh", "-c", f"curl -sS -g --max-time 10 http://[{lab.s.addr}]:8080/f.bin"
                                        " | sha256sum"])
        assert result.stdout.split()[0] == digest(body)
        assert wait_for(server.clients_seen) == [str(lab.c.addr)]   # lighttpd flushes ~1 s
    finally:
        lab.c.run(["ip", "-6", "route", "del", f"{lab.s.addr}/128"], check=False)
        server.stop()


def test_stats_count_bytes_per_function_and_table_hits(lab):
    before = totals(lab, "p2")
    payload = os.urandom(123_456)
    lab.echo_roundtrip([lab.address("p2", "xor", 9)], payload, 9)
    after = wait_for(lambda: (lambda t: t if t["functions"]["xor"]["bytes_up"] >=
                              before["functions"].get("xor", {}).get("bytes_up", 0) + len(payload)
                              else None)(totals(lab, "p2")))
    assert after, "bytes_up did not grow by the payload size"
    assert after["worker"]["table_hits"] > before["worker"]["table_hits"]
    stats = lab.proxies["p2"].stats()
    assert stats["srh_table"]["inserts"] >= 1
    assert len(stats["workers"]) == 2


REUSED_PORT = 31678


def test_client_port_reuse_after_server_closed_first(lab):
    """The server closes first, so the proxy holds TIME_WAIT toward the client; a new
    connection from the same client port must not stall (the capture retires it)."""
    before = lab.proxies["p1"].stats()["srh_table"]["time_wait_retired"]
    # Fixed client ports below the ephemeral range (32768-60999): an earlier test's
    # connection can still hold a port inside it (not in TIME_WAIT), and bind would fail.
    for _ in range(4):
        started = time.monotonic()
        sock = lab.connect([lab.address("p1", "identity")], port=CLOSE_PORT, timeout=5,
                           source_port=REUSED_PORT)
        assert read_to_eof(sock)[:64].split()[1] == str(REUSED_PORT).encode()
        assert time.monotonic() - started < 1.0
        time.sleep(0.05)    # let the proxy's side reach TIME_WAIT
    assert lab.proxies["p1"].stats()["srh_table"]["time_wait_retired"] >= before + 3


def test_client_port_reuse_after_client_closed_first(lab):
    """The client closes first, so the proxy's onward socket (client address and port ->
    server) holds TIME_WAIT; the next connection from the same port must still get through."""
    for _ in range(4):
        started = time.monotonic()
        sock = lab.connect([lab.address("p1", "identity")], timeout=5, source_port=REUSED_PORT + 1)
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock)[:64].split()[1] == str(REUSED_PORT + 1).encode()
        assert time.monotonic() - started < 1.0
        time.sleep(0.05)


def test_client_port_equal_to_the_proxy_listener_port(lab):
    """The onward socket binds the client's port; when it is also the port of the proxy's
    own transparent listeners (7000) the bind must not conflict with them."""
    sock = lab.connect([lab.address("p1", "xor", 4)], timeout=5, source_port=7000)
    sock.sendall(b"ping")
    sock.shutdown(socket.SHUT_WR)
    received = read_to_eof(sock)
    assert xor_bytes(received[:64], 4).split()[1] == b"7000" and received[64:] == b"ping"
