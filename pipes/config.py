"""pipesd settings, declared once each: name, command-line flag, default, validator, help.

The command line (`pipesd --help`), the optional TOML configuration file (the same names,
underscored), `Config`'s fields and docs/cli.md all come from SETTINGS, so a new setting is
one declaration (tests/unit/test_config.py checks that `Config` and docs/cli.md match it).
A validator owns the accepted range and says it in its error; every bad value becomes one
ConfigError line that names the flag, or the TOML key and file it came from.
A configuration file is re-read on SIGHUP; command-line flags always win over it.
"""
from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import tomllib
from typing import Any, Callable

from . import addressplan, srh, system
from ._srhtable import MAX_SLOTS as MAX_TABLE_SLOTS, SLOT_BYTES as TABLE_SLOT_BYTES
from .kernelsetup import RESERVED_TABLES, kernel_range


class ConfigError(ValueError):
    """A setting has a value pipesd cannot use; the message names the setting."""


def _integer(value: Any) -> int:
    """An int from TOML or from a command-line word (decimal or 0x hex); never a float or a
    bool, which int() would quietly truncate."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"must be an integer, got {value!r}")
    try:
        if isinstance(value, int):
            return value
        text = value.strip()
        return int(text) if text.isdigit() else int(text, 0)
    except ValueError:
        raise ValueError(f"must be an integer, got {value!r}") from None


def _int_range(low: int, high: int, excluded: tuple[int, ...] = (),
               why: str = "") -> Callable[[Any], int]:
    """An integer in [low, high] (and not one of `excluded`: `why` says why)."""
    def validate(value: Any) -> int:
        number = _integer(value)
        if not low <= number <= high:
            raise ValueError(f"must be an integer in {low}-{high}, got {value!r}")
        if number in excluded:
            raise ValueError(f"must not be {number}{': ' + why if why else ''}")
        return number

    validate.accepted = f"{low}-{high}"  # type: ignore[attr-defined]
    return validate


def _seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"must be seconds, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be seconds, got {value!r}") from None
    if not 0 <= number <= 86400 * 365:
        raise ValueError(f"must be seconds between 0 and one year, got {value!r}")
    return number


_port = _int_range(*kernel_range("port"))

# Limits that are not the kernel's (those come from kernelsetup.kernel_range):
MAX_WORKERS = 128          # a reload runs two generations in master.STATS_REGIONS (256)
# MAX_TABLE_SLOTS: _srhtable.MAX_SLOTS (imported above), 4 Mi slots = 4.25 GiB
MAX_SEGMENTS = srh.MAX_SEGMENTS        # what the SRH parser accepts


def _keepalive(value: Any) -> tuple[int, int, int]:
    """IDLE[,INTERVAL,COUNT] seconds/probes; 0 turns keepalive off."""
    try:
        parts = [int(part) for part in str(value).split(",")] if str(value).strip() else [0]
    except ValueError:
        raise ValueError(f"must be IDLE,INTERVAL,COUNT or 0, got {value!r}") from None
    if parts == [0]:
        return (0, 10, 6)
    if len(parts) == 1:
        parts += [10, 6]
    if len(parts) != 3 or not (1 <= parts[0] <= 32767 and 1 <= parts[1] <= 32767
                               and 1 <= parts[2] <= 127):
        raise ValueError(f"must be IDLE,INTERVAL,COUNT (1-32767 s, 1-32767 s, 1-127) or 0, "
                         f"got {value!r}")
    return (parts[0], parts[1], parts[2])


def _locator(value: Any) -> ipaddress.IPv6Network:
    try:
        return ipaddress.IPv6Network(str(value), strict=True)
    except ValueError as exc:
        raise ValueError(f"must be an IPv6 prefix with zero host bits: {exc}") from None


def _name(value: Any) -> str:
    text = str(value)
    if not text or not all(ch.isascii() and (ch.isalnum() or ch == "_") for ch in text) \
            or len(text) > 24:
        raise ValueError(f"must be 1-24 ASCII letters, digits or '_', got {value!r}")
    return text


def _choice(*choices: str) -> Callable[[Any], str]:
    def validate(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    validate.accepted = "|".join(choices)  # type: ignore[attr-defined]
    return validate


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    return value


def _optional_path(value: Any) -> str | None:
    text = _text(value)
    return os.path.abspath(text) if text else None


def _endpoint(value: Any) -> tuple[str, int] | None:
    """[ADDR]:PORT (IPv6), or empty for none."""
    text = _text(value).strip()
    if not text:
        return None
    host, _, port = text.rpartition(":")
    try:
        if not (host.startswith("[") and host.endswith("]")):
            raise ValueError
        address = ipaddress.IPv6Address(host[1:-1])
    except ValueError:
        raise ValueError(f"must be [IPv6 address]:port, e.g. [::1]:9469, got {value!r}") from None
    try:
        return str(address), _port(port)
    except ValueError as exc:
        raise ValueError(f"port {exc}") from None


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"must be true or false, got {value!r}")


def _paths(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return tuple(os.path.abspath(str(item).strip()) for item in items if str(item).strip())


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    flag: str
    default: Any
    validator: Callable[[Any], Any]
    help: str
    metavar: str | None = None


SETTINGS: tuple[Setting, ...] = (
    Setting("locator", "--locator", None, _locator,
            "IPv6 prefix owned by this proxy; function addresses live inside it", "PREFIX"),
    # One per CPU this process may run on (taskset, cpuset): under `taskset -c 1` one
    # worker, not two sharing CPU 1.
    Setting("workers", "--workers", len(os.sched_getaffinity(0)), _int_range(1, MAX_WORKERS),
            "worker processes, one pinned per CPU (default: the CPUs pipesd may use)", "N"),
    Setting("port", "--port", 7000, _port,
            "local port of the transparent listeners (TPROXY target)", "P"),
    Setting("name", "--name", "pipesd", _name,
            "instance name: keeps shared memory, nftables table and control socket apart", "NAME"),
    Setting("control", "--control", None, _text,
            "control socket path (default /run/srv6pipes/NAME.sock)", "PATH"),
    Setting("function_bits", "--function-bits", 16,
            _int_range(addressplan.MIN_FUNCTION_BITS, addressplan.MAX_FUNCTION_BITS),
            "bits after the locator that name the function", "BITS"),
    Setting("param_bits", "--param-bits", 32,
            _int_range(addressplan.MIN_PARAM_BITS, addressplan.MAX_PARAM_BITS),
            "low-order bits that carry the function's parameters", "BITS"),
    Setting("queue_num", "--queue-num", 0, _int_range(*kernel_range("queue_num")),
            "NFQUEUE number the SYN capture reads; with N captures, queues Q to Q+N-1", "Q"),
    Setting("captures", "--captures", 0, _int_range(0, MAX_WORKERS),
            "SYN capture processes, each pinned to a worker's CPU and reading its own "
            "queue, which the kernel picks by the CPU that received the SYN (0: one per "
            "worker CPU; always one with an off-path --return-mode)", "N"),
    Setting("fwmark", "--fwmark", 1, _int_range(*kernel_range("fwmark")),
            "firewall mark that sends intercepted packets to the local table", "MARK"),
    Setting("route_table", "--route-table", 100,
            _int_range(*kernel_range("table"), excluded=RESERVED_TABLES,
                       why="253-255 are the kernel's default, main and local tables"),
            "routing table holding the 'local ::/0' route", "TABLE"),
    Setting("rule_priority", "--rule-priority", 100, _int_range(*kernel_range("rule_priority")),
            "priority of the fwmark rule (off-path return rules take the two below it)", "PRIO"),
    Setting("table_slots", "--table-slots", 65536, _int_range(1, MAX_TABLE_SLOTS),
            f"slots of the shared-memory SRH table ({TABLE_SLOT_BYTES} bytes each, "
            "committed at start: the default takes 68 MiB)", "N"),
    Setting("table_ttl_ms", "--table-ttl-ms", 30000, _int_range(1, 3_600_000),
            "age after which an SRH table entry is stale", "MS"),
    Setting("return_mode", "--return-mode", "on-path", _choice("on-path", "reverse", "tlv"),
            "return traffic: on-path (socket diversion only), reverse (reversed SRH on the "
            "client-facing socket), tlv (return path from the SYN's SRH TLV, else reversed)", "MODE"),
    Setting("max_segments", "--max-segments", 32, _int_range(1, MAX_SEGMENTS),
            "longest segment list accepted; longer SRHs are reset", "N"),
    Setting("max_flows", "--max-flows", 65536, _int_range(1, 1 << 20),
            "flows per worker; beyond it new connections are reset", "N"),
    Setting("buffer_size", "--buffer-size", 65536, _int_range(4096, 64 << 20),
            "relay buffer per direction for functions that transform bytes (identity uses "
            "at most 16 KiB until a direction is bulk and moves to splice)", "BYTES"),
    Setting("drain_timeout", "--drain-timeout", 30.0, _seconds,
            "seconds a stopping worker waits for its flows to finish; then they are reset",
            "SECONDS"),
    Setting("timeout_connect", "--timeout-connect", 5.0, _seconds,
            "seconds the next segment has to accept the onward connection (0: the kernel's "
            "SYN retries decide)", "SECONDS"),
    Setting("timeout_client", "--timeout-client", 3600.0, _seconds,
            "seconds a flow may go without a byte from or to the client before it is "
            "reset (0: never)", "SECONDS"),
    Setting("timeout_server", "--timeout-server", 3600.0, _seconds,
            "the same toward the server (the next segment)", "SECONDS"),
    Setting("timeout_client_fin", "--timeout-client-fin", 60.0, _seconds,
            "idle limit on the client side once the client has sent its FIN", "SECONDS"),
    Setting("timeout_server_fin", "--timeout-server-fin", 60.0, _seconds,
            "idle limit on the server side once the server has sent its FIN", "SECONDS"),
    Setting("syn_cookies", "--syn-cookies", "intercept", _choice("intercept", "reset"),
            "connections the kernel answers with a SYN cookie (SYN flood): intercept them "
            "(a tc BPF program hands their first ACK to the listener) or let them be reset",
            "MODE"),
    Setting("keepalive", "--keepalive", "60,10,6", _keepalive,
            "TCP keepalive on both legs: IDLE,INTERVAL,COUNT (first probe after IDLE s "
            "without traffic, one every INTERVAL s, reset after COUNT unanswered); 0: off",
            "IDLE[,INT,CNT]"),
    Setting("modules", "--modules", "", _paths,
            "VF modules (.so or .py) to load at start, comma-separated; more with "
            "`pipesctl load`", "PATH[,PATH]"),
    Setting("keyring", "--keyring", "", _optional_path,
            "key file of the encrypt/decrypt functions: lines 'KEYID HEXKEY' (32-byte keys)",
            "FILE"),
    Setting("dpi_patterns", "--dpi-patterns", "", _optional_path,
            "pattern file of the dpi function: one pattern per line (\\xHH escapes allowed)",
            "FILE"),
    Setting("hmac_keyring", "--hmac-keyring", "", _optional_path,
            "SRH HMAC keys shared with the access routers: lines 'KEYID SECRET' (the "
            "secret as `ip sr hmac set` takes it); HMACs present are checked, the "
            "kernel's own check is turned off on this host", "FILE"),
    Setting("require_hmac", "--require-hmac", False, _flag,
            "drop SYNs whose SRH naming this proxy has no valid HMAC (needs "
            "--hmac-keyring)", None),
    Setting("metrics_listen", "--metrics-listen", "", _endpoint,
            "serve the counters in Prometheus format over HTTP (GET /metrics) on this "
            "address, from a child process of the master (empty: off)", "[ADDR]:PORT"),
    Setting("log_level", "--log-level", "info", _choice("debug", "info", "warning", "error"),
            "log verbosity", "LEVEL"),
)
SETTINGS_BY_NAME = {setting.name: setting for setting in SETTINGS}


@dataclasses.dataclass(frozen=True)
class Config:
    """Validated settings of one pipesd instance (immutable; reload builds a new one)."""

    locator: ipaddress.IPv6Network
    workers: int
    port: int
    name: str
    control: str
    function_bits: int
    param_bits: int
    queue_num: int
    captures: int        # resolved: 1 or more (0 on the command line: one per worker CPU)
    fwmark: int
    route_table: int
    rule_priority: int
    table_slots: int
    table_ttl_ms: int
    return_mode: str
    max_segments: int
    max_flows: int
    buffer_size: int
    drain_timeout: float
    timeout_connect: float
    timeout_client: float
    timeout_server: float
    timeout_client_fin: float
    timeout_server_fin: float
    syn_cookies: str
    keepalive: tuple[int, int, int]
    modules: tuple[str, ...]
    keyring: str | None
    dpi_patterns: str | None
    hmac_keyring: str | None
    require_hmac: bool
    metrics_listen: tuple[str, int] | None
    log_level: str
    config_file: str | None = None
    dry_run: bool = False
    check: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per setting; defaults stay None so a config file can fill them."""
    for setting in SETTINGS:
        if setting.default is False:  # an on/off flag: present means on
            parser.add_argument(setting.flag, dest=setting.name, action="store_const",
                                const=True, default=None, help=setting.help)
            continue
        parser.add_argument(setting.flag, dest=setting.name, metavar=setting.metavar,
                            default=None, help=setting.help + _help_suffix(setting))
    parser.add_argument("--config", dest="config_file", metavar="FILE",
                        help="TOML file with the same settings (underscored names); re-read on SIGHUP")
    parser.add_argument("--check", action="store_true",
                        help="check everything a start would (settings, files, modules, kernel "
                             "features), print the kernel configuration, exit 0 only if a "
                             "start would succeed; changes nothing")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the kernel configuration that would be installed, then exit "
                             "(settings and files are checked, the kernel is not: see --check)")


