"""Medians, ratios to the router of the same run, costs, JSON and markdown tables."""
import json
import os

from . import cost as costs


# A sample is "disturbed" when, during it, processes outside the lab used more than this
# many CPUs or other namespaces received more than this many Mb/s (see interference.py).
DISTURBED_CPUS = 0.15
DISTURBED_MBPS = 200


def disturbed(sample):
    return (sample.get("foreign_cpus", 0) > DISTURBED_CPUS
            or sample.get("foreign_net_mbps", 0) > DISTURBED_MBPS)


def usable(samples):
    """Samples without error; only the undisturbed ones when there are any."""
    ok = [s for s in samples if "error" not in s]
    calm = [s for s in ok if not disturbed(s)]
    return calm or ok


def median_sample(samples):
    """The sample holding the median primary metric (lower median for even counts)."""
    ok = sorted(usable(samples), key=lambda s: s["bits_per_second"])
    if not ok:
        return None
    return ok[(len(ok) - 1) // 2]


def summarize(cells):
    """Add ``median`` (sample), ``spread`` (max/min - 1), ``ratio_to_router`` and ``cost``
    (median cost per unit of work, see cost.py) to each cell."""
    by_key = {}
    for cell in cells:
        med = median_sample(cell["samples"])
        cell["median"] = med
        cell["cost_unit"] = costs.unit(cell["workload"])
        cell["cost"] = costs.median_cost(usable(cell["samples"]), cell["workload"])
        values = [s["bits_per_second"] for s in usable(cell["samples"])]
        cell["disturbed"] = bool(med) and disturbed(med)
        cell["spread"] = (max(values) / min(values) - 1) if len(values) > 1 and min(values) else None
        by_key[(cell["mtu"], cell["workload"], cell["mode"])] = cell
    for cell in cells:
        router = by_key.get((cell["mtu"], cell["workload"], "router"))
        if cell["median"] and router and router["median"]:
            cell["ratio_to_router"] = (cell["median"]["bits_per_second"]
                                       / router["median"]["bits_per_second"])
        else:
            cell["ratio_to_router"] = None
    return cells


def fmt_rate(bps):
    if bps >= 1e9:
        return f"{bps / 1e9:.2f} Gb/s"
    return f"{bps / 1e6:.0f} Mb/s"


def fmt_value(sample):
    if sample is None:
        return "failed"
    text = fmt_rate(sample["bits_per_second"])
    if "requests_per_second" in sample:
        rps = sample["requests_per_second"]
        text += f", {rps / 1000:.1f}k req/s" if rps >= 1000 else f", {rps:.0f} req/s"
    if sample.get("errors"):
        # A client error is a failed request (a reset or a cut response): the row failed,
        # whatever its speed.
        text = "FAILED (" + ", ".join(f"{k} {v}" for k, v in sample["errors"].items()) + \
            " client errors) " + text
    if disturbed(sample):
        text += " (disturbed)"
    return text


def markdown(results):
    """One table per MTU: workload, router, then each mode's value and ratio to router."""
    cells = results["cells"]
    modes = [m for m in results["settings"]["modes"] if m != "router"]
    st = results["settings"]
    lines = [f"# SRv6Pipes throughput lab, {results['started']}", "",
             f"Kernel {results['host']['kernel']}, {results['host']['cpus']} CPUs, pinning "
             f"`{st['pinning']['name']}`, {st['repetitions']} run(s) per cell (median), "
             f"{st['seconds']} s per load run, wrk {st['wrk']}. Testbed: {results['testbed']}. "
             f"Ratios: mode / router of the same run, on bits per second.", ""]
    for mtu in results["settings"]["mtus"]:
        lines += [f"## MTU {mtu}", ""]
        header = "| workload | router |" + "".join(f" {m} | x router |" for m in modes)
        lines += [header, "|" + "---|" * (2 + 2 * len(modes))]
        workloads = []
        for cell in cells:
            if cell["mtu"] == mtu and cell["workload"] not in workloads:
                workloads.append(cell["workload"])
        for wl in workloads:
            row = {c["mode"]: c for c in cells if c["mtu"] == mtu and c["workload"] == wl}
            line = f"| {wl} | {fmt_value(row['router']['median']) if 'router' in row else '-'} |"
            for m in modes:
                cell = row.get(m)
                if cell is None:
                    line += " - | - |"
                    continue
                ratio = cell["ratio_to_router"]
                line += f" {fmt_value(cell['median'])} | {f'{ratio:.2f}' if ratio else '-'} |"
            lines.append(line)
        lines.append("")
        lines += cost_table(results, mtu, modes)
    notes = results.get("notes") or []
    if notes:
        lines += ["## Notes", ""] + [f"* {n}" for n in notes] + [""]
    return "\n".join(lines)


def fmt_cost(value, unit):
    """``103 µs`` per request, ``0.81 s`` per GB."""
    if value is None:
        return "-"
    return f"{value:.0f} µs" if unit == "request" else f"{value:.2f} s"


def cost_table(results, mtu, modes):
    """Markdown lines: each mode's median CPU cost per request or per GB at ``mtu``.

    ``procs``: CPU time of the proxy's processes (none for the router). ``box``: the whole
    middlebox CPU, softirq included, when it is pinned; unpinned, the busy time of every CPU
    (endpoints included), comparable between the modes of one run only.
    """
    cells = [c for c in results["cells"] if c["mtu"] == mtu and c.get("cost")]
    if not cells:
        return []
    scope = next((s.get("box_scope") for c in cells for s in c["samples"]
                  if s.get("box_scope")), "middlebox")
    box = "box" if scope == "middlebox" else "all CPUs"
    lines = [f"### MTU {mtu}: CPU cost per request (wrk up to 100 KB) or per GB (CPU seconds)",
             "", f"procs: CPU time of the proxy's processes. {box}: busy time of "
             + ("the middlebox's CPU, softirq included (its softirq part in brackets)."
                if box == "box" else
                "both CPUs, endpoints included (softirq part in brackets); compare modes "
                "of the same run only."), "",
             "| workload | per | router " + box + " |"
             + "".join(f" {m} procs | {m} {box} |" for m in modes),
             "|" + "---|" * (3 + 2 * len(modes))]
    workloads = []
    for cell in cells:
        if cell["workload"] not in workloads:
            workloads.append(cell["workload"])
    for wl in workloads:
        row = {c["mode"]: c for c in cells if c["workload"] == wl}
        unit = costs.unit(wl)

        def both(cell):
            c = cell["cost"]
            return f"{fmt_cost(c['box'], unit)} ({fmt_cost(c['softirq'], unit)})"
        line = f"| {wl} | {unit} | {both(row['router']) if 'router' in row else '-'} |"
        for m in modes:
            cell = row.get(m)
            line += (" - | - |" if cell is None else
                     f" {fmt_cost(cell['cost']['proxy'], unit)} | {both(cell)} |")
        lines.append(line)
    return lines + [""]


def write(results, json_path, md_path, render=None):
    """Writes results as JSON and as markdown (render, default this module's markdown)."""
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1, default=str)
    text = (render or markdown)(results)
    with open(md_path, "w") as f:
        f.write(text)
    return text


def spread_note(cells, limit=0.15):
    """Cells whose repetitions disagree by more than ``limit`` (max/min - 1)."""
    noisy = [f"{c['mode']} {c['workload']} @{c['mtu']} ({c['spread']:.0%})"
             for c in cells if c.get("spread") and c["spread"] > limit]
    if not noisy:
        return None
    return "repetitions differ by more than 15% in: " + ", ".join(noisy)



def run_settings(args) -> dict:
    """A run's arguments as its raw data records them: without the output folder, which is
    where the file already is and would name one checkout's path."""
    return {key: value for key, value in vars(args).items() if key != "out"}


def save_raw(results: dict, folder: str, kind: str) -> str:
    """Writes a run's raw data as FOLDER/KIND-<results["started"]>.json; returns the path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{kind}-{results['started'].replace(':', '')}.json")
    with open(path, "w") as handle:
        json.dump(results, handle, indent=2)
    return path

