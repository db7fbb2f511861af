"""Function modules: loading and unloading VF modules (files) in one process.

A module is a file: a C shared object (`*.so`, the ABI of cext/srv6pipes_vf.h) or a Python
file (`*.py`, the interface of vfapi.py). Its name is the file name without the extension;
it is unique in a pipesd. `load_module` loads the file into this process, runs its init and
returns its functions; `LoadedModule.unload` runs deinit and lets go of it.

The master never loads a module itself: a broken module (a crash in its init, say) must not
take the daemon down. It checks a module in a throwaway child (`probe_module`), then every
worker loads it (worker.py); workers forked later load it at boot.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import time
from typing import Any, Optional

from . import vfapi
from .functions import KIND_C, KIND_PYTHON, Function

PROBE_TIMEOUT = 10.0
MAX_PROBE_REPLY = 1 << 20


class ModuleLoadError(Exception):
    """The file is not a loadable VF module; the message says why."""


def module_name(path: str) -> str:
    base = os.path.basename(path)
    for suffix in (".so", ".py"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    raise ModuleLoadError(f"{path}: a VF module is a C shared object (.so) or a Python "
                          f"file (.py)")


class LoadedModule:
    """One module loaded in this process."""

    def __init__(self, name: str, path: str, kind: str, functions: list[Function], handle: Any):
        self.name = name
        self.path = path
        self.kind = kind
        self.functions = functions
        self._handle = handle

    def stats(self) -> Optional[dict]:
        """The Python module's stats() (JSON-able), if it has one."""
        hook = getattr(self._handle, "stats", None) if self.kind == KIND_PYTHON else None
        return hook() if callable(hook) else None

    def unload(self) -> None:
        """Runs deinit and lets the module go. Only once no flow uses its functions."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
        if self.kind == KIND_C:
            handle.close()
        else:
            sys.modules.pop(handle.__name__, None)
            deinit = getattr(handle, "deinit", None)
            if callable(deinit):
                deinit()


def load_module(path: str) -> LoadedModule:
    """Loads the module at path into this process and runs its init."""
    path = os.path.abspath(path)
    name = module_name(path)
    if not os.path.isfile(path):
        raise ModuleLoadError(f"{path}: no such file")
    if path.endswith(".so"):
        return _load_c(name, path)
    return _load_python(name, path)


def _load_c(name: str, path: str) -> LoadedModule:
    from . import _vf

    try:
        handle = _vf.load_c_module(path)
    except _vf.ModuleError as exc:
        raise ModuleLoadError(str(exc)) from None
    functions = [Function(d["id"], d["name"], KIND_C, module=name,
                          description=d["description"] or "", address=d["address"])
                 for d in handle.functions]
    try:
        handle.init()
    except _vf.ModuleError as exc:
        handle.close()
        raise ModuleLoadError(str(exc)) from None
    return LoadedModule(name, path, KIND_C, functions, handle)


def _load_python(name: str, path: str) -> LoadedModule:
    # A private name in sys.modules: two pipesd modules may share a file name elsewhere,
    # and an unloaded module must not be found again by a later import.
    import_name = f"srv6pipes_vfmod_{name}_{os.getpid()}_{time.monotonic_ns()}"
    try:
        spec = importlib.util.spec_from_file_location(import_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[import_name] = module
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure in the file refuses the load
        sys.modules.pop(import_name, None)
        raise ModuleLoadError(f"{path}: import failed: {exc!r}") from None
    declared = getattr(module, "FUNCTIONS", None)
    if not isinstance(declared, (list, tuple)) or not declared or not all(
            isinstance(f, vfapi.Function) for f in declared):
        sys.modules.pop(import_name, None)
        raise ModuleLoadError(f"{path}: declares no FUNCTIONS list of vfapi.Function")
    functions = [Function(f.id, f.name, KIND_PYTHON, module=name, description=f.description,
                          python=f) for f in declared]
    init = getattr(module, "init", None)
    if callable(init):
        try:
            init()
        except Exception as exc:  # noqa: BLE001
            sys.modules.pop(import_name, None)
            raise ModuleLoadError(f"{path}: init() failed: {exc!r}") from None
    return LoadedModule(name, path, KIND_PYTHON, functions, module)


class Probe:
    """A throwaway child that loads and unloads one module and reports its functions.

    `Probe(path)` forks it; the parent reads `fd` until EOF (or gives up at the deadline),
    learns how the child ended (`status`, from waitpid) and calls `result(data, status)`.
    The master does this from its event loop (admission.py); `probe_module` does it
    blocking, for tests and tools.
    """

    def __init__(self, path: str):
        self.path = path
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # the child: load, report, unload, exit without touching the parent
            os.close(read_fd)
            try:
                signal.set_wakeup_fd(-1)   # the master's wake-up pipe is not ours to write
            except ValueError:
                pass
            try:
                module = load_module(path)
                reply = {"functions": [f.describe() for f in module.functions]}
                module.unload()
            except ModuleLoadError as exc:
                reply = {"error": str(exc)}
            except BaseException as exc:  # noqa: BLE001
                reply = {"error": f"{path}: {exc!r}"}
            os.write(write_fd, json.dumps(reply).encode()[:MAX_PROBE_REPLY])
            os._exit(0)
        os.close(write_fd)
        self.pid = pid
        self.fd = read_fd

    def result(self, data: bytes, status: Optional[int]) -> list[dict]:
        """The module's functions (describe() dicts) from what the child wrote and how it
        ended (None: it was killed for taking too long). Raises ModuleLoadError."""
        path = self.path
        if status is None:
            raise ModuleLoadError(f"{path}: loading took longer than {PROBE_TIMEOUT:.0f}s")
        if os.WIFSIGNALED(status):
            raise ModuleLoadError(f"{path}: the module crashed while loading "
                                  f"({signal.Signals(os.WTERMSIG(status)).name})")
        try:
            reply = json.loads(data)
            if not isinstance(reply, dict):
                raise ValueError
        except ValueError:
            raise ModuleLoadError(f"{path}: the module exited while loading") from None
        if "error" in reply:
            raise ModuleLoadError(str(reply["error"]))
        return reply["functions"]


def probe_module(path: str, timeout: float = PROBE_TIMEOUT) -> list[dict]:
    """Loads and unloads path in a throwaway child process and waits for it; returns its
    functions (describe() dicts). Raises ModuleLoadError with the reason, a crash included."""
    probe = Probe(path)
    try:
        data = _read_all(probe.fd, timeout)
    finally:
        os.close(probe.fd)
    return probe.result(data, _reap(probe.pid))


def _read_all(fd: int, timeout: float) -> bytes:
    import select

    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < MAX_PROBE_REPLY:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    return data


def _reap(pid: int) -> Optional[int]:
    """Waits briefly for the probe; kills it if it hangs (None then)."""
    for _ in range(50):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None
