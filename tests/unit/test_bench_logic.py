"""The benchmark code's own logic (bench/lab): parsing the tools' output, medians and
ratios, the link emulator's configuration, the probe's and TCP statistics' summaries.

A broken benchmark must fail here rather than print nonsense; the figures themselves are
not run in CI (bench/run_paper.py, under the exclusive lock)."""
import json

import pytest

from bench.lab import cost, linkemu, paperfigs, pinning, probe, report, tcpstats
from bench.lab.linkemu import LinkCondition, LinkEmulationError, LinkEmulator
from bench.lab.workloads import WorkloadError, parse_blast, parse_iperf3, parse_wrk


# ------------------------------------------------------------------ tool output

WRK_OK = ("Running 5s test @ http://[fd00:d::1]:80/1MB\n  2 threads and 50 connections\n"
          'WRKJSON {"requests":120,"bytes":125829120,"duration_us":5000000,"connect":0,'
          '"read":0,"write":0,"status":0,"timeout":3,"latency_p50_us":250000,'
          '"latency_p99_us":900000}\n')


def test_wrk_totals_become_a_sample():
    sample = parse_wrk(0, WRK_OK)
    assert sample["bits_per_second"] == pytest.approx(125829120 * 8 / 5)
    assert sample["requests_per_second"] == pytest.approx(24)
    assert sample["bytes"] == 125829120 and sample["requests"] == 120
    assert sample["errors"] == {"timeout": 3}            # only the non-zero kinds
    assert sample["latency_p50_ms"] == 250 and sample["latency_p99_ms"] == 900


@pytest.mark.parametrize("rc,out", [(1, WRK_OK), (0, "Running 5s test\n"),
                                    (0, WRK_OK.replace('"duration_us":5000000',
                                                       '"duration_us":0'))])
def test_wrk_failures_raise(rc, out):
    with pytest.raises(WorkloadError):
        parse_wrk(rc, out, "unable to connect")


def test_iperf3_uses_the_receivers_rate():
    report_json = {"end": {"sum_received": {"bits_per_second": 4e9},
                           "sum_sent": {"bits_per_second": 4.2e9, "retransmits": 7},
                           "cpu_utilization_percent": {"host_total": 50.0,
                                                       "remote_total": 60.0}}}
    sample = parse_iperf3(json.dumps(report_json))
    assert sample["bits_per_second"] == 4e9 and sample["retransmits"] == 7
    assert sample["bytes"] is None                       # older iperf3: no byte count
    report_json["end"]["sum_received"]["bytes"] = 2_500_000_000
    assert parse_iperf3(json.dumps(report_json))["bytes"] == 2_500_000_000
    with pytest.raises(WorkloadError, match="busy"):
        parse_iperf3(json.dumps({"error": "the server is busy"}))
    with pytest.raises(WorkloadError):
        parse_iperf3("iperf3: error - unable to connect", "")


def test_blast_last_line_and_stream_errors():
    out = 'noise\n{"bytes": 1000, "seconds": 1.0, "bits_per_second": 8000.0, "errors": []}\n'
    assert parse_blast(0, out) == {"bits_per_second": 8000.0, "bytes": 1000}
    with pytest.raises(WorkloadError, match="reset"):
        parse_blast(1, '{"bytes": 1, "seconds": 1, "bits_per_second": 8, '
                       '"errors": ["connection reset"]}')
    with pytest.raises(WorkloadError):
        parse_blast(1, "", "Traceback")


# ------------------------------------------------------------------ medians and ratios

def sample(bps, rep=1, **extra):
    return {"bits_per_second": bps, "repetition": rep, **extra}


def test_median_ignores_failed_and_disturbed_samples():
    samples = [sample(5), sample(1), {"error": "x"}, sample(100, foreign_cpus=0.9),
               sample(3)]
    assert report.median_sample(samples)["bits_per_second"] == 3
    # Lower median of an even count; disturbed ones only when nothing else is left.
    assert report.median_sample([sample(4), sample(2)])["bits_per_second"] == 2
    assert report.median_sample([sample(7, foreign_cpus=0.9)])["bits_per_second"] == 7
    assert report.median_sample([{"error": "x"}]) is None


