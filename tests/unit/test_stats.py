"""srv6pipes.stats: the region layout the relay writes into, snapshots and totals, and the
kernel's TcpExt counters. Pure logic over a bytearray or a file; no shared memory."""
from srv6pipes import _relay, stats

N = len(_relay.FUNCTION_COUNTERS)


def region():
    return stats.WorkerRegion(memoryview(bytearray(stats.REGION_WORDS * 8)).cast("Q"))


def test_worker_counters_fit_their_reserved_words_and_names_are_unique():
    assert len(stats.WORKER_COUNTERS) <= stats.RESERVED_WORKER_WORDS
    assert len(set(stats.WORKER_COUNTERS)) == len(stats.WORKER_COUNTERS)
    assert stats.FUNCTION_WORDS == N


def test_the_relay_writes_where_snapshot_reads():
    r = region()
    words = r.function_words()
    slot = 3
    words[slot * N + _relay.FUNCTION_COUNTERS.index("bytes_up")] = 1234
    words[slot * N + _relay.FUNCTION_COUNTERS.index("flows_active")] = 2
    r.add("accepted")
    r.add("table_hits", 5)
    r.set("pid", 99)
    snap = r.snapshot({slot: "xor", 4: "idle"})
    assert snap["worker"]["accepted"] == 1 and snap["worker"]["table_hits"] == 5
    assert snap["worker"]["pid"] == 99
    assert list(snap["functions"]) == ["xor"]      # all-zero slots are left out
    assert snap["functions"]["xor"]["bytes_up"] == 1234
    assert r.flows_active(slot) == 2


def test_flows_died_zeroes_only_the_active_counts():
    r = region()
    words = r.function_words()
    for slot in (0, 7):
        words[slot * N + _relay.FUNCTION_COUNTERS.index("flows_active")] = 5
        words[slot * N + _relay.FUNCTION_COUNTERS.index("flows_started")] = 9
    r.flows_died()
    assert r.flows_active(0) == r.flows_active(7) == 0
    assert words[7 * N + _relay.FUNCTION_COUNTERS.index("flows_started")] == 9


def test_merge_sums_workers_but_not_their_identity():
    a = {"worker": {"pid": 1, "heartbeat_ms": 5, "accepted": 2},
         "functions": {"xor": {"bytes_up": 10}}}
    b = {"worker": {"pid": 2, "heartbeat_ms": 7, "accepted": 3},
         "functions": {"xor": {"bytes_up": 5}, "count": {"bytes_up": 1}}}
    assert stats.merge([a, b]) == {"worker": {"accepted": 5},
                                   "functions": {"xor": {"bytes_up": 15},
                                                 "count": {"bytes_up": 1}}}


def test_kernel_counters_parse_tcpext(tmp_path):
    netstat = tmp_path / "netstat"
    netstat.write_text("TcpExt: SyncookiesSent SyncookiesRecv ListenDrops Other\n"
                       "TcpExt: 4 3 2 1\n"
                       "IpExt: InNoRoutes\nIpExt: 0\n")
    assert stats.kernel_counters(str(netstat)) == {
        "syncookies_sent": 4, "syncookies_recv": 3, "listen_drops": 2}
    assert stats.kernel_counters(str(tmp_path / "missing")) == {}
