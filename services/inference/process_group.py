"""Engine process groups: spawn them so none can outlive the ``inference`` process, and clean up.

Three layers, because engines (vLLM above all) hold GPU memory and fork workers of their own:

* every engine leads its own session and process group, so a stop signals the engine *and* all its
  workers (``signal_group``), SIGTERM first, SIGKILL when the grace time runs out;
* the child asks the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``), so a ``kill -9``
  of ``inference`` takes the engine leaders with it at once;
* a pid file lists the live groups; the next ``inference`` start kills whatever is left in them
  (workers of a leader killed by the death signal, say) before launching anything.

Every engine carries ``MLNODE_ENGINE_OF=<this node's inference dir>`` in its environment, and only
processes carrying it are signalled: a recycled pid or process group id never kills a stranger, and two
nodes on one machine never kill each other's engines.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from node.files import atomic_write_json
from node.logging import get_logger
from node.process import die_with_parent

log = get_logger(__name__)

MARKER_VAR = "MLNODE_ENGINE_OF"


def child_setup(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn``: die with the parent (and at once if it already died during the fork)."""

    def setup() -> None:
        die_with_parent(signal.SIGKILL)
        if os.getppid() != parent_pid:
            os._exit(1)

    return setup


def _stat_fields(pid: int) -> tuple[str, int] | None:
    """(state, process group) of ``pid`` from /proc, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields start after the last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    if len(fields) < 3:
        return None
    return fields[0].decode(), int(fields[2])


def _carries(pid: int, marker: bytes) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return marker in environ.split(b"\0")


def marker_entry(marker: str) -> bytes:
    return f"{MARKER_VAR}={marker}".encode()


def group_members(pgid: int, marker: str) -> list[int]:
    """Live (non-zombie) processes of group ``pgid`` that carry this node's engine marker."""
    entry = marker_entry(marker)
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        fields = _stat_fields(pid)
        if fields is None or fields[1] != pgid or fields[0] == "Z":
            continue
        if _carries(pid, entry):
            members.append(pid)
    return members


def signal_group(pgid: int, sig: int, marker: str) -> int:
    """Send ``sig`` to every marked member of the group; returns how many were signalled."""
    count = 0
    for pid in group_members(pgid, marker):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
            count += 1
    return count


def kill_groups(pgids: Iterable[int], marker: str, timeout_s: float = 5.0) -> int:
    """SIGKILL every marked member of the groups and wait (bounded) until they are gone."""
    groups = list(pgids)
    killed = sum(signal_group(g, signal.SIGKILL, marker) for g in groups)
    deadline = time.monotonic() + timeout_s
    while killed and time.monotonic() < deadline:
        if not any(group_members(g, marker) for g in groups):
            break
        time.sleep(0.05)
    return killed


class PidFile:
    """The process groups of the live engines, kept on disk for the next start to clean up after."""

    def __init__(self, path: Path, marker: str) -> None:
        self.path = path
        self.marker = marker

    def write(self, pgids: Iterable[int]) -> None:
        atomic_write_json(self.path, {"owner_pid": os.getpid(), "pgids": sorted(set(pgids))})

    def read(self) -> list[int]:
        try:
            data = json.loads(self.path.read_text("utf-8"))
            return [int(p) for p in data.get("pgids", []) if int(p) > 1]
        except (OSError, ValueError, TypeError, AttributeError):
            return []

    def sweep(self) -> int:
        """Kill what a previous ``inference`` left behind; returns how many processes were killed."""
        pgids = self.read()
        killed = kill_groups(pgids, self.marker) if pgids else 0
        if killed:
            log.warning("orphan_engines_killed", count=killed, groups=pgids)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        return killed
