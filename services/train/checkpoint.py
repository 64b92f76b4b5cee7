"""Crash-safe checkpoints of a worker, newest ``topk`` kept.

A checkpoint is written to a temporary file, fsynced, renamed into place and the directory fsynced,
so a power cut leaves either the old set or the new file, never a torn one. Loading uses
``weights_only`` unpickling: a checkpoint directory is data, never code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from node.errors import InvalidRequest, Unavailable
from node.files import atomic_file
from node.logging import get_logger
from services.train.diloco import DiLoCoWorker

log = get_logger(__name__)

_NAME_RE = re.compile(r"^step-(\d{9,})\.pt$")


def checkpoint_name(inner_step: int) -> str:
    return f"step-{inner_step:09d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first (temporary files are skipped)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME_RE.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_checkpoint(
    worker: DiLoCoWorker, directory: str | Path | None = None, *, topk: int | None = None
) -> Path:
    """Write the worker's full state atomically, then delete all but the newest ``topk``."""
    root = Path(directory if directory is not None else worker.plan.ckpt.path)
    keep = topk if topk is not None else worker.plan.ckpt.topk
    if keep < 1:
        raise InvalidRequest(f"topk must be >= 1, got {keep}")
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(worker.inner_steps_done)
    try:
        with atomic_file(final) as fh:
            torch.save(worker.state_dict(), fh)
    except OSError as exc:
        raise Unavailable(f"cannot write checkpoint {final}: {exc}") from exc
    for old in list_checkpoints(root)[:-keep]:
        old.unlink(missing_ok=True)
    log.info("checkpoint_saved", path=str(final), inner_step=worker.inner_steps_done, topk=keep)
    return final


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The state dict stored at ``path`` (tensors on CPU)."""
    try:
        state: dict[str, Any] = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InvalidRequest(f"checkpoint {path} does not exist") from None
    except Exception as exc:
        raise InvalidRequest(f"checkpoint {path} is unreadable: {exc}") from exc
    return state


def resume(worker: DiLoCoWorker, path: str | Path | None = None) -> Path | None:
    """Load ``path`` (default: the newest in the plan's checkpoint dir) into ``worker``; None if none."""
    target = Path(path) if path is not None else latest_checkpoint(worker.plan.ckpt.path)
    if target is None:
        return None
    worker.load_state_dict(load_checkpoint(target))
    log.info("checkpoint_resumed", path=str(target), inner_step=worker.inner_steps_done)
    return target


def checkpoint_due(worker: DiLoCoWorker) -> bool:
    """True right after an inner step that lands on the plan's checkpoint interval."""
    interval = worker.plan.ckpt.interval
    return interval is not None and worker.inner_steps_done > 0 and worker.inner_steps_done % interval == 0
