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


# Files pipesd must trust (modules, keyrings, pattern files) are refused in /tmp: it is
# writable by others (srv6pipes.trust). Tests that hand such files to pipesd make them here,
# in a root-only folder under /run, removed at the end of the session.
TRUSTED_BASE = "/run/srv6pipes-tests"


@pytest.fixture(scope="session")
def trusted_path_factory():
    """Like tmp_path_factory, in a folder root alone can write: .mktemp(name) -> Path."""
    import itertools
    import pathlib
    import shutil
    import tempfile

    os.makedirs(TRUSTED_BASE, mode=0o755, exist_ok=True)
    os.chmod(TRUSTED_BASE, 0o755)
    base = pathlib.Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=TRUSTED_BASE))
    os.chmod(base, 0o755)
    counter = itertools.count()

    class Factory:
        @staticmethod
        def mktemp(name: str) -> pathlib.Path:
            path = base / f"{name}{next(counter)}"
            path.mkdir(mode=0o755)
            return path

    try:
        yield Factory()
    finally:
        shutil.rmtree(base, ignore_errors=True)
        try:
            os.rmdir(TRUSTED_BASE)      # only if no other run uses it
        except OSError:
            pass


@pytest.fixture
def trusted_path(trusted_path_factory):
    """A fresh folder for one test, in trusted_path_factory's root-only base."""
    return trusted_path_factory.mktemp("test")
