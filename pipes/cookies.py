"""SYN-cookie connections, intercepted: the tc BPF program kernel/cookie_ack.bpf.c on the
ingress of every interface of the proxy's namespace (the program's comment says why).

Kernel side of one pipesd instance, installed and removed by kernelsetup.py with the rest
of the recipe (and recorded in its state file, so a crashed instance's filters go too):

* the program is compiled by setup.py into ``cookie_ack.bpf.o``; here its instructions are
  read from the ELF section ``tc``, the placeholders are patched with this instance's
  locator, listener port and mark (`program`), and the result is loaded with the bpf()
  system call (`load`);
* it is attached as a direct-action cls_bpf filter on each interface's clsact ingress
  hook, at tc priority = the instance's rule priority (unique per instance in a
  namespace), named ``srv6pipes:<name>`` (`attach`, `detach`, through pyroute2);
* the connection's SRH is the one the capture recorded from its SYN (the SYN is queued
  before the kernel decides to answer it with a cookie).

Needs Linux >= 5.7 (bpf_sk_assign at tc ingress). Without the compiled object (no clang
at build time) or when the kernel refuses the program, `available()` says why and pipesd
runs without it: cookie connections are then reset, as before.
"""
from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import os
import platform
import socket
import struct
import sys
from pathlib import Path

log = logging.getLogger("srv6pipes.cookies")

OBJECT_NAME = "cookie_ack.bpf.o"
SECTION = "tc"
CLSACT_INGRESS = 0xFFFFFFF2    # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)

# Placeholders of kernel/cookie_ack.bpf.c, as they appear in the compiled instructions.
LOCATOR_HI = 0x1111111111111111
LOCATOR_LO = 0x3333333333333333
MASK_HI = 0xF1F1F1F1F1F1F1F1
MASK_LO = 0xF3F3F3F3F3F3F3F3
LISTEN_PORT = 0xA5C3

BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SCHED_CLS = 3
SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351,
           "riscv64": 280}


class CookieError(RuntimeError):
    """The program cannot be built, loaded or attached; the message says why."""


def object_path() -> Path | None:
    """The compiled program: next to the nftables template (kernelsetup.template_path's
    places), or None when it was not built."""
    from .kernelsetup import template_path

    path = template_path().parent / OBJECT_NAME
    return path if path.is_file() else None


def program(locator: ipaddress.IPv6Network, port: int, obj: bytes | None = None) -> bytes:
    """The program's instructions with this instance's values in place of the placeholders.
    Raises CookieError if the object is missing or a placeholder is not found exactly once."""
    if obj is None:
        path = object_path()
        if path is None:
            raise CookieError(f"{OBJECT_NAME} was not built (clang missing at build time?)")
        obj = path.read_bytes()
    code = bytearray(elf_section(obj, SECTION))
    value = locator.network_address.packed
    mask = locator.netmask.packed

    def half(address: bytes, which: int) -> int:   # as the program loads it: no byte swap
        return int.from_bytes(address[8 * which:8 * which + 8], sys.byteorder)

    for placeholder, actual in ((LOCATOR_HI, half(value, 0)), (LOCATOR_LO, half(value, 1)),
                                (MASK_HI, half(mask, 0)), (MASK_LO, half(mask, 1))):
        _patch_wide(code, placeholder, actual)
    _patch_imm(code, 0xB7, socket.htons(LISTEN_PORT), socket.htons(port))   # mov r, imm
    return bytes(code)