def cell(mode, role, workload, values, panel=paperfigs.ONE_PROXY, figure="fig7"):
    return {"figure": figure, "panel": panel, "mode": mode, "role": role,
            "workload": workload, "passes_n": None,
            "samples": [sample(v, rep) for rep, v in enumerate(values, 1)]}


def test_ratios_compare_the_same_panel_and_workload():
    cells = paperfigs.summarize([
        cell("router", "router", "wrk-1MB-keepalive", [100, 120, 80]),
        cell("pipesd-identity", "identity", "wrk-1MB-keepalive", [200, 150, 260]),
        cell("router", "router", "wrk-10MB-keepalive", [50, 50, 50]),
        cell("2-routers", "router", "wrk-1MB-keepalive", [10, 10, 10], panel=paperfigs.CHAIN),
        cell("2-pipesd-identity", "identity", "wrk-1MB-keepalive", [40, 40, 40],
             panel=paperfigs.CHAIN),
        cell("pipesd-identity", "identity", "wrk-10KB-keepalive", [5]),   # no router cell
    ])
    by = {(c["panel"], c["mode"], c["workload"]): c for c in cells}
    proxy = by[(paperfigs.ONE_PROXY, "pipesd-identity", "wrk-1MB-keepalive")]
    assert proxy["ratio_to_router"] == pytest.approx(200 / 100)
    assert proxy["ratio_to_router_per_repetition"] == {1: 2.0, 2: 1.25, 3: 3.25}
    assert proxy["spread"] == pytest.approx(260 / 150 - 1)
    chain = by[(paperfigs.CHAIN, "2-pipesd-identity", "wrk-1MB-keepalive")]
    assert chain["ratio_to_router"] == pytest.approx(4.0)
    assert by[(paperfigs.ONE_PROXY, "pipesd-identity", "wrk-10KB-keepalive")][
        "ratio_to_router"] is None
    assert by[(paperfigs.ONE_PROXY, "router", "wrk-1MB-keepalive")]["ratio_to_identity"] \
        == pytest.approx(100 / 200)


def test_target_needs_every_ratio():
    cells = paperfigs.summarize([
        cell("router", "router", "wrk-1MB-keepalive", [100]),
        cell("pipesd-identity", "identity", "wrk-1MB-keepalive", [160]),
        cell("router", "router", "wrk-10MB-keepalive", [100]),
        cell("pipesd-identity", "identity", "wrk-10MB-keepalive", [140]),
    ])
    loads = ["wrk-1MB-keepalive", "wrk-10MB-keepalive"]
    result = paperfigs.target(cells, "fig7", "identity", loads, 1.5)
    assert result["met"] is False
    assert result["ratios"][paperfigs.ONE_PROXY] == {"wrk-1MB-keepalive": 1.6,
                                                     "wrk-10MB-keepalive": 1.4}
    assert paperfigs.target(cells, "fig7", "identity", loads[:1], 1.5)["met"] is True
    assert paperfigs.target(cells, "fig8", "identity", loads, 1.5)["met"] is None


def test_csv_rows_carry_the_plotted_numbers():
    cells = paperfigs.summarize([cell("router", "router", "wrk-1MB-keepalive", [1e8, 3e8]),
                                 cell("pipesd-identity", "identity", "wrk-1MB-keepalive",
                                      [2e8])])
    rows = paperfigs.csv_rows(cells)
    assert set(rows[0]) == set(paperfigs.CSV_COLUMNS)
    assert rows[0]["size"] == "1MB" and rows[0]["median_mbps"] == 100.0
    assert rows[0]["min_mbps"] == 100.0 and rows[0]["max_mbps"] == 300.0
    assert rows[1]["ratio_to_router"] == 2.0


