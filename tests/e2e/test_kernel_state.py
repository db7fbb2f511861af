"""kernelsetup leaves nothing behind: install/remove, install twice, crash recovery, plan().

Each test works in the proxy namespace of a Testbed(proxies=1) whose sysctls were first set to
values the recipe changes (seg6 off, forwarding off but on for one interface), and compares a
snapshot of the namespace's kernel state before and after.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import sys
import textwrap

import pytest

from srv6pipes import kernelsetup
from srv6pipes.kernelsetup import KernelConfig

from tests.e2e.e2ekit import kernel_snapshot as snapshot

pytestmark = pytest.mark.e2e

LOCATOR = ipaddress.IPv6Network("fc00:1::/80")


def state_files(host, cfg) -> list[str]:
    with host.enter():
        path = kernelsetup.state_path(cfg)
    return sorted(str(p) for p in path.parent.glob(f"{path.stem}*")) if path.parent.exists() else []


@pytest.fixture
def proxy(testbed):
    """p1 of a fresh Testbed(proxies=1), with sysctls the recipe will have to change back."""
    host = testbed(proxies=1).hosts["p1"]
    host.run(
        "sysctl -qw net.ipv6.conf.all.forwarding=0 net.ipv6.conf.all.seg6_enabled=0 "
        "net.ipv6.conf.default.seg6_enabled=0 net.ipv6.conf.to-c.seg6_enabled=0 "
        "net.ipv6.conf.to-s.forwarding=1"
    )
    return host


def cfg_for(**kw) -> KernelConfig:
    return KernelConfig(**{"name": "st", "locator": LOCATOR, "port": 5000, **kw})


def install(host, cfg) -> None:
    with host.enter():
        kernelsetup.install(cfg)


def remove(host, cfg) -> None:
    with host.enter():
        kernelsetup.remove(cfg)


def assert_installed(host, cfg) -> None:
    snap = snapshot(host)
    assert f"table inet {cfg.nft_table}" in snap["nft"]
    assert snap["nft"].count("tproxy ip6 to :%d" % cfg.port) == 1
    assert snap["ip6tables"].count(cfg.comment) == 1, snap["ip6tables"]
    if cfg.intercept_cookies:
        assert snap["tc"].count(f"srv6pipes:{cfg.name} direct-action") == 2   # to-c, to-s
    assert snap["rules"].count(f"fwmark {cfg.fwmark:#x}/{cfg.fwmark:#x} lookup {cfg.table}") == 1
    assert snap["routes"].count(f"local default dev lo table {cfg.table}") == 1
    for iface in ("all", "default", "lo", "to-c", "to-s"):
        assert f"/{iface}/seg6_enabled:1" in snap["seg6_enabled"]
    assert "/all/forwarding:1" in snap["forwarding"]
    assert state_files(host, cfg)


def test_install_remove_leaves_nothing(proxy):
    before = snapshot(proxy)
    cfg = cfg_for()
    install(proxy, cfg)
    assert_installed(proxy, cfg)
    remove(proxy, cfg)
    assert snapshot(proxy) == before
    assert state_files(proxy, cfg) == []


def test_install_twice_is_install_once(proxy):
    before = snapshot(proxy)
    cfg = cfg_for()
    install(proxy, cfg)
    once = snapshot(proxy)
    install(proxy, cfg)
    assert snapshot(proxy) == once
    assert_installed(proxy, cfg)
    remove(proxy, cfg)
    remove(proxy, cfg)  # already gone: no error
    assert snapshot(proxy) == before


def test_remove_without_install_is_harmless(proxy):
    before = snapshot(proxy)
    remove(proxy, cfg_for())
    assert snapshot(proxy) == before


def test_crash_recovery(proxy):
    """A pipesd killed after install: the next install cleans up, remove restores all."""
    before = snapshot(proxy)
    cfg = cfg_for()
    script = textwrap.dedent(
        f"""
        import ipaddress, os, signal
        from srv6pipes import kernelsetup
        kernelsetup.install(kernelsetup.KernelConfig(
            name={cfg.name!r}, locator=ipaddress.IPv6Network({str(cfg.locator)!r}), port={cfg.port}))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    died = proxy.run([sys.executable, "-c", script], check=False)
    assert died.returncode == -9, died.stderr
    assert_installed(proxy, cfg)
    install(proxy, cfg)  # crash recovery: removes the leftover, restores, installs again
    assert_installed(proxy, cfg)
    remove(proxy, cfg)
    assert snapshot(proxy) == before
    assert state_files(proxy, cfg) == []


