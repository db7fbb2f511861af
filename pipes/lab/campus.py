"""The control-plane lab on the ``campus`` testbed: everything of the architecture running,
for the demo, the end-to-end tests and the benchmarks.

    c1 (staff) --- a1 --+              +--- p1, p2    pipesd: first functions (failover pair)
    c2 (students) - a2 -+--- r --------+--- ctl       pipes-controller, DNS on [fd00:e::1]:53
                                       +--- p3 --- s  pipesd: last functions; lighttpd on s

:class:`CampusLab` writes the keys and configuration files into a work directory, starts
pipesd + ``pipesctl serve-health`` on p1-p3, ``pipes-agent`` on a1 and a2 and
``pipes-controller`` on ctl, each waited for (bounded), and stops them all in reverse
order (also when starting failed half way). Every process also dies with the testbed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from .apps import READY_TIMEOUT, LabError, Pipesd, wait_listening

HEALTH_PORT = 7100
AGENT_PORT = 7200
DNS_PORT = 53
ZONE = "campus.lab"
SERVER_NAME = "www"
# Access routers: client prefix, binding block, HMAC key (id, secret: printable, as
# `ip sr hmac set` takes it).
ROUTERS = {
    "a1": ("fd00:c1::/64", "fd00:a1::b:0/112", 101, "staff-router-secret-0123456789"),
    "a2": ("fd00:c2::/64", "fd00:a2::b:0/112", 102, "students-router-secret-987654"),
}
# What clients may ask for, by name: (function id, parameters).
SERVICES = {"identity": (0, 0), "xor": (1, 42), "compress": (3, 6), "decompress": (4, 0),
            "encrypt": (5, 1), "decrypt": (6, 1), "dpi": (7, 0), "count": (8, 64)}
FIRST = ["identity", "xor", "compress", "encrypt", "count"]          # p1 and p2
LAST = ["identity", "xor", "decompress", "decrypt", "dpi"]           # p3
GRANTS = {
    "staff": ("fd00:c1::/64", [["encrypt", "decrypt"], ["compress", "decompress"],
                               ["xor", "xor"], ["identity"], ["identity", "identity"],
                               ["dpi"], ["count", "dpi"]]),
    "students": ("fd00:c2::/64", [["dpi"], ["count", "dpi"], ["identity"]]),
}


def _secret_file(path: str, text: str) -> str:
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
        handle.write(text)
    return path


def _toml_list(items) -> str:
    return "[" + ", ".join(json.dumps(item) for item in items) + "]"


class Process:
    """A lab program in a testbed host, its output in a log file."""

    def __init__(self, host, name: str, argv: list[str], workdir: str):
        self.host = host
        self.name = name
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.log_file = open(self.log_path, "wb")
        self.proc = host.popen(argv, stdout=self.log_file, stderr=subprocess.STDOUT)

    def log(self) -> str:
        self.log_file.flush()
        with open(self.log_path, "rb") as handle:
            return handle.read().decode(errors="replace")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise LabError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log_file.close()
        return self.proc.returncode


class CampusLab:
    """Everything running on a built ``Testbed(topology="campus")``."""

    def __init__(self, tb, workdir: str, name: str, pipesd_extra=(), controller_extra: str = "",
                 lighttpd_docroot: str | None = None):
        self.tb = tb
        self.workdir = workdir
        self.name = name
        self.pipesd_extra = tuple(pipesd_extra)
        self.controller_extra = controller_extra
        self.proxies: dict[str, Pipesd] = {}
        self.health: dict[str, Process] = {}
        self.agents: dict[str, Process] = {}
        self.controller: Process | None = None
        self.dns = (str(tb.hosts["ctl"].addr), DNS_PORT)
        self.hmac_keyring = _secret_file(os.path.join(workdir, "hmac.keys"), "".join(
            f"{key_id} {secret}\n" for _, _, key_id, secret in ROUTERS.values()))
        self.agent_key = _secret_file(os.path.join(workdir, "agent.key"), os.urandom(32).hex() + "\n")
        self.vf_keyring = _secret_file(os.path.join(workdir, "vf.keyring"),
                                       f"1 {os.urandom(32).hex()}\n")
        self.controller_config = os.path.join(workdir, "controller.toml")

    # -- configuration files --------------------------------------------------------------
    def controller_toml(self) -> str:
        lines = ["[controller]", f'name = "{self.name}"',
                 f'dns = ["[{self.dns[0]}]:{self.dns[1]}"]',
                 f'control = "/run/srv6pipes/controller-{self.name}.sock"',
                 f'agent_key = "{self.agent_key}"', "ttl = 30", "binding_lifetime = 300",
                 "probe_interval = 0.2", "probe_timeout = 0.5", "probe_failures = 2",
                 "sync_interval = 2.0", self.controller_extra, "", "[services]"]
        lines += [f"{name} = {{ function = {fid}, params = {params} }}"
                  for name, (fid, params) in SERVICES.items()]
        for proxy in ("p1", "p2", "p3"):
            host = self.tb.hosts[proxy]
            lines += ["", "[[proxy]]", f'name = "{proxy}"', f'locator = "{self.tb.locator(proxy)}"',
                      f"services = {_toml_list(LAST if proxy == 'p3' else FIRST)}",
                      f'health = "[{host.addr}]:{HEALTH_PORT}"',
                      f"last_hop = {'true' if proxy == 'p3' else 'false'}"]
        for router, (clients, block, _key_id, _secret) in ROUTERS.items():
            lines += ["", "[[router]]", f'name = "{router}"', f'clients = ["{clients}"]',
                      f'block = "{block}"', f'agent = "[{self.tb.hosts[router].addr}]:{AGENT_PORT}"']
        lines += ["", "[zone]", f'origin = "{ZONE}"', "[zone.names]",
                  f'{SERVER_NAME} = "{self.tb.hosts["s"].addr}"']
        for grant, (clients, chains) in GRANTS.items():
            lines += ["", "[[grant]]", f'name = "{grant}"', f'clients = ["{clients}"]',
                      "chains = [" + ", ".join(_toml_list(c) for c in chains) + "]"]
        return "\n".join(lines) + "\n"

    def agent_toml(self, router: str) -> str:
        clients, block, key_id, _ = ROUTERS[router]
        client = {"a1": "c1", "a2": "c2"}[router]
        return "\n".join([
            "[agent]", f'name = "{router}"',
            f'listen = "[{self.tb.hosts[router].addr}]:{AGENT_PORT}"',
            f'key = "{self.agent_key}"', f'block = "{block}"',
            f'client_interfaces = ["to-{client}"]', f'hmac_keyring = "{self.hmac_keyring}"',
            f"hmac_key_id = {key_id}",
            f'control = "/run/srv6pipes/agent-{self.name}_{router}.sock"']) + "\n"

    # -- start / stop -----------------------------------------------------------------------
    def start(self) -> "CampusLab":
        try:
            for proxy in ("p1", "p2", "p3"):
                self.start_proxy(proxy)
            for router in ROUTERS:
                self.start_agent(router)
            self.start_controller()
        except BaseException:
            self.stop()
            raise
        return self

    def start_proxy_daemon(self, proxy: str) -> Pipesd:
        """pipesd alone (a restart after a crash: it cleans up its predecessor's state)."""
        extra = ["--hmac-keyring", self.hmac_keyring, "--require-hmac",
                 "--keyring", self.vf_keyring, *self.pipesd_extra]
        if proxy == "p3":  # replies to a client go back through p1 or p2
            extra += ["--return-mode", "reverse"]
        pipesd = Pipesd(self.tb.hosts[proxy], self.tb.locator(proxy), f"{self.name}_{proxy}",
                        extra=tuple(extra))
        self.proxies[proxy] = pipesd
        return pipesd

    def start_proxy(self, proxy: str) -> Pipesd:
        """pipesd and its health endpoint."""
        host = self.tb.hosts[proxy]
        pipesd = self.start_proxy_daemon(proxy)
        health = Process(host, f"health-{proxy}", [
            sys.executable, "-c", "import sys; from srv6pipes.cli import pipesctl_main; "
            "sys.exit(pipesctl_main(sys.argv[1:]))", "--control", pipesd.control,
            "serve-health", "--listen", f"[{host.addr}]:{HEALTH_PORT}"], self.workdir)
        self.health[proxy] = health
        wait_listening(host, HEALTH_PORT, health.proc)
        return pipesd

    def start_agent(self, router: str) -> Process:
        path = os.path.join(self.workdir, f"agent-{router}.toml")
        with open(path, "w") as handle:
            handle.write(self.agent_toml(router))
        agent = Process(self.tb.hosts[router], f"agent-{router}",
                        [sys.executable, "-m", "srv6pipes.agent.service", "--config", path],
                        self.workdir)
        self.agents[router] = agent
        wait_listening(self.tb.hosts[router], AGENT_PORT, agent.proc)
        return agent

    def start_controller(self) -> Process:
        with open(self.controller_config, "w") as handle:
            handle.write(self.controller_toml())
        self.controller = Process(self.tb.hosts["ctl"], "controller",
                                  [sys.executable, "-m", "srv6pipes.controller.service",
                                   "--config", self.controller_config], self.workdir)
        wait_listening(self.tb.hosts["ctl"], DNS_PORT, self.controller.proc)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:  # the first probe round marks the proxies up
            self.controller.check_alive()
            healthy = [p for p, s in self.controller_stats()["proxies"].items() if s["healthy"]]
            if len(healthy) == len(self.proxies):
                return self.controller
            time.sleep(0.1)
        raise LabError(f"the controller does not see the proxies healthy:\n"
                       f"{json.dumps(self.controller_stats()['proxies'], indent=1)}")

    def controller_stats(self) -> dict:
        result = self.tb.hosts["ctl"].run([sys.executable, "-m", "srv6pipes.controller.service",
                                           "--config", self.controller_config, "--stats"])
        return json.loads(result.stdout)

    def agent_stats(self, router: str) -> dict:
        path = os.path.join(self.workdir, f"agent-{router}.toml")
        result = self.tb.hosts[router].run([sys.executable, "-m", "srv6pipes.agent.service",
                                            "--config", path, "--stats"])
        return json.loads(result.stdout)

    def dig(self, client: str, name: str, qtype: str = "TXT", *options: str):
        """Runs the real dig on ``client`` against the controller; returns the process."""
        return self.tb.hosts[client].run(["dig", f"@{self.dns[0]}", "-p", str(self.dns[1]),
                                          name, qtype, "+tries=1", "+time=3", *options],
                                         check=False)

    def stop(self) -> None:
        errors = []
        for process in ([self.controller] if self.controller else []) + list(self.agents.values()):
            try:
                process.stop()
            except Exception as exc:  # noqa: BLE001 - stop the others anyway
                errors.append(exc)
        for proxy in list(self.proxies):
            for stop in (self.health.pop(proxy, None), self.proxies.pop(proxy)):
                if stop is not None:
                    try:
                        stop.stop()
                    except Exception as exc:  # noqa: BLE001
                        errors.append(exc)
        self.controller = None
        self.agents.clear()
        if errors:
            raise errors[0]