def test_figure_definitions():
    plan = paperfigs.FigurePlan()
    assert [c.name for c in paperfigs.cases_for("6", plan)] == [
        "router", "pipesd-identity", "haproxy"]
    fig6 = paperfigs.cases_for("6", plan)[0]
    assert [w.name for w in fig6.workloads][:2] == ["wrk-1KB-keepalive", "wrk-10KB-keepalive"]
    assert len(fig6.workloads) == 2 * len(paperfigs.SIZES) and not fig6.links
    fig7 = paperfigs.cases_for("7", plan)
    assert {c.panel for c in fig7} == {paperfigs.ONE_PROXY, paperfigs.CHAIN}
    assert all(c.workloads[0].params["connections"] == plan.lossy_connections for c in fig7)
    fig8 = paperfigs.cases_for("8", plan)
    assert {(a, b) for c in fig8 for a, b, _ in c.links} == {("p1", "s")}
    assert [c.passes_n for c in paperfigs.cases_for("9", plan)][2:] == list(plan.passes)
    assert paperfigs.size_of("wrk-10MB-close") == "10MB"
    assert paperfigs.size_of("blast-1stream") is None


def test_link_settings_match_the_papers_conditions():
    plan = paperfigs.FigurePlan()
    fig7 = paperfigs.link_settings(paperfigs.cases_for("7", plan))
    one = fig7[paperfigs.ONE_PROXY]
    assert one["round_trip_ms"] == 100 and one["one_way_delay_ms"] == 50
    assert one["one_way_loss_pct"] == pytest.approx(1.99, abs=0.001)     # 1 - 0.99^2
    assert one["round_trip_loss_pct"] == pytest.approx(3.94, abs=0.001)  # the paper's ~4%
    assert fig7[paperfigs.CHAIN]["round_trip_ms"] == 150
    fig8 = paperfigs.link_settings(paperfigs.cases_for("8", plan))[paperfigs.ONE_PROXY]
    assert fig8["round_trip_ms"] == 100 and fig8["one_way_loss_pct"] == 2


# ------------------------------------------------------------------ link emulation

def test_link_condition_is_validated_and_rendered():
    cond = LinkCondition(delay_ms=25, loss_pct=1)
    assert cond.describe() == "25 ms, 1% loss"
    assert LinkCondition().describe() == "no change"
    assert cond.netem_args(limit=500) == ["netem", "limit", "500", "delay", "25ms",
                                          "loss", "1%"]
    assert LinkCondition(1, 0, 10).netem_args()[-2:] == ["rate", "10mbit"]
    args = cond.delayline_args(queue=101, seed=9)
    assert args[:8] == ["--queue", "101", "--delay-ms", "25", "--loss-pct", "1",
                        "--limit", str(linkemu.QUEUE_LIMIT)]
    assert args[-1] == "--realtime" and "--rate-mbit" not in args
    assert "--realtime" not in cond.delayline_args(1, 1, realtime=False)
    for bad in ({"delay_ms": -1}, {"loss_pct": 100}, {"loss_pct": float("nan")},
                {"rate_mbit": 0}):
        with pytest.raises(ValueError):
            LinkCondition(**bad)


def test_path_condition_combines_independent_losses():
    path = linkemu.path_condition([LinkCondition(25, 1)] * 3)
    assert path["delay_ms"] == 75
    assert path["loss_pct"] == pytest.approx(100 * (1 - 0.99 ** 3))


class FakeHost:
    def __init__(self, *neighbors):
        self.interfaces = {n: object() for n in neighbors}


class FakeTestbed:
    hosts = {"c": FakeHost("p1"), "p1": FakeHost("c", "s"), "s": FakeHost("p1")}


def test_emulator_configuration_is_checked_before_anything_runs():
    emu = LinkEmulator(FakeTestbed())
    emu.add("c", "p1", LinkCondition(25, 1))
    emu.add("p1", "s", LinkCondition(50, 2), both_ways=False)
    assert emu.describe() == {"c->p1": "25 ms, 1% loss", "p1->c": "25 ms, 1% loss",
                              "p1->s": "50 ms, 2% loss"}
    with pytest.raises(LinkEmulationError, match="no link"):
        emu.add("c", "s", LinkCondition(1))
    with pytest.raises(LinkEmulationError, match="already"):
        emu.add("p1", "c", LinkCondition(1), both_ways=False)
    with pytest.raises(ValueError):
        LinkEmulator(FakeTestbed(), backend="tc")


