"""`pipesd --check`: everything a start would need, checked without changing anything.

Called by cli.py with a validated Config (settings and their ranges are config.py's job).
Each check returns a Finding; `run` lists them in the order a start meets them:

  privileges    root (a start installs rules, routes and nftables, and drops the rest)
  files         --keyring, --dpi-patterns, --hmac-keyring: trusted, readable, well formed
  modules       --modules: trusted, loaded and unloaded in a throwaway child, ids free and
                within --function-bits (what admission.py does at start)
  kernel        seg6, policy routing, nftables with tproxy and socket match (the ruleset
                itself is checked by the kernel with `nft -c`, nothing committed), NFQUEUE
                (nft `queue` or ip6tables-legacy's target), sock_diag SOCK_DESTROY,
                network namespace cookies; SYN-cookie program (a warning: pipesd runs
                without it)
  resources     the listener port and control socket are free, /dev/shm holds the tables

A Finding is fatal unless marked as a warning; `pipesd --check` exits 0 only when none is.
The probes run in the current network namespace, the one pipesd would run in.
"""
from __future__ import annotations

import dataclasses
import errno
import gzip
import importlib
import os
import shutil
import socket
import subprocess
from typing import Callable, Iterator

from . import kernelsetup, system
from .config import Config



@dataclasses.dataclass(frozen=True)
class Finding:
    area: str
    ok: bool
    detail: str
    warning: bool = False      # a failed warning does not stop a start

    @property
    def fatal(self) -> bool:
        return not self.ok and not self.warning

    def line(self) -> str:
        mark = "ok  " if self.ok else ("warn" if self.warning else "FAIL")
        return f"{mark} {self.area}: {self.detail}"


def run(config: Config) -> list[Finding]:
    """Every check, in start order. Never raises for what it checks."""
    return [finding for check in CHECKS for finding in run_one(check, config)]


def run_one(check: Callable[[Config], Iterator[Finding]], config: Config) -> list[Finding]:
    """One check's findings; a check that breaks is a failed finding, never a traceback."""
    findings: list[Finding] = []
    try:
        findings.extend(check(config))
    except Exception as exc:  # noqa: BLE001 - a broken probe is a failed check
        findings.append(Finding(check.__name__.removeprefix("check_"), False,
                                f"the check itself failed: {exc!r}"))
    return findings


# --------------------------------------------------------------------------- the checks


def check_privileges(config: Config) -> Iterator[Finding]:
    root = os.geteuid() == 0
    yield Finding("privileges", root, "running as root" if root else
                  "pipesd must run as root (it installs routes, rules and nftables)")


def check_python_modules(config: Config) -> Iterator[Finding]:
    for module, package in (("netfilterqueue", "NetfilterQueue"), ("prctl", "python-prctl"),
                            ("posix_ipc", "posix_ipc"), ("pyroute2", "pyroute2")):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            yield Finding("python", False, f"{module} cannot be imported ({exc}): pip install "
                          f"{package}")
    for extension in ("_srhtable", "_relay", "_vf", "_timewait", "_sockops"):
        try:
            importlib.import_module(f"srv6pipes.{extension}")
        except ImportError as exc:
            yield Finding("python", False, f"extension srv6pipes.{extension} is missing "
                          f"({exc}): the package was installed without its build")
    yield Finding("python", True, "dependencies and extensions import")


def check_files(config: Config) -> Iterator[Finding]:
    from . import vf_crypto
    from .functions import load_dpi_patterns
    from .srhhmac import HmacKeyring

    for flag, path, load in (("--keyring", config.keyring, vf_crypto.load_keyring),
                             ("--dpi-patterns", config.dpi_patterns, load_dpi_patterns),
                             ("--hmac-keyring", config.hmac_keyring, HmacKeyring.load)):
        if not path:
            continue
        try:
            load(path)
        except OSError as exc:
            yield Finding("files", False, f"{flag} {path}: {exc.strerror or exc}")
        except ValueError as exc:
            yield Finding("files", False, f"{flag} {path}: {exc}")
        else:
            yield Finding("files", True, f"{flag} {path} is trusted and well formed")


