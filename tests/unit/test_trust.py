"""trust.check_trusted: root uses a file only if nobody else could have written or swapped
it. Run as root (files are handed to other owners with chown); the unprivileged attacker
creating files with setpriv is in tests/e2e/test_chaos.py."""
from __future__ import annotations

import os

import pytest

from srv6pipes import trust

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown)")


def make(path, text="x", mode=0o644, uid=0):
    path.write_text(text)
    path.chmod(mode)
    os.chown(path, uid, -1)
    return path


def test_a_root_file_in_root_directories_is_trusted(trusted_path):
    path = make(trusted_path / "mod.py")
    assert trust.check_trusted(str(path)) == str(path)


@pytest.mark.parametrize("mode, uid, reason", [
    (0o644, NOBODY, "not owned by root"),
    (0o664, 0, "writable by group or others"),
    (0o646, 0, "writable by group or others"),
])
def test_files_others_own_or_can_write_are_refused(trusted_path, mode, uid, reason):
    path = make(trusted_path / "mod.py", mode=mode, uid=uid)
    with pytest.raises(trust.UntrustedFile, match=reason):
        trust.check_trusted(str(path))


@pytest.mark.parametrize("mode, uid", [(0o777, 0), (0o1777, 0), (0o775, 0), (0o755, NOBODY)])
def test_a_directory_others_can_change_is_refused_anywhere_on_the_path(trusted_path, mode, uid):
    middle = trusted_path / "shared"
    middle.mkdir()
    inner = middle / "inner"
    inner.mkdir()
    path = make(inner / "mod.py")
    middle.chmod(mode)
    os.chown(middle, uid, -1)
    with pytest.raises(trust.UntrustedFile, match=str(middle)):
        trust.check_trusted(str(path))


def test_tmp_is_refused():
    # /tmp is 1777: anyone may rename a file there away and put their own in its place.
    with pytest.raises(trust.UntrustedFile, match="/tmp: directory writable"):
        trust.check_trusted("/tmp/anything.so")


def test_root_symlinks_are_followed_and_their_target_checked(trusted_path):
    target = make(trusted_path / "real.so")
    link = trusted_path / "link.so"
    link.symlink_to(target)
    assert trust.check_trusted(str(link)) == str(target)
    relative = trusted_path / "rel.so"
    relative.symlink_to("real.so")
    assert trust.check_trusted(str(relative)) == str(target)


def test_a_symlink_someone_else_owns_is_refused(trusted_path):
    target = make(trusted_path / "real.so")
    link = trusted_path / "link.so"
    link.symlink_to(target)
    os.chown(link, NOBODY, -1, follow_symlinks=False)
    with pytest.raises(trust.UntrustedFile, match="symbolic link not owned by root"):
        trust.check_trusted(str(link))


def test_a_symlink_into_an_untrusted_place_is_refused(trusted_path):
    link = trusted_path / "link.so"
    link.symlink_to("/tmp/evil.so")
    with pytest.raises(trust.UntrustedFile, match="/tmp"):
        trust.check_trusted(str(link))


def test_a_symlinked_directory_is_checked_where_it_leads(trusted_path):
    open_dir = trusted_path / "open"
    open_dir.mkdir()
    make(open_dir / "mod.so")
    open_dir.chmod(0o777)
    (trusted_path / "via").symlink_to(open_dir)
    with pytest.raises(trust.UntrustedFile, match="open: directory writable"):
        trust.check_trusted(str(trusted_path / "via" / "mod.so"))


def test_secrets_must_not_be_readable_by_others(trusted_path):
    path = make(trusted_path / "keys", mode=0o644)
    with pytest.raises(trust.UntrustedFile, match="readable by others"):
        trust.check_trusted(str(path), secret=True)
    path.chmod(0o640)
    assert trust.check_trusted(str(path), secret=True)


def test_link_loops_and_missing_files_are_clear_errors(trusted_path):
    (trusted_path / "a").symlink_to(trusted_path / "b")
    (trusted_path / "b").symlink_to(trusted_path / "a")
    with pytest.raises(trust.UntrustedFile, match="too many levels"):
        trust.check_trusted(str(trusted_path / "a"))
    with pytest.raises(trust.UntrustedFile, match="no such file"):
        trust.check_trusted(str(trusted_path / "absent.so"))
    with pytest.raises(trust.UntrustedFile, match="not a regular file"):
        trust.check_trusted(str(trusted_path))
