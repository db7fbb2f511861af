"""Programs the demo, the end-to-end tests and the benchmarks run on testbed hosts:
pipesd itself and lighttpd. Each start function waits until the program is ready (bounded)
and returns something the caller stops; Testbed teardown kills whatever is left."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

READY_TIMEOUT = 15.0
# pipesd refuses keys, patterns and modules in folders others can change (/tmp included):
# the lab keeps its files under /run, in folders only root can write.
LAB_FILES = "/run/srv6pipes-lab"


@contextlib.contextmanager
def private_files(prefix: str):
    """A fresh folder only root can change, for the lab's key and content files; removed
    with everything in it when the with-body ends."""
    os.makedirs(LAB_FILES, mode=0o755, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=prefix, dir=LAB_FILES)
    os.chmod(folder, 0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        try:
            os.rmdir(LAB_FILES)
        except OSError:
            pass


class LabError(RuntimeError):
    pass


class Pipesd:
    """A pipesd running in a testbed host's namespace."""

    def __init__(self, host, locator, name: str, workers: int | None = 2, port: int = 7000,
                 extra: tuple[str, ...] = ()):
        self.host = host
        self.name = name
        self.control = f"/run/srv6pipes/{name}.sock"
        self.log_path = os.path.join(tempfile.gettempdir(), f"pipesd-{name}.log")
        self.log_file = open(self.log_path, "wb")
        self.command = [sys.executable, "-m", "srv6pipes.cli",
                        "--locator", str(locator), "--port", str(port), "--name", name,
                        "--control", self.control, *extra]
        if workers is not None:  # else from the config file or pipesd's CPUs
            self.command += ["--workers", str(workers)]
        if "--drain-timeout" not in extra:
            # Lab daemons must finish within stop()'s wait, or they are killed before
            # removing their kernel state and files.
            self.command += ["--drain-timeout", "5"]
        self.proc = host.popen(self.command, stdout=self.log_file, stderr=subprocess.STDOUT)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()  # never leave a half-started daemon or its log file open
            raise

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """pipesctl for this daemon; replies in JSON (-j)."""
        return self.host.run([sys.executable, "-c",
                              "import sys; from srv6pipes.cli import pipesctl_main; "
                              "sys.exit(pipesctl_main(sys.argv[1:]))",
                              "-j", "--control", self.control, *args], check=check)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LabError(f"pipesd {self.name} exited with {self.proc.returncode}:\n"
                               + self.log())
            if self.ctl("ping", check=False).returncode == 0:
                stats = self.stats()
                if all(w["worker"]["pid"] for w in stats["workers"]) and stats["workers"]:
                    return
            time.sleep(0.1)
        raise LabError(f"pipesd {self.name} not ready after {READY_TIMEOUT}s:\n" + self.log())

    def stats(self) -> dict:
        return json.loads(self.ctl("stats").stdout)

    def log(self) -> str:
        """Everything the daemon wrote so far (also after stop())."""
        if not self.log_file.closed:
            self.log_file.flush()
        with open(self.log_path, "rb") as handle:
            return handle.read().decode(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log_file.close()
        return self.proc.returncode


def connection_failure(exc: OSError) -> str:
    """How a lab client's connection failed, in the words the tests and benchmarks count:
    'reset', 'refused', 'timeout', else 'error ERRNO'."""
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timeout"
    return f"error {exc.errno}"


def wait_listening(host, port: int, proc=None, timeout: float = READY_TIMEOUT) -> None:
    """Returns once something in `host` listens on TCP `port`; raises LabError after
    `timeout` or when `proc` (the program expected to listen) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if host.run(["ss", "-Htln", f"sport = :{port}"], check=False).stdout.strip():
            return
        if proc is not None and proc.poll() is not None:
            raise LabError(f"{proc.args[0] if proc.args else 'server'} exited at start "
                           f"(code {proc.returncode})")
        time.sleep(0.05)
    raise LabError(f"nothing listens on port {port} in {host.ns} after {timeout}s")


class Lighttpd:
    """lighttpd serving `docroot` on [addr]:port. With access_log, requests are logged with
    the client address (the demo and tests check the server sees the client); the
    benchmarks turn it off. `prefix` goes before the command (taskset pinning)."""

    def __init__(self, host, docroot: str, port: int = 80, access_log: bool = True,
                 prefix: tuple[str, ...] = (), workdir: str | None = None):
        self.host = host
        self.port = port
        self.workdir = workdir or tempfile.mkdtemp(prefix="sp-lighttpd-")
        self.access_log = os.path.join(self.workdir, "access.log") if access_log else None
        logging = (f'server.modules = ("mod_accesslog")\n'
                   f'accesslog.filename = "{self.access_log}"\n'
                   f'accesslog.format = "%h %r %s %b"\n') if access_log else ""
        conf = os.path.join(self.workdir, "lighttpd.conf")
        with open(conf, "w") as handle:
            handle.write(f'''server.document-root = "{docroot}"
server.bind = "[{host.addr}]"
server.port = {port}
{logging}server.errorlog = "{self.workdir}/lighttpd-error.log"
server.max-connections = 8192
server.max-fds = 16384
server.max-keep-alive-requests = 100000
server.max-keep-alive-idle = 30
mimetype.assign = ("" => "application/octet-stream")
''')
        self.proc = host.popen([*prefix, "lighttpd", "-D", "-f", conf],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(host, port, self.proc)

    def clients_seen(self) -> list[str]:
        """Client addresses from the access log, one per request."""
        if self.access_log is None:
            raise LabError("this lighttpd runs without an access log")
        try:
            with open(self.access_log) as handle:
                return [line.split()[0] for line in handle if line.strip()]
        except FileNotFoundError:
            return []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