def check_modules(config: Config) -> Iterator[Finding]:
    from . import trust, vfmodules
    from .functions import Function, FunctionConflict, FunctionRegistry

    registry = FunctionRegistry()
    limit = 1 << config.function_bits
    for path in config.modules:
        try:
            trust.check_trusted(path)
            described = vfmodules.probe_module(path)
            functions = [Function(d["id"], d["name"], d["kind"], module=vfmodules.module_name(path),
                                  description=d["description"]) for d in described]
            too_big = [f.name for f in functions if f.function_id >= limit]
            if too_big:
                raise ValueError(f"function ids of {', '.join(too_big)} do not fit in "
                                 f"--function-bits {config.function_bits}")
            registry.check_free(functions)
            for function in functions:
                registry.register(function)
        except (OSError, ValueError, FunctionConflict, vfmodules.ModuleLoadError) as exc:
            yield Finding("modules", False, f"--modules {path}: {exc}")
        else:
            names = ", ".join(f.name for f in functions)
            yield Finding("modules", True, f"{path} loads: {names}")


def check_kernel(config: Config) -> Iterator[Finding]:
    from .master import kernel_config

    kernel = kernel_config(config)
    seg6 = os.path.exists("/proc/sys/net/ipv6/conf/all/seg6_enabled")
    yield Finding("kernel", seg6, "seg6 (IPv6 segment routing)" if seg6 else
                  "no net.ipv6.conf.all.seg6_enabled: the kernel lacks IPv6 segment routing "
                  "(CONFIG_IPV6_SEG6_LWTUNNEL)")
    try:
        kernelsetup.netns_cookie()
        yield Finding("kernel", True, "network namespace cookies (SO_NETNS_COOKIE)")
    except OSError as exc:
        yield Finding("kernel", False, f"SO_NETNS_COOKIE: {exc.strerror} (needs Linux >= 5.14)")
    options = _config_options()
    if options and options.get("CONFIG_IPV6_MULTIPLE_TABLES") != "y":
        yield Finding("kernel", False, "no IPv6 policy routing (CONFIG_IPV6_MULTIPLE_TABLES)")
    if shutil.which("nft") is None:
        yield Finding("kernel", False, "nft is not installed (Debian: apt install nftables)")
        return
    backend = kernelsetup.queue_backend()
    ruleset = kernelsetup.render_ruleset(kernel, backend)
    proc = subprocess.run(["nft", "-c", "-f", "-"], input=ruleset, capture_output=True,
                          text=True, timeout=30)
    features = "tproxy, socket match" + (", queue" if backend == "nft" else "")
    if proc.returncode == 0:
        yield Finding("kernel", True, f"nftables accepts the ruleset ({features})")
    else:
        yield Finding("kernel", False, "nftables refuses the ruleset (needs nft tproxy and "
                      f"socket: CONFIG_NFT_TPROXY, CONFIG_NFT_SOCKET): {proc.stderr.strip()}")
    if backend == "nft":
        yield Finding("kernel", True, "NFQUEUE through nft queue")
    else:
        yield from _check_ip6tables_nfqueue(options)
    yield _check_sock_destroy()
    if config.syn_cookies == "intercept":
        yield _check_cookie_program(kernel)


def _check_ip6tables_nfqueue(options: dict[str, str]) -> Iterator[Finding]:
    ip6tables = kernelsetup.IP6TABLES
    if shutil.which(ip6tables) is None:
        yield Finding("kernel", False, f"this kernel has no nft queue and {ip6tables} is not "
                      "installed (Debian: apt install iptables)")
        return
    try:
        with open("/proc/net/ip6_tables_targets") as handle:
            loaded = "NFQUEUE" in handle.read().split()
    except OSError:
        loaded = False
    option = options.get("CONFIG_NETFILTER_XT_TARGET_NFQUEUE")
    if loaded or option in ("y", "m"):
        yield Finding("kernel", True, f"NFQUEUE through {ip6tables} (nft has no queue here)")
    elif options:
        yield Finding("kernel", False, "no NFQUEUE: neither nft queue (CONFIG_NFT_QUEUE) nor "
                      "the xtables target (CONFIG_NETFILTER_XT_TARGET_NFQUEUE)")
    else:
        yield Finding("kernel", True, f"NFQUEUE through {ip6tables}: target not loaded yet, "
                      "the kernel loads it with the rule", warning=True)


