"""The paper's evaluation figures as data: which testbed, which middleboxes, which links
are long and lossy, which workloads (used by bench/run_paper.py); and their summary:
medians, ratios to the router of the same panel, CSV rows.

A *case* is one bar group of a figure: a mode of the middleboxes on a testbed (``panel``
names the topology), optionally with emulated links, and the workloads measured on it. A
*cell* is one (case, workload) with its samples. Ratios compare cells of the same figure,
panel and workload: ``ratio_to_router`` against the cell whose role is ``router``,
``ratio_to_identity`` against ``identity`` (pipesd with the identity function).
"""
import statistics
from dataclasses import dataclass
from typing import Callable, Optional

from .linkemu import LinkCondition, path_condition
from .modes import HAProxy, Pipesd, PipesdChain, Router
from .report import disturbed, median_sample, usable
from .workloads import Workload

SIZES = ("1KB", "10KB", "100KB", "1MB", "10MB")
SIZE_BYTES = {"1KB": 1024, "10KB": 10 * 1024, "100KB": 100 * 1024, "1MB": 1024 ** 2,
              "10MB": 10 * 1024 ** 2}
ONE_PROXY = "c - p1 - s"
CHAIN = "c - p1 - p2 - s"
FIGURES = ("6", "7", "8", "9", "11")

# Paper V-B: netem on every link, 1% loss and 25 ms each (Fig. 7); only between the proxy
# and the server, 2% and 50 ms (Fig. 8). Here each direction of a link gets the setting.
FIG7_LINK = LinkCondition(delay_ms=25, loss_pct=1)
FIG8_LINK = LinkCondition(delay_ms=50, loss_pct=2)

TITLES = {
    "fig6": "Fig. 6: throughput against file size (wrk), router vs proxy",
    "fig7": "Fig. 7: 1% loss and 25 ms on every link",
    "fig8": "Fig. 8: 2% loss and 50 ms only between proxy and server",
    "fig9": "Fig. 9: a function making 2n XOR passes (one bulk stream)",
    "fig11": "Fig. 11: two chained XOR proxies against two routers",
}


@dataclass(frozen=True)
class Case:
    figure: str                         # "fig6" ... "fig11"
    panel: str                          # the topology: ONE_PROXY or CHAIN
    name: str                           # the mode's name, unique within figure and panel
    role: str                           # "router", "identity", "haproxy" or "function"
    proxies: int                        # middleboxes in the line testbed
    make: Callable[[], object]          # -> a lab.modes.Mode
    workloads: tuple
    links: tuple = ()                   # ((a, b, LinkCondition), ...) both directions each
    passes_n: Optional[int] = None      # Fig. 9: xor-passes n

    def label(self):
        return f"{self.figure} {self.name} on {self.panel}"


@dataclass
class FigurePlan:
    """The settings the figures are built from (bench/run_paper.py fills them in)."""
    sizes: tuple = SIZES
    passes: tuple = (1, 2, 4, 8)
    xor_key: int = 42
    passes_key: int = 42
    workers: int = 2
    connections: int = 50
    # wrk -c on the long lossy paths: few enough that every delay line stays well below
    # its ceiling (see bench/README.md); what a proxy changes is per connection anyway.
    lossy_connections: int = 10
    lossy_timeout: int = 120            # wrk --timeout on long lossy paths (s)


def wrk(size, keepalive, plan, timeout=5, connections=None):
    kind = "keepalive" if keepalive else "close"
    return Workload(f"wrk-{size}-{kind}", "wrk",
                    {"file": size, "keepalive": keepalive,
                     "connections": connections or plan.connections, "timeout": timeout})


def blast():
    return Workload("blast-1stream", "blast", {"streams": 1})


def fig6_cases(plan):
    """Paper Fig. 6: wrk against lighttpd, keep-alive and one connection per request, for
    every file size; p1 a router, pipesd identity, HAProxy."""
    loads = tuple(wrk(size, True, plan) for size in plan.sizes) + tuple(
        wrk(size, False, plan) for size in plan.sizes)
    w = plan.workers
    return [Case("fig6", ONE_PROXY, "router", "router", 1, Router, loads),
            Case("fig6", ONE_PROXY, "pipesd-identity", "identity", 1,
                 lambda: Pipesd("identity", workers=w), loads),
            Case("fig6", ONE_PROXY, "haproxy", "haproxy", 1, HAProxy, loads)]


