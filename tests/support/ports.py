"""The one way tests get a port.

Binding port 0, closing the socket and handing the number on is a race: until the other process binds
it, any port-0 bind (another test, another xdist worker, a client's source port) may be given the same
number. So:

* code that can take a socket gets one already bound (:func:`bound_socket`): nothing can take its port;
* a number for another process comes from below the kernel's ephemeral range (port-0 binds and client
  source ports never land there), is checked free by binding it, and is claimed for the life of this
  test process by an ``flock`` on a per-port file, so two workers or sessions never pick the same one.
"""

from __future__ import annotations

import random
import socket
import tempfile
from pathlib import Path

from node.files import lock_file, unlock_file

#: Lowest port handed out: clear of the well-known and registered ports daemons tend to use.
LOW = 10000

_CLAIMS = Path(tempfile.gettempdir()) / "mlnode-test-ports"
_held: dict[int, int] = {}  # port -> open fd whose flock claims it
_rng = random.Random()


def ephemeral_floor() -> int:
    """The lowest port the kernel hands out for port-0 binds and outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _claim(port: int) -> bool:
    if port in _held:
        return False
    try:
        fd = lock_file(_CLAIMS / str(port), timeout=0)
    except PermissionError:  # another user's claim file (anything else, e.g. out of descriptors, is raised)
        return False
    if fd is None:  # another process holds it
        return False
    _held[port] = fd
    return True


def _release(port: int) -> None:
    unlock_file(_held.pop(port))


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int = 1, *, span: int = 1) -> list[int]:
    """``n`` ports, each the first of ``span`` consecutive free ones (e.g. engines use INFERENCE_PORT+1…),
    all claimed by this process until it exits."""
    top = ephemeral_floor() - span
    found: list[int] = []
    while len(found) < n:
        base = _rng.randrange(LOW, top)
        claimed: list[int] = []
        for port in range(base, base + span):
            if not _claim(port):
                break
            claimed.append(port)
        if len(claimed) == span and all(_bindable(port) for port in claimed):
            found.append(base)
            continue
        for port in claimed:
            _release(port)
    return found


def free_port() -> int:
    """One free port for another process to bind, claimed by this process until it exits."""
    return free_ports(1)[0]


def bound_socket() -> tuple[socket.socket, int]:
    """A listening-ready TCP socket on 127.0.0.1 and its port, for in-process servers that accept one."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock, int(sock.getsockname()[1])
