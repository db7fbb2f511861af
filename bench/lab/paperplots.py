"""The PNG plots of bench/run_paper.py: throughput against file size (Fig. 6, 7, 8, 11),
and Fig. 9 (through figures.plot_fig9). Each takes a figure's summarized results (see
paperfigs.summarize) and a path; returns the path, or None without matplotlib or data.
"""
from . import figures
from .paperfigs import CHAIN, ONE_PROXY, SIZE_BYTES, size_of
from .report import usable

STYLE = {   # role -> (color, marker, label)
    "router": ("tab:gray", "s", "router"),
    "identity": ("tab:blue", "o", "pipesd identity"),
    "haproxy": ("tab:green", "^", "HAProxy"),
    "function": ("tab:red", "D", "pipesd xor"),
}


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _subtitle(results):
    st, host = results["settings"], results["host"]
    cc = (st.get("tcp") or {}).get("net.ipv4.tcp_congestion_control", "?")
    return (f"{st['repetitions']} run(s) of {st['seconds']} s per point (median, bars: "
            f"min-max), {st['wrk']}, MTU {st['mtu']}, TCP {cc}, pinning {st['pinning']['name']}, "
            f"{host['cpus']} vCPUs, Linux {host['kernel'].split('-')[0]}, {results['started'][:10]}")


def _size_axis(ax, sizes):
    ax.set_xscale("log")
    ax.set_xticks([SIZE_BYTES[s] for s in sizes])
    ax.set_xticklabels(sizes)
    ax.minorticks_off()
    ax.set_xlabel("file size")


def plot_sizes(ax, cells, panel, kind, unit=1e9, annotate=None, log_y=False):
    """One line per mode of ``panel``: median throughput (bars: min-max of the runs)
    against file size, for the wrk workloads of ``kind`` (keepalive / close).
    ``annotate``: the role whose points get their ratio to the router written above."""
    sizes = []
    modes = []
    lowest = None
    for c in cells:
        if c["panel"] == panel and c["workload"].endswith("-" + kind) and c["median"]:
            if c["mode"] not in modes:
                modes.append(c["mode"])
            if size_of(c["workload"]) not in sizes:
                sizes.append(size_of(c["workload"]))
    sizes.sort(key=SIZE_BYTES.get)
    for mode in modes:
        points = sorted(((SIZE_BYTES[size_of(c["workload"])], c) for c in cells
                         if c["panel"] == panel and c["mode"] == mode and c["median"]
                         and c["workload"].endswith("-" + kind)), key=lambda p: p[0])
        if not points:
            continue
        role = points[0][1]["role"]
        color, marker, label = STYLE.get(role, ("black", "x", mode))
        if role == "function":
            label = mode.replace("2-pipesd-", "2 pipesd ")
        elif mode.startswith("2-"):
            label = "2 " + label + ("s" if role == "router" else "")
        xs, meds, lo, hi = [], [], [], []
        for x, c in points:
            values = [s["bits_per_second"] / unit for s in usable(c["samples"])]
            med = c["median"]["bits_per_second"] / unit
            xs.append(x)
            meds.append(med)
            lo.append(med - min(values))
            hi.append(max(values) - med)
        ax.errorbar(xs, meds, yerr=[lo, hi], color=color, marker=marker, capsize=3,
                    label=label)
        low = min(m - d for m, d in zip(meds, lo))
        lowest = low if lowest is None else min(lowest, low)
        if annotate == role:
            for (x, c), med in zip(points, meds):
                if c.get("ratio_to_router") is not None:
                    ax.annotate(f"{c['ratio_to_router']:.2f}x", (x, med),
                                textcoords="offset points", xytext=(0, -16), ha="center",
                                fontsize=7, color=color,
                                bbox={"boxstyle": "round,pad=0.15", "fc": "white",
                                      "ec": "none", "alpha": 0.8})
    if sizes:
        _size_axis(ax, sizes)
    if log_y:
        ax.set_yscale("log")
        if lowest:      # room below the lowest point for its ratio label
            ax.set_ylim(bottom=lowest / 2.2)
    else:
        ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    return bool(modes)