def elf_section(obj: bytes, wanted: str) -> bytes:
    """The contents of one section of a little-endian ELF64 object."""
    if obj[:4] != b"\x7fELF" or obj[4] != 2 or obj[5] != 1:
        raise CookieError("not a little-endian ELF64 object")
    shoff = struct.unpack_from("<Q", obj, 0x28)[0]
    entsize, count, names_index = struct.unpack_from("<HHH", obj, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", obj, shoff + i * entsize) for i in range(count)]
    names_offset = headers[names_index][4]
    for name_at, _, _, _, offset, size in headers:
        start = names_offset + name_at
        if obj[start:obj.index(b"\0", start)].decode() == wanted:
            return obj[offset:offset + size]
    raise CookieError(f"no section {wanted!r} in the BPF object")


def _patch_wide(code: bytearray, old: int, new: int) -> None:
    """Replaces the one 64-bit immediate load (ld_imm64: opcode 0x18, two 8-byte slots)
    of `old`."""
    found = [i for i in range(0, len(code) - 15, 8)
             if code[i] == 0x18 and struct.unpack_from("<I", code, i + 4)[0] == old & 0xFFFFFFFF
             and struct.unpack_from("<I", code, i + 12)[0] == old >> 32]
    if len(found) != 1:
        raise CookieError(f"placeholder {old:#x} found {len(found)} times, not once")
    struct.pack_into("<I", code, found[0] + 4, new & 0xFFFFFFFF)
    struct.pack_into("<I", code, found[0] + 12, new >> 32)


def _patch_imm(code: bytearray, opcode: int, old: int, new: int) -> None:
    found = [i for i in range(0, len(code), 8)
             if code[i] == opcode and struct.unpack_from("<I", code, i + 4)[0] == old]
    if len(found) != 1:
        raise CookieError(f"placeholder {old:#x} found {len(found)} times, not once")
    struct.pack_into("<I", code, found[0] + 4, new)


def load(code: bytes) -> int:
    """Loads the instructions as a tc classifier; returns its file descriptor. Raises
    CookieError with the verifier's last words."""
    number = SYS_BPF.get(platform.machine())
    if number is None:
        raise CookieError(f"bpf() system call number unknown on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    instructions = ctypes.create_string_buffer(code, len(code))
    license_text = ctypes.create_string_buffer(b"GPL")
    verifier_log = ctypes.create_string_buffer(1 << 16)
    attr = ctypes.create_string_buffer(128)      # union bpf_attr, PROG_LOAD part
    struct.pack_into("<IIQQIIQ", attr, 0, BPF_PROG_TYPE_SCHED_CLS, len(code) // 8,
                     ctypes.addressof(instructions), ctypes.addressof(license_text), 1,
                     len(verifier_log), ctypes.addressof(verifier_log))
    struct.pack_into("16s", attr, 48, b"srv6pipes_ck")   # NUL-terminated, <= 16
    fd = libc.syscall(number, BPF_PROG_LOAD, attr, len(attr))
    if fd < 0:
        err = ctypes.get_errno()
        words = verifier_log.value.decode(errors="replace").strip().splitlines()[-3:]
        raise CookieError(f"the kernel refused the BPF program: {os.strerror(err)}"
                          + (f" ({' / '.join(words)})" if words else ""))
    os.set_inheritable(fd, False)
    return fd


CLSACT_EGRESS = 0xFFFFFFF3


def filter_name(name: str) -> str:
    return f"srv6pipes:{name}"


def interfaces(ipr) -> list[tuple[str, int]]:
    """Every interface of the namespace but lo: (name, index)."""
    return [(link.get_attr("IFLA_IFNAME"), link["index"]) for link in ipr.get_links()
            if link.get_attr("IFLA_IFNAME") != "lo"]


def attach(fd: int, name: str, priority: int) -> list[str]:
    """Attaches the loaded program to every interface's ingress. Returns the interfaces
    whose clsact qdisc we added (the state file keeps them for detach); on failure, undoes
    what it did and raises CookieError."""
    from pyroute2 import IPRoute

    added: list[str] = []
    with IPRoute() as ipr:
        try:
            for ifname, index in interfaces(ipr):
                if not any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index)):
                    ipr.tc("add", "clsact", index)
                    added.append(ifname)
                ipr.tc("add-filter", "bpf", index, ":1", fd=fd, name=filter_name(name),
                       parent=CLSACT_INGRESS, classid=1, direct_action=True, prio=priority)
        except Exception as exc:  # NetlinkError
            _detach(ipr, name, added)
            raise CookieError(f"attaching the cookie program failed: {exc}") from exc
    return added


def detach(name: str, added_clsact: list[str]) -> None:
    """Removes every filter named for this instance, on every interface (also a crashed
    predecessor's), and the clsact qdiscs we added that hold nothing else. Never raises."""
    from pyroute2 import IPRoute

    try:
        with IPRoute() as ipr:
            _detach(ipr, name, added_clsact)
    except Exception as exc:  # noqa: BLE001 - removal goes on for the rest of the recipe
        log.warning("removing the cookie program's filters failed: %s", exc)


def _ours(ipr, index: int, name: str) -> list[int]:
    """tc priorities of our filters on one interface's ingress."""
    found = []
    for entry in ipr.get_filters(index, parent=CLSACT_INGRESS):
        options = entry.get_attr("TCA_OPTIONS")
        if options is not None and options.get_attr("TCA_BPF_NAME") == filter_name(name):
            found.append(entry["info"] >> 16)
    return found


def _detach(ipr, name: str, added_clsact: list[str]) -> None:
    for ifname, index in interfaces(ipr):
        try:
            for priority in _ours(ipr, index, name):
                ipr.tc("del-filter", "bpf", index, parent=CLSACT_INGRESS, prio=priority)
            if ifname in added_clsact and not ipr.get_filters(index, parent=CLSACT_INGRESS) \
                    and not ipr.get_filters(index, parent=CLSACT_EGRESS):
                ipr.tc("del", "clsact", index)
        except Exception as exc:  # noqa: BLE001 - one odd interface must not stop the rest
            if getattr(exc, "code", None) not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                log.warning("%s: removing the cookie filter: %s", ifname, exc)
