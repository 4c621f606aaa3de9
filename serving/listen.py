"""Claiming the server's address before the model loads, and saying plainly why it could not be claimed."""
from __future__ import annotations

import errno
import socket


def bind_socket(host: str, port: int) -> socket.socket:
    """Claim the address before the model loads (seconds), so a busy port is one clear line, not a traceback
    after the load. Listening at once (another server cannot claim it meanwhile): connections made during the
    load wait in the backlog and are served when the server is up. OSError says why."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp does: restart over TIME_WAIT
    try:
        sock.bind(addr)
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def bind_error(host: str, port: int, e: OSError) -> str:
    if e.errno == errno.EADDRINUSE:
        return (f"cannot listen on {host}:{port}: the address is already in use (another server?); "
                f"stop it, or choose another --port (--port 0 picks a free one)")
    if e.errno == errno.EACCES:
        return f"cannot listen on {host}:{port}: permission denied (ports below 1024 need privileges)"
    return f"cannot listen on {host}:{port}: {e.strerror or e}"
