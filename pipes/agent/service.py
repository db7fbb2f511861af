"""``pipes-agent``: the access-router agent, in the foreground.

It listens for the controller (one authenticated request per TCP connection, see
controller/messages.py), applies the bindings it is sent to the kernel (kernel.py) and
removes them when they expire, whether or not the controller is still there. It serves
its statistics as JSON on a Unix socket (``pipes-agent --config F --stats``).

Life cycle: at start it cleans up after a previous agent of the same name and adopts the
bindings that agent recorded as still alive (kernel.py), so a crash does not cut the
clients off; SIGTERM/SIGINT remove every binding, the edge filter and the HMAC key, then
exit 0; SIGHUP re-reads the channel key file.

Configuration (TOML, ``[agent]``, every key in SETTINGS)::

    [agent]
    name = "a1"
    listen = "[fd00:a1::1]:7200"
    key = "/etc/srv6pipes/agent.key"         # shared with the controller
    block = "fd00:a1::b:0/112"              # this router's binding segments
    client_interfaces = ["eth1"]
    hmac_keyring = "/etc/srv6pipes/hmac.keys"   # KEYID SECRET lines, as pipesd reads
    hmac_key_id = 101                        # the key this router signs with

Every request that fails (not a frame, bad MAC, replay, bad body, an error from the
kernel) is answered if it can be, counted under its reason and logged, rate limited.
Kernel changes run one at a time in a worker thread: the event loop keeps answering.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import ipaddress
import json
import logging
import os
import re
import signal
import sys
import time
import tomllib
from collections import Counter
from typing import Any, Optional

from ..controller import messages
from ..controller.messages import ChannelError
from ..controller.statsocket import read_stats, start_stats_socket, unlink_socket
from ..controller.model import ConfigError, endpoint, field_value, log_level, reject_unknown
from .. import logsetup
from ..ratelimit import RateLimitedLogger
from ..system import STATE_DIR
from ..srhhmac import HmacError, HmacKeyring
from .. import __version__
from .kernel import BindingKernel, KernelError

log = logging.getLogger("srv6pipes.agent")

EXPIRY_INTERVAL = 1.0          # seconds between expiry checks
READ_TIMEOUT = 5.0             # a connection must deliver its frame within this


def _agent_name(value: Any) -> str:
    # It names an nft table: letters, digits and '_' only.
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_]{1,24}", value):
        raise ValueError(f"must be 1-24 letters, digits or '_', got {value!r}")
    return value


def _interfaces(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(
            isinstance(item, str) and 0 < len(item) < 16 for item in value):
        raise ValueError("must be a non-empty list of interface names")
    return tuple(value)


def _behaviour(value: Any) -> str:
    if value not in ("End.B6", "End.B6.Encaps"):
        raise ValueError(f"must be End.B6 or End.B6.Encaps, got {value!r}")
    return value


def _key_id(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 0xFFFFFFFF:
        raise ValueError(f"must be a key id in 1..4294967295, got {value!r}")
    return value


# name, default (... = required), validator, help
SETTINGS = (
    ("name", ..., _agent_name, "agent name: nft table srv6pipes_edge_NAME, state file, socket"),
    ("listen", ..., endpoint, "[address]:port the controller connects to"),
    ("key", ..., str, "file with the channel key shared with the controller (hex)"),
    ("block", ..., ipaddress.IPv6Network, "this router's block of binding segments"),
    ("client_interfaces", ..., _interfaces, "interfaces the clients are behind (edge filter)"),
    ("hmac_keyring", "", str, "SRH HMAC key file (KEYID SECRET lines); empty: no HMAC"),
    ("hmac_key_id", 0, int, "the key id of hmac_keyring this router signs with"),
    ("behaviour", "End.B6", _behaviour, "seg6local action of the bindings (pipesd serves End.B6)"),
    ("control", "", str, "stats socket (default /run/srv6pipes/agent-NAME.sock)"),
    ("log_level", "info", log_level, "log verbosity"),
)


def load_config(path: str) -> dict:
    """The [agent] table of ``path``, validated; raises ConfigError."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    reject_unknown(path, data, {"agent"})
    table = data.get("agent")
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: an [agent] table is needed")
    reject_unknown("[agent]", table, {name for name, *_ in SETTINGS})
    config = {name: field_value("[agent]", table, name, validate, default)
              for name, default, validate, _help in SETTINGS}
    config["control"] = config["control"] or str(STATE_DIR / f"agent-{config['name']}.sock")
    if bool(config["hmac_keyring"]) != bool(config["hmac_key_id"]):
        raise ConfigError("[agent]: hmac_keyring and hmac_key_id go together")
    if config["hmac_key_id"]:
        _key_id(config["hmac_key_id"])
    return config