def lossy_cases(figure, plan, one_proxy_links, chain_links=None):
    """Router against pipesd identity with long lossy links, wrk keep-alive per size (the
    paper's wrk kept its connections): on c - p1 - s, and on the chain when given."""
    loads = tuple(wrk(size, True, plan, timeout=plan.lossy_timeout,
                      connections=plan.lossy_connections) for size in plan.sizes)
    w = plan.workers
    cases = [Case(figure, ONE_PROXY, "router", "router", 1, Router, loads, one_proxy_links),
             Case(figure, ONE_PROXY, "pipesd-identity", "identity", 1,
                  lambda: Pipesd("identity", workers=w), loads, one_proxy_links)]
    if chain_links:
        cases += [Case(figure, CHAIN, "2-routers", "router", 2,
                       lambda: Router(("p1", "p2"), name="2-routers"), loads, chain_links),
                  Case(figure, CHAIN, "2-pipesd-identity", "identity", 2,
                       lambda: chain(plan, "identity", 0, "2-pipesd-identity"), loads,
                       chain_links)]
    return cases


def fig7_cases(plan):
    one = (("c", "p1", FIG7_LINK), ("p1", "s", FIG7_LINK))
    two = (("c", "p1", FIG7_LINK), ("p1", "p2", FIG7_LINK), ("p2", "s", FIG7_LINK))
    return lossy_cases("fig7", plan, one, two)


def fig8_cases(plan):
    return lossy_cases("fig8", plan, (("p1", "s", FIG8_LINK),))


def fig9_cases(plan):
    """Paper Fig. 9: one bulk stream through p1 as a router, pipesd identity, and pipesd
    xor-passes for each n (2n in-place passes per chunk, net identity)."""
    w, load = plan.workers, (blast(),)
    cases = [Case("fig9", ONE_PROXY, "router", "router", 1, Router, load),
             Case("fig9", ONE_PROXY, "pipesd-identity", "identity", 1,
                  lambda: Pipesd("identity", workers=w), load)]
    for n in plan.passes:
        name = f"pipesd-xor-passes-n{n}"
        params = (plan.passes_key << 8) | n
        cases.append(Case("fig9", ONE_PROXY, name, "function", 1,
                          lambda name=name, params=params: Pipesd("xor-passes", params, w,
                                                                  name=name),
                          load, passes_n=n))
    return cases


def chain(plan, function, params, name):
    return PipesdChain([Pipesd(function, params, plan.workers, host=h, name=name)
                        for h in ("p1", "p2")], name=name)


def fig11_cases(plan):
    """Paper Fig. 11: wrk (keep-alive, every size) through two routers, two pipesd identity
    and two pipesd XORing with the same key (net identity); one bulk stream as well."""
    loads = tuple(wrk(size, True, plan) for size in plan.sizes) + (blast(),)
    key = plan.xor_key
    return [Case("fig11", CHAIN, "2-routers", "router", 2,
                 lambda: Router(("p1", "p2"), name="2-routers"), loads),
            Case("fig11", CHAIN, "2-pipesd-identity", "identity", 2,
                 lambda: chain(plan, "identity", 0, "2-pipesd-identity"), loads),
            Case("fig11", CHAIN, f"2-pipesd-xor{key}", "function", 2,
                 lambda: chain(plan, "xor", key, f"2-pipesd-xor{key}"), loads)]


CASES = {"6": fig6_cases, "7": fig7_cases, "8": fig8_cases, "9": fig9_cases,
         "11": fig11_cases}


def cases_for(figure, plan):
    return CASES[figure](plan)


def link_settings(cases):
    """What the figure's links do, per panel: each link's condition and the resulting
    one-way path (delay summed, independent losses combined) and round-trip time."""
    out = {}
    for case in cases:
        if case.panel in out:
            continue
        conds = [cond for _, _, cond in case.links]
        path = path_condition(conds)
        out[case.panel] = {
            "links": {f"{a} - {b}": cond.describe() + " (each direction)"
                      for a, b, cond in case.links},
            "one_way_delay_ms": path["delay_ms"], "one_way_loss_pct": round(path["loss_pct"], 3),
            "round_trip_ms": 2 * path["delay_ms"],
            "round_trip_loss_pct": round(path_condition(conds + conds)["loss_pct"], 3),
        }
    return out


# ------------------------------------------------------------------ summary

def size_of(workload):
    """"1MB" from "wrk-1MB-keepalive" (None for other workloads)."""
    parts = workload.split("-")
    return parts[1] if parts[0] == "wrk" and len(parts) == 3 else None


