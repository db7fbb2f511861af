"""Medians, ratios, the 0.9x target, markdown and the Fig. 9 plot for run_functions.py.

A cell is one case of a figure (``mode``) with its samples; ``role`` says whether it is a
baseline of its figure (``router``: plain routers, ``identity``: pipesd with the identity
function) or a function measured against them.
"""
import statistics

from . import report
from .report import disturbed, fmt_rate, median_sample, usable

FIGURE_TITLES = {
    "fig9": "Fig. 9: one proxy, xor-passes (c - p1 - s)",
    "fig11": "Fig. 11: two proxies in a chain (c - p1 - p2 - s)",
}


def summarize(cells):
    """Add ``median``, ``spread``, ``disturbed``, ``ratio_to_router``, ``ratio_to_identity``
    and ``per_repetition`` (rate and ratio to identity of each repetition) to each cell."""
    for cell in cells:
        med = median_sample(cell["samples"])
        values = [s["bits_per_second"] for s in usable(cell["samples"])]
        cell["median"] = med
        cell["disturbed"] = bool(med) and disturbed(med)
        cell["spread"] = (max(values) / min(values) - 1) if len(values) > 1 and min(values) else None
        cell["per_repetition"] = per_repetition(cell["samples"])
    for cell in cells:
        base = {role: next((c for c in cells if c["figure"] == cell["figure"]
                            and c["role"] == role), None) for role in ("router", "identity")}
        for role, other in base.items():
            key = f"ratio_to_{role}"
            cell[key] = ratio(cell.get("median"), other.get("median") if other else None)
            if role == "identity" and other is not None:
                for rep, value in cell["per_repetition"].items():
                    ref = other["per_repetition"].get(rep, {}).get("bits_per_second")
                    value["ratio_to_identity"] = (value["bits_per_second"] / ref) if ref else None
    return cells


def per_repetition(samples):
    """{repetition: {"bits_per_second": the median of its usable samples}} (a disturbed
    sample re-run gives a repetition two samples)."""
    out = {}
    for rep in sorted({s.get("repetition") for s in samples if "repetition" in s}):
        values = [s["bits_per_second"] for s in usable([s for s in samples
                                                        if s.get("repetition") == rep])
                  if "bits_per_second" in s]
        if values:
            out[rep] = {"bits_per_second": statistics.median_low(values)}
    return out


def ratio(sample, base):
    if not sample or not base or not base.get("bits_per_second"):
        return None
    return sample["bits_per_second"] / base["bits_per_second"]


def target(cells, passes_n, threshold):
    """Is xor-passes with ``passes_n`` (2n passes) at least ``threshold`` x identity?

    Judged on the ratio of the medians; the per-repetition ratios (same repetition, so
    closer in time) are reported beside it. ``met`` is None when a cell is missing.
    """
    fig9 = {c["passes_n"]: c for c in cells if c["figure"] == "fig9" and c["passes_n"]}
    out = {"passes_n": passes_n, "passes": 2 * passes_n, "threshold": threshold,
           "ratio_to_identity": None, "per_repetition": [], "met": None, "others": {}}
    cell = fig9.get(passes_n)
    if cell is not None and cell.get("ratio_to_identity") is not None:
        out["ratio_to_identity"] = cell["ratio_to_identity"]
        out["per_repetition"] = [v.get("ratio_to_identity")
                                 for _, v in sorted(cell["per_repetition"].items())]
        out["met"] = cell["ratio_to_identity"] >= threshold
    for n, other in sorted(fig9.items()):
        if n != passes_n and other.get("ratio_to_identity") is not None:
            out["others"][n] = other["ratio_to_identity"]
    return out


def target_text(t):
    if t["met"] is None:
        return (f"**Target** (xor-passes n={t['passes_n']}, {t['passes']} passes, >= "
                f"{t['threshold']}x pipesd identity): not measured")
    reps = ", ".join(f"{r:.2f}" for r in t["per_repetition"] if r is not None)
    text = (f"**Target** (xor-passes n={t['passes_n']}, {t['passes']} passes, >= "
            f"{t['threshold']}x pipesd identity): **{'met' if t['met'] else 'NOT met'}**, "
            f"{t['ratio_to_identity']:.2f}x identity (ratio of medians"
            + (f"; per repetition: {reps}" if reps else "") + ")")
    others = {int(n): r for n, r in t["others"].items()}    # str keys once read from JSON
    if 2 in others:
        text += f". n=2 (4 passes): {others[2]:.2f}x identity"
    return text + "."


def fmt_ratio(value):
    return f"{value:.2f}" if value is not None else "-"


def fmt_runs(cell):
    """Every sample in Gb/s, in the order run: * disturbed, ! failed."""
    parts = []
    for s in cell["samples"]:
        if "error" in s:
            parts.append("!")
        else:
            parts.append(f"{s['bits_per_second'] / 1e9:.2f}" + ("*" if disturbed(s) else ""))
    return " ".join(parts) or "-"


def fmt_busy(cell):
    """Busy fraction of each CPU during the median run: which core was the bottleneck."""
    busy = (cell.get("median") or {}).get("cpu_busy") or {}
    return " / ".join(f"{busy[k]:.0%}" for k in sorted(busy, key=lambda k: int(k[3:]))) or "-"


def fmt_cell_value(cell):
    med = cell.get("median")
    if med is None:
        return "failed"
    return fmt_rate(med["bits_per_second"]) + (" (disturbed)" if cell.get("disturbed") else "")