def test_crash_recovery_with_changed_config(proxy):
    """The restarted instance uses another port, table and mark: the old ones still go."""
    before = snapshot(proxy)
    old = cfg_for(table=100, fwmark=0x1, rule_priority=100, port=5000)
    new = cfg_for(table=200, fwmark=0x10, rule_priority=200, port=6000, queue_num=3)
    install(proxy, old)
    install(proxy, new)
    snap = snapshot(proxy)
    assert "lookup 100" not in snap["rules"] and "table 100" not in snap["routes"]
    assert ":5000" not in snap["nft"] and "--queue-num 0" not in snap["ip6tables"]
    assert_installed(proxy, new)
    remove(proxy, new)
    assert snapshot(proxy) == before


def test_failed_install_cleans_up(proxy, monkeypatch):
    before = snapshot(proxy)
    cfg = cfg_for()
    monkeypatch.setattr(kernelsetup, "render_ruleset", lambda cfg, backend: "this is not nft\n")
    with pytest.raises(kernelsetup.KernelSetupError, match="nft"):
        install(proxy, cfg)
    assert snapshot(proxy) == before
    assert state_files(proxy, cfg) == []


def test_stale_state_file_of_a_dead_namespace_is_ignored(proxy):
    """Namespace inodes are reused: a state file whose cookie differs must not be applied."""
    cfg = cfg_for()
    with proxy.enter():
        path = kernelsetup.state_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "netns_cookie": -1, "config": cfg.to_json(), "backend": "ip6tables-legacy",
        "sysctls": {"all/forwarding": ["1", "0"]},
    }))
    try:
        before = snapshot(proxy)
        remove(proxy, cfg)
        assert snapshot(proxy) == before
        assert not path.exists()
    finally:
        path.unlink(missing_ok=True)


def test_plan_is_what_install_does(proxy):
    """Running plan()'s commands in a shell gives the state install() gives."""
    before = snapshot(proxy)
    cfg = cfg_for()
    with proxy.enter():
        commands = kernelsetup.plan(cfg)
        assert kernelsetup.queue_backend() == "ip6tables-legacy"  # this kernel: no NFT_QUEUE
    install(proxy, cfg)
    by_install = snapshot(proxy)
    remove(proxy, cfg)
    assert snapshot(proxy) == before
    for command in commands:
        proxy.run(command)
    by_plan = snapshot(proxy)
    # iproute2 and pyroute2 differ in the default route protocol only. The cookie program
    # is loaded with bpf(), which a shell cannot do: plan() describes it in comments.
    by_plan["routes"] = by_plan["routes"].replace(" proto boot ", " proto static ")
    assert "srv6pipes:st" in by_install.pop("tc") and "srv6pipes" not in by_plan.pop("tc")
    assert by_plan == by_install
    assert any(c.startswith("# ") and "cookie_ack.bpf.o" in c for c in commands)
    remove(proxy, cfg)  # no state file (the shell installed): objects go, sysctls stay
    after = snapshot(proxy)
    for key in ("nft", "ip6tables", "rules"):
        assert after[key] == before[key]
    # forwarding stayed on, so the kernel keeps the subnet-router anycast routes.
    assert drop_anycast(after["routes"]) == drop_anycast(before["routes"])


def drop_anycast(routes: str) -> str:
    return "".join(line for line in routes.splitlines(keepends=True) if not line.startswith("anycast "))


