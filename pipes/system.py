"""Facts about the system pipesd runs on, declared once: paths, exit codes, socket options,
privileges. Every other Python module imports them from here."""
from __future__ import annotations

import os
from pathlib import Path

from . import _sockops

# Where an instance keeps what must outlive a crash of its master: the kernel-state
# records (kernelsetup.py, returnpath.py), the control socket and pinned module copies.
STATE_DIR = Path(os.environ.get("SRV6PIPES_STATE_DIR", "/run/srv6pipes"))


def control_socket(name: str) -> str:
    """The default control socket of instance `name`."""
    return str(STATE_DIR / f"{name}.sock")


def modules_dir(name: str) -> str:
    """Root-only folder of the pinned copies of instance `name`'s loaded modules."""
    return str(STATE_DIR / f"{name}.modules")


# Exit codes of pipesd's processes (gunicorn's idea): the master does not re-fork a child
# that cannot boot in a tight loop, and pipesd's own status tells systemd what happened.
EXIT_OK = 0
EXIT_CRASHED = 1          # a child failed after it had started
EXIT_USAGE = 2            # bad command line or configuration (nothing was started)
EXIT_BOOT_FAILED = 3      # a child could not start (port taken, queue held...)

# Socket option numbers (linux/in6.h, linux/tcp.h, asm-generic/socket.h), declared once in
# cext/csystem.pxd for the extensions and exported to Python by _sockops.
IPV6_RTHDR = _sockops.SOCKET_OPTIONS["IPV6_RTHDR"]
IPV6_TRANSPARENT = _sockops.SOCKET_OPTIONS["IPV6_TRANSPARENT"]
TCP_SAVE_SYN = _sockops.SOCKET_OPTIONS["TCP_SAVE_SYN"]
TCP_SAVED_SYN = _sockops.SOCKET_OPTIONS["TCP_SAVED_SYN"]
SO_NETNS_COOKIE = _sockops.SOCKET_OPTIONS["SO_NETNS_COOKIE"]   # Linux >= 5.14

# Capabilities each process keeps after start-up (python-prctl names).
WORKER_CAPABILITIES = ("CAP_NET_ADMIN", "CAP_NET_RAW")   # IPV6_TRANSPARENT, bind foreign
CAPTURE_CAPABILITIES = ("CAP_NET_ADMIN",)                # nfnetlink checks it per verdict


def drop_capabilities(keep: tuple[str, ...]) -> None:
    """Limits this process's effective and permitted capabilities to `keep` (none can be
    regained; execve gets none). Raises if python-prctl cannot."""
    import prctl

    wanted = [getattr(prctl, name) for name in keep]
    prctl.cap_effective.limit(*wanted)
    prctl.cap_permitted.limit(*wanted)
    prctl.cap_inheritable.limit()
