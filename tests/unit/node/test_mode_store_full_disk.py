"""A full disk must not keep a mode claim alive: recording STOPPED falls back to removing the claim."""

from __future__ import annotations

from pathlib import Path

import pytest

import node.mode
from node.errors import Unavailable
from node.mode import STOPPED, ModeStore


def test_stopped_is_recorded_by_removing_the_claim_when_the_disk_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ModeStore(tmp_path)
    store.write("POW")
    assert store.read() == "POW"

    def full(*_args: object, **_kw: object) -> None:
        raise Unavailable("No space left on device")

    monkeypatch.setattr(node.mode, "atomic_write_json", full)
    store.write(STOPPED)
    assert store.read() == STOPPED and not store.path.exists()
    with pytest.raises(Unavailable):
        store.write("POW")  # a start still answers 503 until space returns


def test_the_lock_is_not_waited_for_beyond_the_timeout(tmp_path: Path) -> None:
    store = ModeStore(tmp_path)
    held = store.acquire()
    try:
        assert store.try_acquire(0.05) is None
    finally:
        store.release(held)
    fd = store.try_acquire(0.05)
    assert fd is not None
    store.release(fd)