def test_delayline_statistics_and_accuracy():
    line = ('{"received": 1000, "dropped": 10, "accepted": 990, "overflow": 0, '
            '"enobufs": 0, "kernel_queue_dropped": 0, "kernel_user_dropped": 0, '
            '"loss_pct": 1, "late_max_us": 300.0, "late_over_1ms": 0}')
    stats = linkemu.parse_delayline_stats("delayline: starting\n" + line + "\n")
    stats["direction"] = "c->p1"
    assert stats["dropped"] == 10
    assert "error" in linkemu.parse_delayline_stats("")
    (acc,) = linkemu.accuracy([stats])
    assert acc["loss_pct_seen"] == pytest.approx(1.0) and acc["overloaded"] is False
    # Packets the kernel dropped because the line fell behind: loss beyond the setting.
    (acc,) = linkemu.accuracy([{**stats, "kernel_queue_dropped": 3}])
    assert acc["overloaded"] is True and acc["extra_drops"] == 3
    # -1: the line could not read the kernel's counters; not a drop.
    (acc,) = linkemu.accuracy([{**stats, "kernel_user_dropped": -1}])
    assert acc["overloaded"] is False


# ------------------------------------------------------------------ probes

def test_probe_summary_counts_loss_reordering_and_delay():
    ms = 1_000_000
    arrivals = [(0, 25 * ms), (1, 26 * ms), (3, 25 * ms), (2, 27 * ms), (3, 30 * ms)]
    out = probe.summarize(5, arrivals, loss_pct_set=10, delay_ms_set=25)
    assert out["received"] == 4 and out["duplicates"] == 1
    assert out["loss_pct"] == 20 and out["loss_error"] == pytest.approx(1.0)
    assert out["reordered"] == 1                         # 2 came after 3
    assert out["delay_ms"] == 26 and out["delay_min_ms"] == 25 and out["delay_max_ms"] == 30
    assert out["delay_error_ms"] == 1
    empty = probe.summarize(3, [])
    assert empty["loss_pct"] == 100 and empty["delay_ms"] is None


def test_probe_spec_allows_for_sampling_noise_only():
    def row(loss_seen, loss_set, sent=40000, delay=25.2, reordered=0):
        return {"delay_ms": delay, "delay_ms_set": 25, "reordered": reordered,
                "loss_pct": loss_seen, "loss_pct_set": loss_set, "sent": sent}
    assert probe.within_spec(row(1.05, 1))
    assert not probe.within_spec(row(1.3, 1))            # 30% off with 40000 probes
    assert probe.within_spec(row(1.3, 1, sent=1000))     # within 3 sigma of 1000 probes
    assert not probe.within_spec(row(1.0, 1, delay=26.5))
    assert not probe.within_spec(row(1.0, 1, reordered=2))
    assert not probe.within_spec(row(0.1, 0))            # loss where none was set


# ------------------------------------------------------------------ TCP statistics

SNMP = """Ip: Forwarding DefaultTTL
Ip: 1 64
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens InSegs OutSegs RetransSegs
Tcp: 1 200 120000 -1 5 6 1000 2000 40
"""
NETSTAT = """TcpExt: SyncookiesSent TCPLossProbes TCPTimeouts TCPSackRecovery
TcpExt: 0 7 2 11
IpExt: InNoRoutes InOctets
IpExt: 0 12345
"""


def test_counters_parse_and_subtract():
    before = tcpstats.parse_counters(SNMP, NETSTAT)
    assert before["Tcp.RetransSegs"] == 40 and before["TcpExt.TCPLossProbes"] == 7
    assert before["Tcp.MaxConn"] == -1 and before["IpExt.InOctets"] == 12345
    after = dict(before, **{"Tcp.RetransSegs": 52, "Tcp.OutSegs": 2600})
    d = tcpstats.delta(before, after)
    assert d["Tcp.RetransSegs"] == 12 and d["Tcp.OutSegs"] == 600
    assert d["TcpExt.TCPFastRetrans"] == 0               # absent on both sides: 0
    assert tcpstats.retransmit_share(d) == pytest.approx(2.0)
    assert tcpstats.retransmit_share({}) is None