class Agent:
    """One agent process. Built from a validated config; :meth:`run` serves until stopped."""

    def __init__(self, config: dict):
        self.config = config
        self.key = messages.load_key(config["key"])
        hmac_key = None
        if config["hmac_keyring"]:
            keyring = HmacKeyring.load(config["hmac_keyring"])
            secret = keyring.secret(config["hmac_key_id"])
            if secret is None:
                raise HmacError(f"key id {config['hmac_key_id']} is not in "
                                f"{config['hmac_keyring']}")
            hmac_key = (config["hmac_key_id"], secret)
        self.kernel = BindingKernel(config["name"], config["block"], config["client_interfaces"],
                                    hmac_key, config["behaviour"])
        self.nonces = messages.NonceCache()
        self.counters: Counter = Counter()
        self.rlog = RateLimitedLogger(log)
        # Kernel changes are serialized in one thread: pyroute2 and nft calls block.
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kernel")
        self.started = time.time()
        self.last_sync: Optional[dict] = None
        self.stop_event: Optional[asyncio.Event] = None

    # -- life cycle --------------------------------------------------------------------
    def run(self) -> int:
        adopted = self.kernel.start()
        log.info("pipes-agent %s: %d bindings adopted, listening on [%s]:%d", self.config["name"],
                 adopted, *self.config["listen"])
        try:
            asyncio.run(self.serve())
        finally:
            self.executor.shutdown(wait=True)
            self.kernel.stop()
            self.rlog.flush()
            log.info("pipes-agent %s stopped: bindings, edge filter and HMAC key removed",
                     self.config["name"])
        return 0

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop_event.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        host, port = self.config["listen"]
        server = await asyncio.start_server(self.handle_connection, host, port,
                                            reuse_address=True)
        control = await start_stats_socket(self.config["control"], self.stats)
        expiry = asyncio.create_task(self.expire_loop())
        try:
            await self.stop_event.wait()
        finally:
            expiry.cancel()
            server.close()
            control.close()
            await server.wait_closed()
            await control.wait_closed()
            unlink_socket(self.config["control"])

    def reload(self) -> None:
        try:
            self.key = messages.load_key(self.config["key"])
            log.info("SIGHUP: channel key re-read")
        except (OSError, ValueError) as exc:
            log.error("SIGHUP: keeping the old channel key: %s", exc)

    async def expire_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(EXPIRY_INTERVAL)
            try:
                gone = await loop.run_in_executor(self.executor, self.kernel.expire)
            except (KernelError, OSError) as exc:
                self.count("kernel_errors", "expiring bindings failed: %s", exc)
                continue
            if gone:
                self.counters["expired"] += len(gone)
                log.info("expired: %s", ", ".join(str(b) for b in gone))

    # -- requests ----------------------------------------------------------------------
    async def handle_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        self.counters["connections"] += 1
        peer = writer.get_extra_info("peername")
        try:
            try:
                header = await asyncio.wait_for(reader.readexactly(4), READ_TIMEOUT)
                length = messages.frame_length(header)
                data = await asyncio.wait_for(reader.readexactly(length), READ_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                self.count("truncated", "connection from %s closed before a whole frame", peer)
                return
            except ChannelError as exc:
                self.count(exc.reason, "refused a frame from %s: %s", peer, exc)
                return
            try:
                body, nonce = messages.open_frame(data, self.key, self.nonces)
            except ChannelError as exc:
                # Unauthenticated: no reply (nothing to say to someone without the key).
                self.count(exc.reason, "refused a request from %s: %s", peer, exc)
                return
            try:
                reply = await self.dispatch(body)
                self.counters[f"requests_{body['type']}"] += 1
            except ChannelError as exc:
                self.count(exc.reason, "bad request from %s: %s", peer, exc)
                reply = {"type": "error", "error": str(exc)}
            reply["re"] = nonce
            writer.write(messages.seal(reply, self.key))
            await writer.drain()
        except ConnectionError:
            self.counters["connection_errors"] += 1
        finally:
            writer.close()

    async def dispatch(self, body: dict) -> dict:
        kind = body.get("type")
        if body.get("router") != self.config["name"]:
            raise ChannelError("bad_request", f"request for router {body.get('router')!r}, "
                                              f"this is {self.config['name']!r}")
        if kind == "sync":
            wanted = messages.parse_sync(body)
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self.executor, self.apply_sync, wanted)
            result.update(type="synced", generation=body.get("generation"))
            self.last_sync = {"at": time.time(), **{k: v for k, v in result.items()
                                                    if k != "type"}}
            return result
        if kind == "status":
            return {"type": "status", **self.stats()}
        raise ChannelError("bad_request", f"unknown request type {kind!r}")

    def apply_sync(self, wanted: list) -> dict:
        """In the kernel thread: make the kernel hold exactly ``wanted``."""
        installed = refreshed = removed = 0
        failed = []
        listed = set()
        for binding, lifetime in wanted:
            listed.add(binding.bsid)
            try:
                if self.kernel.apply(binding, lifetime):
                    installed += 1
                else:
                    refreshed += 1
            except (KernelError, ValueError) as exc:
                failed.append({"bsid": str(binding.bsid), "error": str(exc)})
                self.count("refused_bindings", "binding %s not installed: %s", binding.bsid, exc)
        for bsid in list(self.kernel.installed):
            if bsid not in listed:
                self.kernel.withdraw(bsid)
                removed += 1
        self.counters["installed"] += installed
        self.counters["removed"] += removed
        return {"installed": installed, "refreshed": refreshed, "removed": removed,
                "failed": failed}

    def count(self, reason: str, msg: str, *args) -> None:
        self.counters[reason] += 1
        self.rlog.warning(reason, msg, *args)

    def stats(self) -> dict:
        """JSON statistics: counters, bindings, the edge filter's packet counts."""
        try:
            edge = self.kernel.counters()
        except KernelError as exc:
            edge = {"error": str(exc)}
        now = time.time()
        return {
            "name": self.config["name"],
            "uptime_s": round(now - self.started, 1),
            "counters": dict(self.counters),
            "edge": edge,
            "last_sync": self.last_sync,
            "bindings": [{**entry.binding.to_json(),
                          "expires_in": round(entry.expires_at - now, 1)}
                         for entry in self.kernel.installed.values()],
        }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pipes-agent",
        description="SRv6Pipes access-router agent: installs the binding segments the "
                    "controller hands out (seg6local End.B6), drops client packets whose "
                    "SRH names anything else (nftables) and removes everything when it "
                    "stops. Runs in the foreground; SIGTERM/SIGINT clean up and exit, "
                    "SIGHUP re-reads the channel key.")
    parser.add_argument("--config", required=True, metavar="FILE", help="TOML file ([agent])")
    parser.add_argument("--stats", action="store_true",
                        help="print the running agent's statistics (JSON) and exit")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"pipes-agent: {exc}", file=sys.stderr)
        return 2
    if args.stats:
        try:
            print(json.dumps(read_stats(config["control"]), indent=2, sort_keys=True))
        except (OSError, ValueError) as exc:
            print(f"pipes-agent: cannot read stats from {config['control']}: {exc}",
                  file=sys.stderr)
            return 1
        return 0
    logsetup.setup("pipes-agent", config["log_level"])
    if os.geteuid() != 0:
        print("pipes-agent: must run as root (routes, nftables, HMAC keys)", file=sys.stderr)
        return 2
    try:
        agent = Agent(config)
    except (OSError, ValueError, HmacError) as exc:
        print(f"pipes-agent: {exc}", file=sys.stderr)
        return 2
    try:
        return agent.run()
    except KernelError as exc:
        print(f"pipes-agent: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
