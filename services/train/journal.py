"""What the train process must remember across a restart: the running request and the peer registry.

``run.json`` keeps the ``train/start`` body as the client sent it, so a process killed and restarted
by supervisord resumes the same run (from its newest checkpoint) while the node mode still says
TRAIN. ``peers.json`` keeps every task's registered peers, so a restart does not forget the keys the
Network Node gave us. Every write is tmp + fsync + rename: a ``kill -9`` leaves the old or the new file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from node.files import atomic_write_json
from node.logging import get_logger

log = get_logger(__name__)


def read_json(path: Path) -> Any:
    """The JSON document at ``path``, or None when it is missing or unreadable (logged)."""
    try:
        return json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.error("train_journal_unreadable", path=str(path), error=str(exc))
        return None


class RunJournal:
    """The request of the run in progress (``run.json``); absent when nothing should resume."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "run.json"

    def save(self, body: dict[str, Any]) -> None:
        atomic_write_json(self.path, {"version": 1, "body": body})

    def load(self) -> dict[str, Any] | None:
        doc = read_json(self.path)
        if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(doc.get("body"), dict):
            return None
        body: dict[str, Any] = doc["body"]
        return body

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


class PeerStore:
    """``peers.json``: the registry's ``list`` answer ({"tasks": [{task_id, peers}]}) as last committed."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "peers.json"

    def save(self, listing: dict[str, Any]) -> None:
        atomic_write_json(self.path, listing)

    def load(self) -> list[dict[str, Any]]:
        doc = read_json(self.path)
        tasks = doc.get("tasks") if isinstance(doc, dict) else None
        return [t for t in tasks if isinstance(t, dict)] if isinstance(tasks, list) else []
