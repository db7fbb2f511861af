"""A JSON statistics socket for the controller and the agents (asyncio, Unix socket).

Each connection gets one line: ``stats()`` as JSON, then the socket closes. Created 0600:
only root reads it (``pipes-controller --stats``, ``pipes-agent --stats``).
"""
from __future__ import annotations

import asyncio
import json
import os


async def start_stats_socket(path: str, stats) -> asyncio.AbstractServer:
    """A Unix socket: each connection gets one JSON line of ``stats()`` (0600, root)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    unlink_socket(path)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(json.dumps(stats(), sort_keys=True).encode() + b"\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    old = os.umask(0o077)
    try:
        return await asyncio.start_unix_server(handle, path)
    finally:
        os.umask(old)


def read_stats(path: str, timeout: float = 5.0) -> dict:
    """The JSON a stats socket serves (client side of start_stats_socket)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return json.loads(data)


def unlink_socket(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
