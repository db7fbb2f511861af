"""Shared fixtures.

End-to-end tests (marked ``e2e``) build namespace labs with :class:`srv6pipes.lab.testbed.Testbed`
through the ``testbed`` factory fixture, which always tears them down. They need root and
iproute2; without those they are skipped with the reason.
"""
from __future__ import annotations

import os
import shutil

import pytest


def _e2e_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "e2e tests need root (network namespaces, nftables, transparent sockets)"
    if shutil.which("ip") is None:
        return "e2e tests need iproute2 (`ip`)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _e2e_unavailable()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def testbed():
    """Factory: ``tb = testbed(proxies=1, ...)`` returns a built Testbed; all are closed at
    teardown, whatever the test did."""
    from srv6pipes.lab.testbed import Testbed

    made: list[Testbed] = []

    def make(**kwargs) -> Testbed:
        tb = Testbed(**kwargs)
        made.append(tb)
        return tb.build()

    try:
        yield make
    finally:
        errors = []
        for tb in reversed(made):
            try:
                tb.close()
            except Exception as exc:  # close the others anyway
                errors.append(exc)
        if errors:
            raise errors[0]