def _check_sock_destroy() -> Finding:
    """SOCK_DESTROY for a tuple no socket can have (port 0): ENOENT means the kernel can
    destroy sockets (CONFIG_INET_DIAG_DESTROY), EOPNOTSUPP that it cannot."""
    from . import _timewait  # type: ignore[attr-defined]  # a compiled extension
    from .timewait import TimeWaitReaper

    nowhere = socket.inet_pton(socket.AF_INET6, "2001:db8::")
    try:
        reaper = TimeWaitReaper()
        try:
            reaper._ask(_timewait.SOCK_DESTROY, nowhere, 0, nowhere, 0)
        finally:
            reaper.close()
    except OSError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            return Finding("kernel", False, "sock_diag cannot destroy sockets "
                           "(CONFIG_INET_DIAG_DESTROY): reused client ports would stall")
        return Finding("kernel", False, f"sock_diag: {exc}")
    return Finding("kernel", True, "sock_diag SOCK_DESTROY")


def _check_cookie_program(kernel) -> Finding:
    from . import cookies

    try:
        fd = cookies.load(cookies.program(kernel.locator, kernel.port))
        os.close(fd)
    except cookies.CookieError as exc:
        return Finding("kernel", False, f"SYN-cookie interception will be off: {exc}",
                       warning=True)
    return Finding("kernel", True, "the SYN-cookie BPF program loads")


def check_resources(config: Config) -> Iterator[Finding]:
    from .control import is_live

    if os.path.exists(config.control) and is_live(config.control):
        yield Finding("resources", False, f"another pipesd answers on {config.control}: give "
                      "this one another --name")
    else:
        yield Finding("resources", True, f"control socket {config.control} is free")
    # The workers bind [::]:port with SO_REUSEPORT; a socket without it (anything else)
    # already there makes them fail to boot. Binding without listening is invisible.
    probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        probe.bind(("::", config.port))
        yield Finding("resources", True, f"TCP port {config.port} is free")
    except OSError as exc:
        yield Finding("resources", False, f"--port {config.port}: {exc.strerror} (another "
                      "program or pipesd instance holds it)")
    finally:
        probe.close()
    if config.metrics_listen:
        host, port = config.metrics_listen
        probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            probe.bind((host, port))
            yield Finding("resources", True, f"metrics address [{host}]:{port} is free")
        except OSError as exc:
            yield Finding("resources", False, f"--metrics-listen [{host}]:{port}: {exc.strerror}")
        finally:
            probe.close()
    from ._srhtable import SLOT_BYTES, table_size

    needed = table_size(config.table_slots)
    try:
        shm = os.statvfs("/dev/shm")
    except OSError as exc:
        yield Finding("resources", False, f"/dev/shm: {exc.strerror}")
        return
    free = shm.f_bavail * shm.f_frsize
    yield Finding("resources", free >= needed,
                  f"/dev/shm has {free >> 20} MiB free, the SRH table takes {needed >> 20} MiB "
                  f"(--table-slots x {SLOT_BYTES} bytes)")


CHECKS: tuple[Callable[[Config], Iterator[Finding]], ...] = (
    check_privileges, check_python_modules, check_files, check_modules, check_kernel,
    check_resources)


def _config_options() -> dict[str, str]:
    """The running kernel's build options (/proc/config.gz, else /boot/config-*), or {}."""
    release = os.uname().release
    try:
        with gzip.open("/proc/config.gz", "rt") as handle:
            text = handle.read()
    except OSError:
        try:
            with open(f"/boot/config-{release}") as handle:
                text = handle.read()
        except OSError:
            return {}
    options = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            key, _, value = line.partition("=")
            options[key] = value
    return options


def report(config: Config, findings: list[Finding], plan: list[str]) -> tuple[str, int]:
    """The text `pipesd --check` prints and its exit status."""
    lines = [f"# pipesd {config.name}: checks"]
    lines += [finding.line() for finding in findings]
    lines += plan
    failed = [f for f in findings if f.fatal]
    lines.append(f"# {len(failed)} problem(s): pipesd would not start" if failed else
                 "# pipesd would start")
    return "\n".join(lines), (system.EXIT_USAGE if failed else system.EXIT_OK)
