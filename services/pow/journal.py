"""What the pow process must remember across a crash: the round, its progress, accepted validations.

Generated results live in the outbox; this journal holds the rest. ``round.json`` keeps the InitDto as
sent, the phase and each compute group's next nonce index, so a restarted process resumes where it
stopped instead of starting the sequence again. Each accepted ProofBatch is written to ``validate/``
before the client gets its 200 and removed only after its result is in the outbox. Every write is
tmp + fsync + rename, so a ``kill -9`` leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from node.files import atomic_write_json


class Journal:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.queue_dir = directory / "validate"
        self.queue_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.round_path = directory / "round.json"

    # -- the round --------------------------------------------------------------------------
    def save_round(self, doc: dict[str, Any]) -> None:
        atomic_write_json(self.round_path, doc)

    def load_round(self) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.round_path.read_text("utf-8"))
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def clear_round(self) -> None:
        self.round_path.unlink(missing_ok=True)
        for path in self.queue_dir.glob("*.json"):
            path.unlink(missing_ok=True)

    # -- accepted validation batches ----------------------------------------------------------
    def enqueue(self, batch: dict[str, Any]) -> str:
        existing = sorted(self.queue_dir.glob("*.json"))
        last = int(existing[-1].stem) if existing else 0
        name = f"{last + 1:012d}"
        atomic_write_json(self.queue_dir / f"{name}.json", batch)
        return name

    def pending(self) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for path in sorted(self.queue_dir.glob("*.json")):
            try:
                out.append((path.stem, json.loads(path.read_text("utf-8"))))
            except (OSError, ValueError):
                continue
        return out

    def done(self, name: str) -> None:
        (self.queue_dir / f"{name}.json").unlink(missing_ok=True)