def per_repetition(samples):
    """{repetition: median bits/s of its usable samples} (a disturbed sample re-run gives
    a repetition two samples)."""
    out = {}
    for rep in sorted({s.get("repetition") for s in samples if s.get("repetition")}):
        values = [s["bits_per_second"] for s in usable([s for s in samples
                                                        if s.get("repetition") == rep])
                  if "bits_per_second" in s]
        if values:
            out[rep] = statistics.median_low(values)
    return out


def summarize(cells):
    """Add to every cell: ``median`` (the median sample), ``spread`` (max/min - 1 of the
    usable samples), ``disturbed``, ``per_repetition``, and for each baseline role
    (router, identity) ``ratio_to_<role>`` (median over the baseline's median in the same
    figure, panel and workload) with ``ratio_to_<role>_per_repetition`` (same-repetition
    ratios). Returns the cells."""
    for cell in cells:
        med = median_sample(cell["samples"])
        values = [s["bits_per_second"] for s in usable(cell["samples"]) if "bits_per_second" in s]
        cell["median"] = med
        cell["disturbed"] = bool(med) and disturbed(med)
        cell["spread"] = (max(values) / min(values) - 1) if len(values) > 1 and min(values) else None
        cell["per_repetition"] = per_repetition(cell["samples"])
    index = {(c["figure"], c["panel"], c["workload"], c["role"]): c for c in cells}
    for cell in cells:
        for role in ("router", "identity"):
            base = index.get((cell["figure"], cell["panel"], cell["workload"], role))
            key = f"ratio_to_{role}"
            if base is None or not cell["median"] or not base["median"] \
                    or not base["median"]["bits_per_second"]:
                cell[key], cell[key + "_per_repetition"] = None, {}
                continue
            cell[key] = cell["median"]["bits_per_second"] / base["median"]["bits_per_second"]
            cell[key + "_per_repetition"] = {
                rep: value / base["per_repetition"][rep]
                for rep, value in cell["per_repetition"].items()
                if base["per_repetition"].get(rep)}
    return cells


def target(cells, figure, panel_role, workloads, threshold, baseline="router"):
    """Does every cell of ``panel_role`` (role) in ``figure`` reach ``threshold`` x the
    baseline, for each of ``workloads``? Returns {"threshold", "baseline", "ratios":
    {panel: {workload: ratio}}, "met"} (met: None when a ratio is missing)."""
    ratios, met = {}, True
    for c in cells:
        if c["figure"] != figure or c["role"] != panel_role or c["workload"] not in workloads:
            continue
        value = c.get(f"ratio_to_{baseline}")
        ratios.setdefault(c["panel"], {})[c["workload"]] = value
        if value is None:
            met = None
        elif met is not None and value < threshold:
            met = False
    if not ratios:
        met = None
    return {"threshold": threshold, "baseline": baseline, "ratios": ratios, "met": met}


CSV_COLUMNS = ("figure", "panel", "workload", "size", "mode", "role", "runs",
               "median_mbps", "min_mbps", "max_mbps", "requests_per_second",
               "latency_p50_ms",
               "ratio_to_router", "ratio_to_identity", "retransmit_pct_middlebox",
               "disturbed")


def csv_rows(cells):
    """One row per cell (the plotted numbers), columns :data:`CSV_COLUMNS`."""
    rows = []
    for c in cells:
        values = [s["bits_per_second"] for s in usable(c["samples"]) if "bits_per_second" in s]
        med = c.get("median") or {}
        rows.append({
            "figure": c["figure"], "panel": c["panel"], "workload": c["workload"],
            "size": size_of(c["workload"]) or "", "mode": c["mode"], "role": c["role"],
            "runs": len(values),
            "median_mbps": _round(med.get("bits_per_second"), 1e6),
            "min_mbps": _round(min(values) if values else None, 1e6),
            "max_mbps": _round(max(values) if values else None, 1e6),
            "requests_per_second": _round(med.get("requests_per_second"), 1),
            "latency_p50_ms": _round(med.get("latency_p50_ms"), 1),
            "ratio_to_router": _round(c.get("ratio_to_router"), 1, 3),
            "ratio_to_identity": _round(c.get("ratio_to_identity"), 1, 3),
            "retransmit_pct_middlebox": _round(med.get("middlebox_retransmit_pct"), 1, 3),
            "disturbed": bool(c.get("disturbed")),
        })
    return rows


def _round(value, unit, digits=2):
    return None if value is None else round(value / unit, digits)