def test_plan_with_nft_queue_backend():
    """Where the kernel has nft `queue`, the SYN copy moves into the nft table."""
    cfg = cfg_for(queue_num=7)
    commands = kernelsetup.plan(cfg, backend="nft")
    assert not any(c.startswith("ip6tables") for c in commands)
    ruleset = next(c for c in commands if c.startswith("nft"))
    assert "priority mangle - 1" in ruleset and "queue flags bypass to 7" in ruleset
    assert ruleset.index("queue flags") < ruleset.index("tproxy")
    legacy = kernelsetup.plan(cfg, backend="ip6tables-legacy")
    ruleset = next(c for c in legacy if c.startswith("nft"))
    assert "queue flags" not in ruleset
    assert [c for c in legacy if c.startswith("ip6tables")] == [
        "ip6tables-legacy -w 10 -t raw -A PREROUTING -d fc00:1::/80 -p tcp --syn "
        "-m comment --comment srv6pipes:st -j NFQUEUE --queue-num 7 --queue-bypass",
    ]


def ip6tables_tables(host) -> list[str]:
    """The legacy tables instantiated (and hooked) in the host's namespace."""
    return host.run(["cat", "/proc/net/ip6_tables_names"], check=False).stdout.split()


def test_queue_rule_hooks_the_raw_table_only(proxy):
    """The SYN copy's table is raw (two hooks), not mangle (five): installing and removing
    never instantiates mangle, whose hooks every relayed packet would cross."""
    cfg = cfg_for()
    install(proxy, cfg)
    try:
        assert kernelsetup.IP6TABLES_TABLE == "raw"
        assert "raw" in ip6tables_tables(proxy) and "mangle" not in ip6tables_tables(proxy)
    finally:
        remove(proxy, cfg)
    assert "mangle" not in ip6tables_tables(proxy)


def test_remove_takes_an_older_versions_mangle_rule(proxy):
    """A rule an older version left in mangle (crash before the upgrade) goes on remove."""
    cfg = cfg_for()
    spec = kernelsetup._ip6tables_rules(cfg)[0]
    proxy.run(kernelsetup._ip6tables_argv("-A", spec, "mangle"))
    install(proxy, cfg)                   # install removes leftovers first
    assert cfg.comment not in proxy.run(["ip6tables-legacy-save", "-t", "mangle"]).stdout
    assert cfg.comment in snapshot(proxy)["ip6tables"]
    remove(proxy, cfg)
    assert cfg.comment not in snapshot(proxy)["ip6tables"]


def test_rules_in_recipe_order():
    """TPROXY (SYN only) before the locator mark, before `socket transparent`."""
    text = kernelsetup.render_ruleset(cfg_for(), "ip6tables-legacy")
    tproxy = text.index("tcp flags & (syn | ack) == syn tproxy ip6 to :5000")
    mark = text.index("ip6 daddr fc00:1::/80 meta l4proto tcp meta mark set")
    sock = text.index("socket transparent 1 socket wildcard 0 meta mark set")
    assert tproxy < mark < sock
    assert "@" not in text.replace("#@", "")


@pytest.mark.parametrize("bad", [
    {"name": "has-dash"}, {"name": ""}, {"port": 0}, {"fwmark": 0}, {"table": 254},
    {"rule_priority": 0}, {"locator": "fc00:1::1/80"},
])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        cfg_for(**bad)


def test_config_json_round_trip():
    cfg = cfg_for(queue_num=2, fwmark=0x40)
    assert KernelConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    assert dataclasses.replace(cfg, name="x").nft_table == "srv6pipes_x"


def test_plan_changes_nothing(proxy):
    """`pipesd --dry-run`: plan() only reads (interfaces) and probes with `nft -c`."""
    before = snapshot(proxy)
    with proxy.enter():
        commands = kernelsetup.plan(cfg_for())
    assert "ip -6 rule add fwmark 0x1/0x1 lookup 100 priority 100" in commands
    assert "sysctl -w net.ipv6.conf.to-c.seg6_enabled=1" in commands
    assert snapshot(proxy) == before
