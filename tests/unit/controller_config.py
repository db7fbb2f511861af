"""A controller configuration for the unit tests (the campus lab's shape, no I/O)."""
import copy

BASE = {
    "controller": {"name": "unit", "dns": ["[::1]:5353"], "agent_key": "/dev/null", "ttl": 30,
                   "binding_lifetime": 300},
    "services": {"encrypt": {"function": 5, "params": 1}, "decrypt": {"function": 6, "params": 1},
                 "xor": {"function": 1, "params": 42}, "dpi": {"function": 7},
                 "count": {"function": 8, "params": 64}},
    "proxy": [
        {"name": "p1", "locator": "fc00:1::/80", "services": ["encrypt", "xor", "count"],
         "health": "[fd00:1:1::1]:7100", "last_hop": False},
        {"name": "p2", "locator": "fc00:2::/80", "services": ["encrypt", "xor", "count"],
         "health": "[fd00:1:2::1]:7100", "last_hop": False},
        {"name": "p3", "locator": "fc00:3::/80", "services": ["decrypt", "xor", "dpi"],
         "health": "[fd00:1:3::1]:7100"},
    ],
    "router": [
        {"name": "a1", "clients": ["fd00:c1::/64"], "block": "fd00:a1::b:0/124",
         "agent": "[fd00:a1::1]:7200"},
        {"name": "a2", "clients": ["fd00:c2::/64"], "block": "fd00:a2::b:0/124",
         "agent": "[fd00:a2::1]:7200", "hmac": False},
    ],
    "zone": {"origin": "campus.lab", "names": {"www": "fd00:d::1", "intranet": "fd00:d::2"}},
    "grant": [
        {"name": "staff", "clients": ["fd00:c1::/64"],
         "chains": [["encrypt", "decrypt"], ["xor", "xor"], ["dpi"]]},
        {"name": "students", "clients": ["fd00:c2::/64"], "servers": ["www"],
         "chains": [["dpi"], ["count", "dpi"]]},
    ],
}


def config(**changes):
    """A deep copy of BASE with top-level sections replaced."""
    data = copy.deepcopy(BASE)
    data.update(changes)
    return data
