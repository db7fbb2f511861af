"""kernelsetup.render_ruleset: the nft template filled in for one instance (pure text; the
e2e tests load it into a namespace)."""
import ipaddress

import pytest

from srv6pipes import kernelsetup
from srv6pipes.kernelsetup import KernelConfig


def config(**kw):
    values = dict(name="t1", locator="fc00:1::/80", port=8443, queue_num=7, fwmark=0x40)
    values.update(kw)
    return KernelConfig(**values)


def test_placeholders_are_filled_and_none_left():
    text = kernelsetup.render_ruleset(config(), "nft")
    assert "@" not in "".join(line.split("#")[0] for line in text.splitlines())
    assert "table inet srv6pipes_t1 {" in text
    assert "ip6 daddr fc00:1::/80 tcp flags & (syn | ack) == syn tproxy ip6 to :8443" in text
    assert "meta mark | 0x40 accept" in text
    assert "queue flags bypass to 7" in text


def test_several_captures_spread_syns_by_receiving_cpu():
    cfg = config(queue_count=2)
    assert "queue flags bypass,fanout to 7-8" in kernelsetup.render_ruleset(cfg, "nft")
    rule = kernelsetup._ip6tables_rules(cfg)[0]
    assert rule[rule.index("NFQUEUE") + 1:] == [
        "--queue-balance", "7:8", "--queue-cpu-fanout", "--queue-bypass"]
    assert kernelsetup._ip6tables_rules(config())[0][-3:] == [
        "--queue-num", "7", "--queue-bypass"]


def test_the_queue_block_only_with_the_nft_backend():
    with_queue = kernelsetup.render_ruleset(config(), "nft")
    without = kernelsetup.render_ruleset(config(), "ip6tables")
    assert "chain syn_queue" in with_queue and "chain syn_queue" not in without
    assert "BEGIN_NFT_QUEUE" not in with_queue + without
    # Everything else is the same ruleset.
    assert without.replace(" ", "") in with_queue.replace(" ", "") or \
        set(without.splitlines()) <= set(with_queue.splitlines())


def test_the_table_is_replaced_atomically():
    lines = [line for line in kernelsetup.render_ruleset(config(name="x"), "nft").splitlines()
             if line and not line.startswith("#")]
    assert lines[:3] == ["table inet srv6pipes_x {}", "delete table inet srv6pipes_x",
                         "table inet srv6pipes_x {"]


@pytest.mark.parametrize("bad, named", [
    (dict(name="no spaces"), "instance name"), (dict(port=0), "port=0"),
    (dict(table=254), "table=254"), (dict(rule_priority=40000), "rule_priority=40000"),
    (dict(fwmark=0), "fwmark=0"), (dict(queue_count=0), "queue_count=0"),
    (dict(queue_num=65535, queue_count=2), "queue_count=2")])
def test_bad_configs_are_refused_before_rendering(bad, named):
    with pytest.raises(ValueError, match=named):
        config(**bad)


def test_config_round_trips_through_its_state_file_form():
    cfg = config()
    assert KernelConfig.from_json(cfg.to_json()) == cfg
    assert cfg.locator == ipaddress.IPv6Network("fc00:1::/80")
