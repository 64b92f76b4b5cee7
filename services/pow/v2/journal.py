"""What PoC v2 must remember across a ``kill -9`` of pow: running loops and accepted jobs.

Artifacts themselves live in the outbox. Here: one file per engine port with the loop's init body and
its next sequence index (so a restarted pow continues the dense sequence instead of starting over),
and one file per accepted ``/generate`` job that has a callback url (removed once its result is in the
outbox). Every write is tmp + fsync + rename.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from node.files import atomic_write_json


class V2Journal:
    def __init__(self, directory: Path) -> None:
        self.loops = directory / "loops"
        self.jobs = directory / "jobs"
        for d in (self.loops, self.jobs):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def save_loop(self, port: int, doc: dict[str, Any]) -> None:
        atomic_write_json(self.loops / f"{port}.json", doc)

    def clear_loop(self, port: int) -> None:
        (self.loops / f"{port}.json").unlink(missing_ok=True)

    def loop_docs(self) -> dict[int, dict[str, Any]]:
        return {int(path.stem): doc for path, doc in _docs(self.loops) if path.stem.isdigit()}

    def save_job(self, job_id: str, doc: dict[str, Any]) -> None:
        atomic_write_json(self.jobs / f"{job_id}.json", doc)

    def drop_job(self, job_id: str) -> None:
        (self.jobs / f"{job_id}.json").unlink(missing_ok=True)

    def job_docs(self) -> list[tuple[str, dict[str, Any]]]:
        """Accepted jobs, oldest first (by file time: the order they were accepted in)."""
        found = [(path, doc) for path, doc in _docs(self.jobs)]
        found.sort(key=lambda item: (item[1].get("accepted", 0.0), item[0].name))
        return [(path.stem, doc) for path, doc in found]

    def clear(self) -> None:
        for d in (self.loops, self.jobs):
            for path in d.glob("*.json"):
                path.unlink(missing_ok=True)


def _docs(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(directory.glob("*.json")):
        try:
            doc = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict):
            out.append((path, doc))
    return out