def _save(fig, path, plt):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_fig6(results, path):
    plt = _pyplot()
    if plt is None or not results["cells"]:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    for ax, kind, title in ((axes[0], "keepalive", "keep-alive (wrk default)"),
                            (axes[1], "close", "one connection per request")):
        plot_sizes(ax, results["cells"], ONE_PROXY, kind, annotate="identity", log_y=True)
        ax.set_title(f"c - p1 - s, {title}", fontsize=10)
        ax.set_ylabel("throughput (Gbit/s, log)")
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("Fig. 6 reproduction: wrk throughput, p1 router / pipesd identity / HAProxy "
                 "(labels: pipesd x router)\n" + _subtitle(results), fontsize=9)
    return _save(fig, path, plt)


def plot_lossy(results, path, title):
    """Fig. 7 and 8: router against pipesd identity per panel (log throughput axis:
    small files move little), each pipesd point labelled with its ratio to the router."""
    plt = _pyplot()
    if plt is None or not results["cells"]:
        return None
    panels = [p for p in (ONE_PROXY, CHAIN) if any(c["panel"] == p for c in results["cells"])]
    # At least 9.5 inches: the two-line title must fit over a single panel too.
    fig, axes = plt.subplots(1, len(panels), figsize=(max(9.5, 5.6 * len(panels)), 4.3),
                             squeeze=False)
    links = results["settings"].get("links", {})
    for ax, panel in zip(axes[0], panels):
        plot_sizes(ax, results["cells"], panel, "keepalive", unit=1e6, annotate="identity",
                   log_y=True)
        info = links.get(panel, {})
        ax.set_title(f"{panel}: RTT {info.get('round_trip_ms', '?'):g} ms, one-way loss "
                     f"{info.get('one_way_loss_pct', 0):.1f}%", fontsize=10)
        ax.set_ylabel("throughput (Mbit/s, log)")
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{title} (wrk keep-alive; labels: pipesd x router)\n" + _subtitle(results),
                 fontsize=9)
    return _save(fig, path, plt)


def plot_fig9(results, path):
    """figures.plot_fig9 on this run's Fig. 9 cells."""
    view = {"cells": results["cells"],
            "settings": {**results["settings"], "workload": "blast-1stream"}}
    return figures.plot_fig9(view, path)


def plot_fig11(results, path):
    plt = _pyplot()
    if plt is None or not results["cells"]:
        return None
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.3), gridspec_kw={"width_ratios": [3, 2]})
    plot_sizes(ax, results["cells"], CHAIN, "keepalive", annotate="function", log_y=True)
    ax.set_title("c - p1 - p2 - s, wrk keep-alive (labels: xor chain x 2 routers)",
                 fontsize=10)
    ax.set_ylabel("throughput (Gbit/s, log)")
    ax.legend(fontsize=8, loc="upper left")
    bulk = [c for c in results["cells"] if c["workload"] == "blast-1stream" and c["median"]]
    for i, c in enumerate(bulk):
        color = STYLE.get(c["role"], ("black",))[0]
        values = [s["bits_per_second"] / 1e9 for s in usable(c["samples"])]
        med = c["median"]["bits_per_second"] / 1e9
        bx.bar(i, med, color=color, alpha=0.8,
               yerr=[[med - min(values)], [max(values) - med]], capsize=3)
        if c.get("ratio_to_router") is not None:
            bx.annotate(f"{c['ratio_to_router']:.2f}x", (i, med), textcoords="offset points",
                        xytext=(8, 4), fontsize=8)
    bx.set_xticks(range(len(bulk)))
    bx.set_xticklabels([c["mode"].replace("2-pipesd-", "2 pipesd\n").replace("2-", "2 ")
                        for c in bulk], fontsize=8)
    bx.set_ylabel("throughput (Gbit/s)")
    bx.set_title("one bulk TCP stream (blast)", fontsize=10)
    bx.grid(alpha=0.3, axis="y")
    fig.suptitle("Fig. 11 reproduction: two chained proxies XORing with one key (net "
                 "identity) against two routers\n" + _subtitle(results), fontsize=9)
    return _save(fig, path, plt)


PLOTS = {
    "fig6": plot_fig6,
    "fig7": lambda r, p: plot_lossy(r, p, "Fig. 7 reproduction: 1% loss and 25 ms on every link"),
    "fig8": lambda r, p: plot_lossy(r, p, "Fig. 8 reproduction: 2% loss and 50 ms between p1 "
                                          "and s only"),
    "fig9": plot_fig9,
    "fig11": plot_fig11,
}
