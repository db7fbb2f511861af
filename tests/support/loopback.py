"""Small loopback-socket helpers shared by unit tests."""
import os
import socket
from contextlib import closing


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with closing(socket.socket(socket.AF_INET6, socket.SOCK_STREAM)) as sock:
        sock.bind(("::1", 0))
        return sock.getsockname()[1]


def open_descriptors() -> int:
    """How many descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))