def markdown(results):
    st, host = results["settings"], results["host"]
    cells = results["cells"]
    machine = (f"Kernel {host['kernel']}, {host['cpus']} CPUs"
               + (f" ({host['cpu_model']})" if host.get("cpu_model") else "")
               + (f", {host['memory']}" if host.get("memory") else ""))
    lines = [f"# SRv6Pipes functions: paper Fig. 9 and Fig. 11, {results['started']}", "",
             f"{machine}, pinning `{st['pinning']['name']}`, {st['repetitions']} run(s) per "
             f"case (median), {st['seconds']} s per load run, workload `{st['workload']}` "
             f"(one TCP stream c -> s), MTU {st['mtu']}, pipesd --workers {st['workers']}. "
             f"Testbed: {results['testbed']}. Ratios: median / median of the baseline in "
             f"the same run, on bits per second. Busy: each CPU during the median run (which "
             f"core was the bottleneck; see the pinning note). Runs: every sample in Gb/s "
             f"(* disturbed, ! failed). Run time {results.get('elapsed_seconds', '?')} s.", ""]
    busy_header = "busy CPU 0 / 1"
    fig9 = [c for c in cells if c["figure"] == "fig9"]
    if fig9:
        lines += [f"## {FIGURE_TITLES['fig9']}", "",
                  "| p1 | XOR passes per chunk | throughput | x router | x identity | "
                  f"{busy_header} | runs |",
                  "|---|---|---|---|---|---|---|"]
        for c in fig9:
            passes = {"router": "- (kernel forwarding)", "identity": "0 (splice)"}.get(
                c["role"], str(2 * c["passes_n"]) if c["passes_n"] else "?")
            lines.append(f"| {c['mode']} | {passes} | {fmt_cell_value(c)} | "
                         f"{fmt_ratio(c['ratio_to_router'])} | "
                         f"{fmt_ratio(c['ratio_to_identity'])} | {fmt_busy(c)} | "
                         f"{fmt_runs(c)} |")
        lines += ["", target_text(results["target"]), ""]
    fig11 = [c for c in cells if c["figure"] == "fig11"]
    if fig11:
        key = st["xor_key"]
        lines += [f"## {FIGURE_TITLES['fig11']}", "",
                  f"`2-pipesd-xor{key}`: p1 and p2 both XOR with key {key}: s receives what c "
                  "sent, c what s sent.", "",
                  f"| p1, p2 | throughput | x 2 routers | x 2 identity | {busy_header} | runs |",
                  "|---|---|---|---|---|---|"]
        for c in fig11:
            lines.append(f"| {c['mode']} | {fmt_cell_value(c)} | "
                         f"{fmt_ratio(c['ratio_to_router'])} | "
                         f"{fmt_ratio(c['ratio_to_identity'])} | {fmt_busy(c)} | "
                         f"{fmt_runs(c)} |")
        lines.append("")
    notes = results.get("notes") or []
    if notes:
        lines += ["## Notes", ""] + [f"* {n}" for n in notes] + [""]
    return "\n".join(lines)


def write(results, json_path, md_path):
    return report.write(results, json_path, md_path, render=markdown)


def plot_fig9(results, path):
    """Throughput against n (2n passes), with the router and identity as horizontal lines
    (shaded: their runs' range) and the 0.9x identity target. Returns the path, or None
    without matplotlib or without Fig. 9 numbers."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cells = [c for c in results["cells"] if c["figure"] == "fig9"]
    points = sorted((c["passes_n"], c) for c in cells if c["passes_n"] and c["median"])
    if not points:
        return None
    st = results["settings"]

    def gbps(cell):
        values = [s["bits_per_second"] / 1e9 for s in usable(cell["samples"])]
        return cell["median"]["bits_per_second"] / 1e9, min(values), max(values)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for role, color, label in (("router", "tab:gray", "router (p1 forwards)"),
                               ("identity", "tab:blue", "pipesd identity (splice)")):
        cell = next((c for c in cells if c["role"] == role and c["median"]), None)
        if cell is None:
            continue
        med, lo, hi = gbps(cell)
        ax.axhline(med, color=color, linestyle="--", label=f"{label}: {med:.2f} Gb/s")
        ax.axhspan(lo, hi, color=color, alpha=0.12)
        if role == "identity":
            ax.axhline(med * 0.9, color=color, linestyle=":", linewidth=1,
                       label="0.9x identity (target for n=1)")
    ns = [n for n, _ in points]
    stats = [gbps(c) for _, c in points]
    meds = [m for m, _, _ in stats]
    ax.errorbar(ns, meds, yerr=[[m - lo for m, lo, _ in stats], [hi - m for m, _, hi in stats]],
                marker="o", color="tab:red", capsize=3,
                label="pipesd xor-passes (median, bars: min-max)")
    if max(ns) / min(ns) > 16:      # e.g. --passes 1,2,4,...,128: doublings evenly spaced
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
    ax.set_xticks(ns)
    ax.set_xticklabels([f"{n}\n({2 * n})" for n in ns])
    ax.set_xlabel("n (XOR passes per chunk: 2n)")
    ax.set_ylabel("throughput (Gbit/s)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Fig. 9 reproduction: 1 {st['workload'].split('-')[0]} stream, "
                 f"MTU {st['mtu']}, {st['repetitions']} run(s), pinning {st['pinning']['name']}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
