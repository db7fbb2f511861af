"""Fixtures for pipesd end-to-end tests (helpers live in e2ekit.py)."""
from __future__ import annotations

import os

import pytest

from srv6pipes.labapps import Pipesd
from srv6pipes.testbed import Testbed

from e2ekit import EchoServer, Lab


@pytest.fixture(scope="module")
def lab():
    """Module-wide lab: building namespaces and starting pipesd twice costs ~2 s."""
    if os.geteuid() != 0:
        pytest.skip("end-to-end tests build network namespaces: run as root")
    with Testbed(proxies=2) as tb:
        proxies = {}
        server = EchoServer(tb.hosts["s"])
        try:
            for name in ("p1", "p2"):
                proxies[name] = Pipesd(tb.hosts[name], tb.locator(name), f"t{os.getpid()}_{name}")
            yield Lab(tb, proxies, server)
        finally:
            server.close()
            for proxy in proxies.values():
                proxy.stop()


