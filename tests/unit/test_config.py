"""pipesd's settings (config.py): one declaration each, ranges enforced where settings are
validated, one clear line per bad value; and the generated docs/cli.md matches."""
from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys

import pytest

from srv6pipes import addressplan, clidoc, config, kernelsetup
from srv6pipes.config import SETTINGS, Config, ConfigError, build_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
LOCATOR = "fc00:1::/80"


def build(**values):
    return build_config({"locator": LOCATOR, **values})


def test_config_fields_are_the_declared_settings():
    extra = {"config_file", "dry_run", "check"}
    fields = [f.name for f in dataclasses.fields(Config) if f.name not in extra]
    assert fields == [s.name for s in SETTINGS]


def test_defaults_build_and_match_the_kernel_defaults():
    cfg = build()
    kernel = kernelsetup.KernelConfig(name="x", locator=cfg.locator, port=cfg.port)
    assert (cfg.queue_num, cfg.fwmark, cfg.route_table, cfg.rule_priority) == (
        kernel.queue_num, kernel.fwmark, kernel.table, kernel.rule_priority)


@pytest.mark.parametrize("flag,name,value,accepted", [
    ("--route-table", "route_table", "254", "253-255"),
    ("--route-table", "route_table", "0", "1-4294967295"),
    ("--rule-priority", "rule_priority", "40000", "1-32765"),
    ("--queue-num", "queue_num", "70000", "0-65535"),
    ("--fwmark", "fwmark", "4294967296", "1-4294967295"),
    ("--function-bits", "function_bits", "40", "1-32"),
    ("--param-bits", "param_bits", "65", "0-64"),
    ("--port", "port", "0", "1-65535"),
    ("--workers", "workers", "abc", "integer"),
    ("--workers", "workers", "1000", "1-128"),
    ("--max-segments", "max_segments", "200", "1-64"),
    ("--table-slots", "table_slots", str(1 << 23), "1-4194304"),
    ("--keepalive", "keepalive", "x", "IDLE,INTERVAL,COUNT"),
    ("--timeout-client", "timeout_client", "soon", "seconds"),
    ("--return-mode", "return_mode", "sideways", "on-path, reverse, tlv"),
    ("--locator", "locator", "fc00::1/64", "host bits"),
    ("--metrics-listen", "metrics_listen", "::1:9469", "[IPv6 address]:port"),
    ("--metrics-listen", "metrics_listen", "[::1]:99999", "1-65535"),
])
def test_bad_value_is_one_line_naming_the_flag_and_range(flag, name, value, accepted):
    with pytest.raises(ConfigError) as info:
        build(**{name: value})
    message = str(info.value)
    assert message.startswith(flag + ":") and accepted in message and "\n" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_values_inside_the_ranges_are_accepted():
    cfg = build(route_table="4294967295", rule_priority="32765", queue_num="65535",
                captures="1", fwmark="0xffffffff", function_bits="32", param_bits="16",
                workers="128")
    assert (cfg.route_table, cfg.rule_priority, cfg.queue_num, cfg.fwmark) == (
        4294967295, 32765, 65535, 0xFFFFFFFF)


def test_captures_default_to_one_per_worker_cpu_and_their_queues_must_fit():
    cpus = len(os.sched_getaffinity(0))
    assert build(workers="1").captures == 1
    assert build(workers="64").captures == min(64, cpus)
    assert build(workers="64", captures="3").captures == 3
    with pytest.raises(ConfigError, match="--queue-num, --captures: queues 65534-65536"):
        build(queue_num="65534", captures="3")


def test_off_path_return_modes_take_one_capture():
    assert build(workers="64", return_mode="reverse").captures == 1
    with pytest.raises(ConfigError, match="--captures: one capture only with --return-mode tlv"):
        build(return_mode="tlv", captures="2")


def test_metrics_listen_is_an_address_and_port_or_off():
    assert build(metrics_listen="[::1]:9469").metrics_listen == ("::1", 9469)
    assert build(metrics_listen="[fd00::0001]:80").metrics_listen == ("fd00::1", 80)
    assert build().metrics_listen is None


def test_plan_that_does_not_fit_128_bits_is_refused_before_any_worker():
    with pytest.raises(ConfigError, match="does not fit in 128 bits"):
        build(locator="fc00::/64", function_bits="32", param_bits="64")


def test_off_path_modes_need_room_for_their_rules_and_marks():
    with pytest.raises(ConfigError, match="--rule-priority: must be at least 3"):
        build(return_mode="reverse", rule_priority="2")
    with pytest.raises(ConfigError, match="--fwmark: must be below 0x10000"):
        build(return_mode="tlv", fwmark="0x10000")


