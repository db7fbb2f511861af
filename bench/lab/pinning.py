"""Which CPU runs what.

The paper's lab had three machines (client, middlebox M1, server). Here three network
namespaces share 2 cores, so the placement decides what a ratio means:

``split`` (default): c and s (load generator, servers and their TCP stacks) on CPU 0, the
    middlebox p1 alone on CPU 1: its processes are pinned there and RPS on p1's interfaces
    moves p1's packet processing (forwarding for the router, TCP for the proxies) to CPU 1
    too (with two middleboxes, p1 and p2 share CPU 1). This is the paper's question: does
    one core of middlebox keep up with the endpoints? A ratio below 1 means the middlebox
    core saturated before the endpoints' core.
``shared``: load generator on CPU 0, servers on CPU 1, middlebox processes unpinned and
    packet processing wherever the sender runs. Everything competes for both cores, so a ratio
    measures the middlebox's total CPU cost relative to kernel forwarding.
``unpinned``: nothing pinned, no RPS: client, servers and middlebox on both cores, as on a
    busy host where a proxy's CPU is taken from the applications around it.
"""
from dataclasses import asdict, dataclass

from .cost import cpu_names

@dataclass(frozen=True)
class Pinning:
    name: str
    client_cpus: str | None     # taskset list for wrk / iperf3 -c in c, None = unpinned
    server_cpus: str | None     # taskset list for lighttpd / iperf3 -s in s, None = unpinned
    middlebox_cpus: str | None  # taskset list for haproxy / pipesd in p1, None = unpinned
    rps: dict | None            # host name -> hex CPU mask for rps_cpus of all its interfaces

    @staticmethod
    def cpu_count(cpus: str) -> int:
        """How many CPUs a taskset list ("1", "0,2", "0-3") names."""
        return len(cpu_names(cpus))

    @staticmethod
    def taskset(cpus):
        """argv prefix: ``["taskset", "-c", CPUS]``, or nothing when ``cpus`` is None."""
        return ["taskset", "-c", cpus] if cpus else []

    def as_dict(self):
        return asdict(self)


PINNINGS = {
    "split": Pinning("split", client_cpus="0", server_cpus="0", middlebox_cpus="1",
                     rps={"c": "1", "s": "1", "p1": "2"}),
    "shared": Pinning("shared", client_cpus="0", server_cpus="1", middlebox_cpus=None, rps=None),
    "unpinned": Pinning("unpinned", client_cpus=None, server_cpus=None, middlebox_cpus=None,
                        rps=None),
}


def apply_rps(tb, pinning):
    """Set rps_cpus on every interface of the hosts named in ``pinning.rps``.

    veth delivers through netif_rx, which honours RPS: with a mask set, the receiving
    namespace's packet processing runs on that CPU instead of the sender's. p1's mask is the
    middlebox's: in a longer line (c - p1 - p2 - s) every proxy host gets it, so all the
    middleboxes share the middlebox core.
    """
    if not pinning.rps:
        return
    masks = {name: mask for name, mask in pinning.rps.items() if name in tb.hosts}
    if "p1" in pinning.rps:
        masks.update({name: pinning.rps["p1"] for name in tb.proxy_names if name not in masks})
    for name, mask in masks.items():
        tb.hosts[name].run(
            ["sh", "-c", f"for q in /sys/class/net/*/queues/rx-*/rps_cpus; do "
                         f"echo {mask} > $q; done"])


def pinning_note(pin, middleboxes="middlebox", rps_extra=""):
    """The report's note on where things ran; ``pin`` is ``Pinning.as_dict()`` as saved in
    the results (``middleboxes`` names them, ``rps_extra`` adds to the RPS masks)."""
    def where(cpus):
        return f"CPU {cpus}" if cpus else "any CPU"
    return (f"pinning {pin['name']}: client on {where(pin['client_cpus'])}, servers on "
            f"{where(pin['server_cpus'])}, {middleboxes} on {where(pin['middlebox_cpus'])}"
            + (f", RPS masks {pin['rps']}{rps_extra}" if pin["rps"] else ""))
