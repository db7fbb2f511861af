"""Which files root may read code and keys from: the rule of sudo and sshd's StrictModes.

pipesd runs as root and runs module code (`pipesctl load`, `--modules`) and reads keys
(`--keyring`). A file is trusted only if nobody but root could have written it or could
swap it later:

* the file is a regular file owned by root (uid 0), writable by nobody else;
* every directory from / down to it is owned by root and writable by nobody else (a
  directory writable by others, /tmp included, lets them rename the file away and put
  their own in its place, sticky bit or not);
* a symbolic link on the way is followed only if root owns it, and its target passes the
  same test (so a link that someone else could replace, or that points somewhere they
  control, is refused).

`check_trusted` raises `UntrustedFile` with a sentence naming the path and the owner or
mode that is wrong. Keys must also not be readable by others (`secret=True`).
"""
from __future__ import annotations

import os
import stat

ROOT_UID = 0
MAX_LINKS = 40          # the kernel's own limit on links followed in one lookup


class UntrustedFile(ValueError):
    """Root must not use this file; the message says which path and why."""


def _describe(st: os.stat_result) -> str:
    return f"owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}"


def _check_owner_and_mode(path: str, st: os.stat_result, what: str) -> None:
    if st.st_uid != ROOT_UID:
        raise UntrustedFile(f"{path}: {what} not owned by root ({_describe(st)}); "
                            "root will not use files others control")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UntrustedFile(f"{path}: {what} writable by group or others ({_describe(st)}); "
                            "make it writable by root only")


def check_trusted(path: str, secret: bool = False) -> str:
    """Checks path (made absolute) as the module docstring says; returns the resolved path
    of the file that passed. secret: also refuse a file readable by others (keys)."""
    resolved = _walk(os.path.abspath(path), links_left=MAX_LINKS)
    st = os.stat(resolved)
    if not stat.S_ISREG(st.st_mode):
        raise UntrustedFile(f"{path}: not a regular file")
    _check_owner_and_mode(path, st, "file")
    if secret and st.st_mode & stat.S_IROTH:
        raise UntrustedFile(f"{path}: readable by others ({_describe(st)}); "
                            "keys must be mode 0600 or 0640")
    return resolved


def _walk(path: str, links_left: int) -> str:
    """Checks every directory of the absolute path and follows root's links; returns the
    path with every link resolved."""
    parts = [part for part in path.split("/") if part and part != "."]
    current = "/"
    _check_directory(current)
    for index, part in enumerate(parts):
        if part == "..":
            current = os.path.dirname(current) or "/"
            continue
        candidate = os.path.join(current, part)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            raise UntrustedFile(f"{candidate}: no such file or directory") from None
        last = index == len(parts) - 1
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid != ROOT_UID:
                raise UntrustedFile(f"{candidate}: symbolic link not owned by root "
                                    f"({_describe(st)})")
            if links_left <= 0:
                raise UntrustedFile(f"{path}: too many levels of symbolic links")
            target = os.readlink(candidate)
            rest = "/".join(parts[index + 1:])
            joined = os.path.join(current, target, rest) if rest else os.path.join(current, target)
            return _walk(joined, links_left - 1)   # ".." after a link: handled in order
        if last:
            return candidate
        if not stat.S_ISDIR(st.st_mode):
            raise UntrustedFile(f"{candidate}: not a directory")
        _check_directory(candidate, st)
        current = candidate
    return current


def _check_directory(path: str, st: os.stat_result | None = None) -> None:
    st = st if st is not None else os.lstat(path)
    _check_owner_and_mode(path, st, "directory")
