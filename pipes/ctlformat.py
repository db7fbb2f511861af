"""pipesctl's human output: the control socket's JSON replies as aligned tables.

`pipesctl -j` prints the replies as they are (JSON, for scripts, like `ip -j`); without it,
these functions turn them into text. Pure functions of the reply: no I/O.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Columns aligned on their widest cell; numbers right-aligned, text left-aligned."""
    rows = [[_cell(value) for value in row] for row in rows]
    numeric = [all(_is_number(row[i]) for row in rows) if rows else False
               for i in range(len(headers))]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.rjust(w) if num else cell.ljust(w)
                         for cell, w, num in zip(cells, widths, numeric)).rstrip()

    return "\n".join([line(list(headers))] + [line(row) for row in rows])


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "-"
    return "-" if value is None else str(value)


def _is_number(text: str) -> bool:
    return text.replace(".", "", 1).isdigit() or text == "-"


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(count)  # not reached


def format_stats(stats: dict) -> str:
    """`pipesctl stats`: the instance, then one table per subject."""
    totals = stats.get("totals", {})
    parts = [f"pipesd {stats.get('name')} {stats.get('version', '')}: locator "
             f"{stats.get('locator')}, up {stats.get('uptime_s', 0):.0f} s, generation "
             f"{stats.get('generation')}"]
    functions = totals.get("functions", {})
    if functions:
        parts.append("functions\n" + table(
            ["function", "active", "started", "closed", "reset", "connect_failed",
             "bytes_up", "bytes_down", "vf_resets", "vf_errors", "timeouts"],
            [[name, f.get("flows_active", 0), f.get("flows_started", 0),
              f.get("flows_closed", 0), f.get("flows_reset", 0), f.get("connect_failed", 0),
              human_bytes(f.get("bytes_up", 0)), human_bytes(f.get("bytes_down", 0)),
              f.get("vf_resets", 0), f.get("vf_errors", 0),
              f.get("timeouts_client", 0) + f.get("timeouts_server", 0)
              + f.get("timeouts_connect", 0)]
             for name, f in sorted(functions.items())]))
    else:
        parts.append("functions: no flow yet")
    worker_totals = totals.get("worker", {})
    if worker_totals:
        parts.append("connections (all workers)\n" + table(
            ["counter", "value"], sorted(worker_totals.items())))
    workers = stats.get("workers", [])
    if workers:
        parts.append("workers\n" + table(
            ["index", "pid", "generation", "state", "accepted", "table_hits", "table_misses",
             "active_flows"],
            [[w.get("index"), w.get("pid"), w.get("generation"),
              "draining" if w.get("draining") else "serving",
              w.get("worker", {}).get("accepted", 0), w.get("worker", {}).get("table_hits", 0),
              w.get("worker", {}).get("table_misses", 0),
              sum(f.get("flows_active", 0) for f in w.get("functions", {}).values())]
             for w in workers]))
    srh = stats.get("srh_table", {})
    if srh:
        parts.append("capture and SRH table\n" + table(["counter", "value"], sorted(srh.items())))
    kernel = stats.get("kernel", {})
    if kernel:
        parts.append("kernel\n" + table(["counter", "value"], sorted(kernel.items())))
    function_stats = stats.get("function_stats", {})
    interesting = {worker: values for worker, values in function_stats.items() if values}
    if interesting:
        rows = []
        for worker, values in sorted(interesting.items()):
            for key, value in sorted(values.items()):
                rows.append([worker, key, _compact(value)])
        parts.append("function statistics (per worker)\n" + table(
            ["worker", "function", "statistics"], rows))
    return "\n\n".join(parts)


def _compact(value: Any) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={_compact(v)}" for k, v in sorted(value.items())) or "-"
    return _cell(value)


def format_functions(functions: list[dict]) -> str:
    """`pipesctl functions`: loaded functions, then draining modules and worker errors."""
    rows = [[f.get("id"), f.get("name"), f.get("module"), f.get("kind"), f.get("workers"),
             f.get("active_flows", 0)] for f in functions if "id" in f]
    text = table(["id", "name", "module", "kind", "workers", "active_flows"], rows)
    for f in functions:
        if f.get("draining"):
            text += (f"\nmodule {f['module']} draining in worker {f.get('worker')}: "
                     f"{f.get('active_flows', 0)} flows left")
        elif "error" in f:
            text += f"\nworker {f.get('worker')}: {f['error']}"
    return text


def format_reply(command: str, payload: Any) -> str:
    """Any other command's reply: `key: value` lines."""
    if command == "stats":
        return format_stats(payload)
    if command == "functions":
        return format_functions(payload)
    if isinstance(payload, dict):
        if not payload:
            return f"{command}: ok"
        return "\n".join(f"{key}: {_compact(value)}" for key, value in sorted(payload.items()))
    return _cell(payload)