def test_toml_errors_name_the_key_and_the_file(tmp_path):
    path = tmp_path / "pipesd.toml"
    path.write_text('locator = "fc00:1::/80"\nqueue_num = 70000\n')
    with pytest.raises(ConfigError) as info:
        build_config({"config_file": str(path)})
    assert str(info.value).startswith(f"queue_num (in {path}): must be an integer in 0-65535")
    path.write_text('locator = "fc00:1::/80"\nfwmark = 1.5\n')
    with pytest.raises(ConfigError, match=r"^fwmark \(in .*\): must be an integer, got 1.5"):
        build_config({"config_file": str(path)})
    path.write_text('locator = "fc00:1::/80"\nworkers = true\n')
    with pytest.raises(ConfigError, match=r"^workers \(in .*\): must be an integer, got True"):
        build_config({"config_file": str(path)})
    path.write_text('locator = "fc00:1::/80"\nquue_num = 1\n')
    with pytest.raises(ConfigError, match="unknown settings in .*: quue_num"):
        build_config({"config_file": str(path)})


def test_command_line_wins_over_the_file_and_is_named_in_errors(tmp_path):
    path = tmp_path / "pipesd.toml"
    path.write_text('locator = "fc00:1::/80"\nqueue_num = 3\nport = 7100\n')
    cfg = build_config({"config_file": str(path), "queue_num": "4"})
    assert (cfg.queue_num, cfg.port) == (4, 7100)
    with pytest.raises(ConfigError, match="^--port: "):
        build_config({"config_file": str(path), "port": "99999"})


def test_ranges_agree_with_the_modules_that_use_them():
    from srv6pipes import _srhtable, master

    assert config.MAX_TABLE_SLOTS == _srhtable.MAX_SLOTS
    assert config.MAX_WORKERS * 2 <= master.STATS_REGIONS
    by_name = config.SETTINGS_BY_NAME
    assert by_name["function_bits"].validator.accepted == (
        f"{addressplan.MIN_FUNCTION_BITS}-{addressplan.MAX_FUNCTION_BITS}")
    for setting, field in (("queue_num", "queue_num"), ("fwmark", "fwmark"),
                           ("route_table", "table"), ("rule_priority", "rule_priority"),
                           ("port", "port")):
        low, high = kernelsetup.KERNEL_RANGES[field]
        assert by_name[setting].validator.accepted == f"{low}-{high}"


def test_help_lists_every_setting_with_its_range():
    from srv6pipes.cli import pipesd_parser

    text = " ".join(pipesd_parser().format_help().split())
    for setting in SETTINGS:
        assert setting.flag in text
    assert "0-65535; default: 0" in text and "--check" in text and "--version" in text


def test_docs_cli_md_is_generated_from_the_declarations():
    assert (ROOT / "docs" / "cli.md").read_text() == clidoc.render(), \
        "docs/cli.md is stale: python -m srv6pipes.clidoc > docs/cli.md"


def test_readme_command_line_section_names_every_setting():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Command line", 1)[1].split("\n## ", 1)[0]
    missing = [s.flag for s in SETTINGS if s.flag not in section]
    assert not missing, f"README's Command line section lacks {missing}"


@pytest.mark.parametrize("program", ["pipesd", "pipesctl", "pipes-controller", "pipes-agent",
                                     "pipes-run"])
def test_every_command_has_version(program):
    mains = {"pipesd": "srv6pipes.cli:pipesd_main", "pipesctl": "srv6pipes.cli:pipesctl_main",
             "pipes-controller": "srv6pipes.controller.service:main",
             "pipes-agent": "srv6pipes.agent.service:main",
             "pipes-run": "srv6pipes.preload:main"}
    module, function = mains[program].split(":")
    result = subprocess.run([sys.executable, "-c", f"import sys; from {module} import {function}"
                             f" as m; sys.exit(m(['--version']))"],
                            capture_output=True, text=True, timeout=60)
    from srv6pipes import __version__

    assert result.returncode == 0 and result.stdout.split()[-1] == __version__


def test_contrib_config_loads_and_names_every_setting(tmp_path):
    path = ROOT / "contrib" / "pipesd.toml"
    cfg = build_config({"config_file": str(path)})
    assert str(cfg.locator) == "fc00:1::/80"
    text = path.read_text()
    missing = [s.name for s in SETTINGS if s.name not in ("name", "control")
               and f"{s.name} = " not in text]
    assert not missing, f"contrib/pipesd.toml lacks {missing}"
    # Every commented value is the default: uncommenting one changes nothing.
    uncommented = "\n".join(line[2:] if line.startswith("# ") and " = " in line else line
                            for line in text.splitlines())
    path = tmp_path / "pipesd.toml"
    path.write_text(uncommented)
    assert build_config({"config_file": str(path), "workers": "4"}) == dataclasses.replace(
        cfg, config_file=str(path))


def test_systemd_unit_checks_first_and_outlasts_the_drain():
    unit = (ROOT / "contrib" / "pipesd@.service").read_text()
    lines = dict(line.split("=", 1) for line in unit.splitlines()
                 if "=" in line and not line.startswith("#"))
    assert lines["ExecStartPre"].endswith("--check")
    assert lines["ExecStart"] + " --check" == lines["ExecStartPre"]
    assert lines["KillMode"] == "mixed" and "HUP" in lines["ExecReload"]
    assert int(lines["TimeoutStopSec"]) > config.SETTINGS_BY_NAME["drain_timeout"].default
    assert lines["RuntimeDirectoryPreserve"] == "yes"
    assert str(config.system.STATE_DIR) == "/run/" + lines["RuntimeDirectory"]