SS = """ESTAB 0 0 [fd00:d::1]:80 [fd00:c::1]:41000
\t skmem:(r0,rb131072,t0,tb4194304,f0,w946090,o0,bl0,d0) cubic wscale:7,7 rto:304 rtt:101.5/0.3 mss:8928 cwnd:103 ssthresh:93 retrans:0/12 delivery_rate 54.3Mbps unacked:66 rcv_space:56608 notsent:102442
ESTAB 0 0 [fd00:c::1]:41000 [fd00:d::1]:80
\t skmem:(r1024,rb6291456,t0,tb87040,f0,w0,o0,bl0,d0) cubic rtt:50.3/1 mss:8928 cwnd:15 delivery_rate 710952bps rcv_space:967722
ESTAB 0 0 [fd00:c::1]:41002 [fd00:d::1]:80
\t cubic rtt:49.7/1 mss:8928 cwnd:17 delivery_rate 1.5Gbps rcv_space:900000
"""


def test_ss_output_is_summarized_per_leg():
    sockets = tcpstats.parse_ss(SS)
    assert len(sockets) == 3
    first = sockets[0]
    assert first["rtt_ms"] == 101.5 and first["cwnd"] == 103 and first["retrans"] == 12
    assert first["delivery_rate"] == pytest.approx(54.3e6)
    assert first["wmem_queued"] == 946090 and first["rmem_alloc"] == 0
    legs = tcpstats.summarize_legs(sockets, 80)
    assert legs["to_client"]["connections"] == 1 and legs["to_client"]["cwnd"] == 103
    assert legs["to_server"]["connections"] == 2
    assert legs["to_server"]["rtt_ms"] == pytest.approx(50.0)
    assert legs["to_server"]["delivery_rate"] == pytest.approx((710952 + 1.5e9) / 2)
    assert tcpstats.port_of("[fd00::1]:443") == 443


# ------------------------------------------------------------------ middlebox cost

PROC_STAT = """cpu  300 0 200 1000 10 0 50 5 0 0
cpu0 100 0 100 500 5 0 20 0 0 0
cpu1 200 0 100 500 5 0 30 5 7 0
intr 12345
"""


def test_proc_stat_busy_and_softirq_ticks():
    ticks = cost.parse_proc_stat(PROC_STAT)
    assert set(ticks) == {"cpu0", "cpu1"}               # the "cpu" total line is left out
    assert ticks["cpu0"] == {"busy": 220, "softirq": 20}
    # steal counts as busy (not ours to use), guest is already inside user
    assert ticks["cpu1"] == {"busy": 335, "softirq": 30}