def _help_suffix(setting: Setting) -> str:
    """The accepted range and the default, as `--help` and docs/cli.md show them."""
    parts = []
    accepted = getattr(setting.validator, "accepted", None)
    if accepted:
        parts.append(accepted)
    if setting.default not in (None, ""):
        shown = "CPUs in its affinity" if setting.name == "workers" else setting.default
        parts.append(f"default: {shown}")
    return f" [{'; '.join(parts)}]" if parts else ""


def build_config(cli_values: dict[str, Any]) -> Config:
    """Merges defaults < config file < command line, validates, returns a Config.

    Called at start and again on SIGHUP (the file may have changed). Raises ConfigError
    whose message is one line naming the flag (or the file's key) and what it accepts.
    """
    raw: dict[str, Any] = {s.name: s.default for s in SETTINGS}
    where = {s.name: s.flag for s in SETTINGS}   # how an error names each setting
    config_file = cli_values.get("config_file")
    if config_file:
        try:
            with open(config_file, "rb") as handle:
                from_file = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
        unknown = set(from_file) - set(SETTINGS_BY_NAME)
        if unknown:
            raise ConfigError(f"unknown settings in {config_file}: {', '.join(sorted(unknown))} "
                              "(the keys are pipesd's flags, underscored: see pipesd --help)")
        raw.update(from_file)
        where.update({key: f"{key} (in {config_file})" for key in from_file})
    for key, value in cli_values.items():
        if key in SETTINGS_BY_NAME and value is not None:
            raw[key] = value
            where[key] = SETTINGS_BY_NAME[key].flag

    values: dict[str, Any] = {}
    for setting in SETTINGS:
        value = raw[setting.name]
        if value is None:
            if setting.name == "control":
                continue
            raise ConfigError(f"{setting.flag} is required")
        try:
            values[setting.name] = setting.validator(value)
        except ValueError as exc:
            raise ConfigError(f"{where[setting.name]}: {exc}") from None
    values.setdefault("control", system.control_socket(values["name"]))
    if values["return_mode"] != "on-path":
        # Return paths are numbered, and their routes installed, by the capture that sees
        # a path first (returnpath.py): one capture keeps that numbering its own.
        if values["captures"] > 1:
            raise ConfigError(f"{where['captures']}: one capture only with "
                              f"{where['return_mode']} {values['return_mode']} (return paths "
                              "are numbered by the capture)")
        values["captures"] = 1
    elif values["captures"] == 0:
        values["captures"] = min(values["workers"], len(os.sched_getaffinity(0)))
    last_queue = values["queue_num"] + values["captures"] - 1
    if last_queue > kernel_range("queue_num")[1]:
        raise ConfigError(f"{where['queue_num']}, {where['captures']}: queues "
                          f"{values['queue_num']}-{last_queue} end past "
                          f"{kernel_range('queue_num')[1]}")
    try:
        addressplan.AddressPlan(values["locator"], values["function_bits"], values["param_bits"])
    except addressplan.AddressError as exc:
        raise ConfigError(f"{where['locator']}, {where['function_bits']}, "
                          f"{where['param_bits']}: {exc}") from None
    if values["require_hmac"] and not values["hmac_keyring"]:
        raise ConfigError(f"{where['require_hmac']} needs --hmac-keyring (the keys to check with)")
    if values["return_mode"] != "on-path":
        # returnpath.py: return rules sit at the two priorities below --rule-priority and
        # carry a path id in the upper 16 bits of the mark.
        if values["rule_priority"] < 3:
            raise ConfigError(f"{where['rule_priority']}: must be at least 3 with "
                              f"--return-mode {values['return_mode']} (the return rules take "
                              "the two priorities below it)")
        if values["fwmark"] >= 1 << 16:
            raise ConfigError(f"{where['fwmark']}: must be below 0x10000 with --return-mode "
                              f"{values['return_mode']} (the upper 16 bits name return paths)")
    return Config(**values, config_file=config_file, dry_run=bool(cli_values.get("dry_run")),
                  check=bool(cli_values.get("check")))
