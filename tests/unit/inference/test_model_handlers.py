"""The model cache's answers with HF_HUB_OFFLINE set (the node's integration tests run with it unset).

huggingface_hub reads ``HF_HUB_OFFLINE`` once, at import, into ``constants.HF_HUB_OFFLINE``; the test
sets that value as the variable would have.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from huggingface_hub import constants

from contracts.models import ModelRef
from node import config
from services.inference.models.handlers import ModelHandlers


def handlers(tmp_path: Path) -> ModelHandlers:
    settings = config.load({"MLNODE_STATE_DIR": str(tmp_path / "state")})
    found = ModelHandlers(settings, lambda: [])
    found.cache.cache_dir = tmp_path / "hub"
    return found


def test_offline_download_is_ignored_and_starts_nothing(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    h = handlers(tmp_path)
    ref = ModelRef("org/model")
    answer = asyncio.run(h.download(ref, None))
    assert answer == {"task_id": "org/model:latest", "status": "IGNORED",
                      "model": {"hf_repo": "org/model", "hf_commit": None}}
    assert h.downloads.tasks == {}


def test_offline_a_complete_model_is_still_downloaded(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    h = handlers(tmp_path)
    commit = "a" * 40
    snapshot = h.cache.snapshot("org/model", commit)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (h.cache.repo_dir("org/model") / "refs").mkdir()
    (h.cache.repo_dir("org/model") / "refs" / "main").write_text(commit)
    assert asyncio.run(h.status(ModelRef("org/model"), None))["status"] == "PARTIAL"
    h.cache.write_record("org/model", commit, {"config.json": {"size": 2, "git_sha1": "x"}})
    assert asyncio.run(h.status(ModelRef("org/model"), None))["status"] == "DOWNLOADED"
    assert asyncio.run(h.download(ModelRef("org/model", commit), None))["status"] == "DOWNLOADED"