def test_cpu_lists_and_deltas():
    assert cost.cpu_names("1") == ["cpu1"]
    assert cost.cpu_names("0-1") == ["cpu0", "cpu1"]
    assert cost.cpu_names("0,2-3") == ["cpu0", "cpu2", "cpu3"]
    before = {"cpu0": {"busy": 100, "softirq": 10}, "cpu1": {"busy": 50, "softirq": 0}}
    after = {"cpu0": {"busy": 100 + cost.CLK_TCK, "softirq": 10},
             "cpu1": {"busy": 50 + 2 * cost.CLK_TCK, "softirq": cost.CLK_TCK // 2}}
    d = cost.cpu_delta(before, after)
    assert d["cpu0"] == {"busy": 1.0, "softirq": 0.0}
    assert d["cpu1"] == {"busy": 2.0, "softirq": pytest.approx(0.5, abs=0.01)}
    # a process started meanwhile counts from zero, one that exited is lost
    assert cost.process_delta({"1": 10, "2": 5}, {"1": 30, "3": 7}) == 27


def test_cost_fields_pinned_and_unpinned():
    cpus = {"cpu0": {"busy": 3.0, "softirq": 1.0}, "cpu1": {"busy": 2.0, "softirq": 0.5}}
    pinned = cost.cost_fields(0.8, cpus, "1", 5.0)
    assert pinned["proxy_cpu_seconds"] == 0.8
    assert pinned["box_cpu_seconds"] == 2.0 and pinned["box_softirq_seconds"] == 0.5
    assert pinned["box_scope"] == "middlebox"
    free = cost.cost_fields(0.8, cpus, None, 5.0)
    assert free["box_cpu_seconds"] == 5.0 and free["box_scope"] == "all CPUs"


def test_costs_are_per_request_or_per_gb():
    assert cost.unit("wrk-1KB-close") == "request"
    assert cost.unit("wrk-100KB-keepalive") == "request"
    assert cost.unit("wrk-10MB-close") == "GB"
    assert cost.unit("iperf3-4streams") == "GB" and cost.unit("blast-1stream") == "GB"
    short = {"requests": 10_000, "bytes": 10**7, "proxy_cpu_seconds": 1.0,
             "box_cpu_seconds": 1.5, "box_softirq_seconds": 0.5}
    assert cost.per_unit(short, "wrk-1KB-close") == pytest.approx(
        {"proxy": 100.0, "box": 150.0, "softirq": 50.0})           # µs per request
    bulk = dict(short, bytes=4 * 10**9)
    assert cost.per_unit(bulk, "iperf3-1stream") == pytest.approx(
        {"proxy": 0.25, "box": 0.375, "softirq": 0.125})           # CPU-s per GB
    assert cost.per_unit({"error": "x"}, "iperf3-1stream") is None
    assert cost.per_unit(dict(bulk, bytes=None), "iperf3-1stream") is None
    assert cost.per_unit({"bits_per_second": 1}, "iperf3-1stream") is None   # not measured
    samples = [dict(bulk, proxy_cpu_seconds=x) for x in (1.0, 3.0, 2.0)]
    assert cost.median_cost(samples, "wrk-10MB-close")["proxy"] == pytest.approx(0.5)
    assert cost.median_cost([{"error": "x"}], "wrk-10MB-close") is None


def test_report_has_a_cost_table_per_mtu():
    def sample_with_cost(bps, proxy, box):
        return {"bits_per_second": bps, "requests": 1000, "bytes": 10**9,
                "proxy_cpu_seconds": proxy, "box_cpu_seconds": box,
                "box_softirq_seconds": box / 2, "box_scope": "middlebox"}
    cells = report.summarize([
        {"mtu": 9000, "workload": "wrk-1KB-close", "mode": "router",
         "samples": [sample_with_cost(1e8, 0.0, 0.1)]},
        {"mtu": 9000, "workload": "wrk-1KB-close", "mode": "haproxy",
         "samples": [sample_with_cost(5e7, 0.066, 0.2)]},
        {"mtu": 9000, "workload": "iperf3-1stream", "mode": "haproxy",
         "samples": [sample_with_cost(5e9, 0.28, 0.5)]},
    ])
    results = {"started": "now", "host": {"kernel": "k", "cpus": 2}, "testbed": "t",
               "settings": {"modes": ["router", "haproxy"], "mtus": [9000],
                            "pinning": pinning.PINNINGS["split"].as_dict(),
                            "repetitions": 1, "seconds": 5, "wrk": "-t 2 -c 50"},
               "cells": cells, "notes": []}
    text = report.markdown(results)
    assert "| wrk-1KB-close | request | 100 µs (50 µs) | 66 µs | 200 µs (100 µs) |" in text
    assert "| iperf3-1stream | GB | - | 0.28 s | 0.50 s (0.25 s) |" in text


def test_unpinned_runs_nothing_under_taskset():
    free = pinning.PINNINGS["unpinned"]
    assert free.taskset(free.client_cpus) == [] and free.taskset(free.middlebox_cpus) == []
    assert free.rps is None
    assert "client on any CPU" in pinning.pinning_note(free.as_dict())


def test_raw_data_settings_name_no_checkout_path():
    import argparse

    args = argparse.Namespace(rate=20000, seconds=20.0, out="/some/checkout/bench/flood-data")
    assert report.run_settings(args) == {"rate": 20000, "seconds": 20.0}


def test_save_raw_names_the_file_after_the_run_start(tmp_path):
    path = report.save_raw({"started": "2026-12-02T12:15:29", "x": 1}, str(tmp_path / "d"), "flood")
    assert path == str(tmp_path / "d" / "flood-2026-12-02T121529.json")
    with open(path) as handle:
        assert json.load(handle) == {"started": "2026-12-02T12:15:29", "x": 1}
