"""Fixtures for pipesd end-to-end tests (helpers live in e2ekit.py)."""
from __future__ import annotations

import os

import pytest

from srv6pipes.lab.apps import Pipesd
from srv6pipes.lab.testbed import Testbed

from tests.e2e.e2ekit import DPI_PATTERNS, KEYRING, EchoServer, Lab


@pytest.fixture(scope="module")
def lab(trusted_path_factory):
    """Module-wide lab: building namespaces and starting pipesd twice costs ~2 s. Both
    proxies share a keyring (encrypt/decrypt) and a dpi pattern file."""
    if os.geteuid() != 0:
        pytest.skip("end-to-end tests build network namespaces: run as root")
    files = trusted_path_factory.mktemp("lab")
    keyring, patterns = files / "keyring", files / "dpi-patterns"
    keyring.write_text(KEYRING)
    keyring.chmod(0o600)
    patterns.write_text(DPI_PATTERNS)
    extra = ("--keyring", str(keyring), "--dpi-patterns", str(patterns))
    with Testbed(proxies=2) as tb:
        proxies = {}
        server = EchoServer(tb.hosts["s"])
        try:
            for name in ("p1", "p2"):
                proxies[name] = Pipesd(tb.hosts[name], tb.locator(name), f"t{os.getpid()}_{name}",
                                       extra=extra)
            yield Lab(tb, proxies, server)
        finally:
            server.close()
            for proxy in proxies.values():
                proxy.stop()


@pytest.fixture
def line(testbed):
    """c - p1 - s with an echo server on s and no pipesd yet: (testbed, Lab). Each test
    starts the pipesd it needs on p1."""
    tb = testbed(proxies=1)
    server = EchoServer(tb.hosts["s"])
    yield tb, Lab(tb, {}, server)
    server.close()

