"""What each pipesctl request does (the control socket's handlers), bound once by type.

Handlers answer through `respond(reply)`, at once or later; none waits. What lives in
shared memory (every counter of every worker, the SRH table's, the kernel's) is read at
once; what only the workers know (their modules, the functions' own statistics) is asked
with a short deadline, and a worker that is late is reported as such in the reply, never
replaced for it (workerrpc.py).
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Callable

from . import __version__, messages, stats

if TYPE_CHECKING:
    from .master import Master

Respond = Callable[[dict], None]
WORKER_QUERY_TIMEOUT = 1.0     # how long `stats` and `functions` wait for the workers


class ControlCommands:
    def __init__(self, master: "Master"):
        self.master = master
        self.handlers = {
            messages.Ping: self.ping,
            messages.Stats: self.stats,
            messages.Functions: self.functions,
            messages.Load: self.load,
            messages.Unload: self.unload,
            messages.Reload: self.reload,
        }

    def dispatch(self, request: messages.Message, respond: Respond) -> None:
        self.handlers[type(request)](request, respond)

    # -- handlers ---------------------------------------------------------------------
    def ping(self, request: messages.Ping, respond: Respond) -> None:
        master = self.master
        respond(messages.reply_ok(pid=os.getpid(), name=master.config.name,
                                  version=__version__, generation=master.generation))

    def stats(self, request: messages.Stats, respond: Respond) -> None:
        snapshot = self.counters()

        def answered(replies: dict[int, dict]) -> None:
            by_index = self.master.worker_indexes()
            snapshot["function_stats"] = {
                str(by_index.get(pid, pid)): reply.get("stats", {"error": reply.get("error")})
                for pid, reply in sorted(replies.items(), key=lambda kv: by_index.get(kv[0], 0))}
            respond(messages.reply_ok(stats=snapshot))

        self.master.channels.ask(lambda i: messages.ModuleStats(id=i),
                                 self.master.live_worker_pids(), WORKER_QUERY_TIMEOUT, answered)

    def functions(self, request: messages.Functions, respond: Respond) -> None:
        master = self.master

        def answered(replies: dict[int, dict]) -> None:
            by_index = master.worker_indexes()
            per_function = self.counters()["totals"].get("functions", {})
            every_worker = sorted(by_index.get(pid, -1) for pid in replies)
            result = []
            for function in master.registry:
                entry = function.describe()
                if function.module == "builtin":
                    entry["workers"] = every_worker
                else:
                    entry["workers"] = sorted(by_index.get(pid, -1) for pid, reply in replies.items()
                                              if function.module in reply.get("loaded", {}))
                entry["active_flows"] = per_function.get(function.name, {}).get("flows_active", 0)
                result.append(entry)
            for pid, reply in sorted(replies.items()):
                if not reply.get("ok"):
                    result.append({"worker": by_index.get(pid, -1), "error": reply.get("error")})
                for name, info in reply.get("draining", {}).items():
                    result.append({"module": name, "draining": True,
                                   "worker": by_index.get(pid, -1),
                                   "active_flows": info.get("active_flows", 0)})
            respond(messages.reply_ok(functions=result))

        master.channels.ask(lambda i: messages.ListModules(id=i), master.live_worker_pids(),
                            WORKER_QUERY_TIMEOUT, answered)

    def load(self, request: messages.Load, respond: Respond) -> None:
        self.master.admission.load(request.path, respond)

    def unload(self, request: messages.Unload, respond: Respond) -> None:
        self.master.admission.unload(request.module, respond)

    def reload(self, request: messages.Reload, respond: Respond) -> None:
        error = self.master.reload()
        if error:
            respond(messages.reply_error(f"reload refused: {error}"))
        else:
            respond(messages.reply_ok(generation=self.master.generation))

    # -- shared memory ------------------------------------------------------------------
    def counters(self) -> dict:
        """Every counter that lives in shared memory: cheap, never waits."""
        master = self.master
        slot_names = master.registry.slot_names()
        workers = []
        for pid, child in sorted(master.children.items(), key=lambda item: item[1].index):
            if child.kind != "worker":
                continue
            snap = master.stats_block.region(child.region).snapshot(slot_names)
            snap.update(index=child.index, generation=child.generation, pid=pid,
                        draining=child.stopping)
            workers.append(snap)
        every_region = [master.stats_block.region(r).snapshot(slot_names)
                        for r in range(master.stats_block.regions)]
        return {
            "name": master.config.name,
            "locator": str(master.config.locator),
            "version": __version__,
            "uptime_s": round(time.time() - master.started, 1),
            "generation": master.generation,
            "totals": stats.merge(every_region),
            "srh_table": master.srh_table.counters(),
            "kernel": {**stats.kernel_counters(),
                       "cookie_interception": master.cookie_interception},
            "control": dict(master.control.counters),
            "workers": workers,
        }
