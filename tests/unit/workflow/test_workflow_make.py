"""The Makefile workflow in DRY_RUN mode: exact release commands and version validation."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from node import config

REPO = Path(__file__).resolve().parents[3]


def make(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in {"VERSION", "DRY_RUN", "IMAGE", "MAKEFLAGS"}}
    full.update(env)
    return subprocess.run(["make", "-s", "--no-print-directory", *args], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=60)


def commands(out: str) -> list[str]:
    return [line[2:] for line in out.splitlines() if line.startswith("+ ")]


def test_release_prints_every_step_in_order() -> None:
    proc = make("release", "VERSION=1.4.0-rc2", "DRY_RUN=1")
    assert proc.returncode == 0, proc.stderr
    assert commands(proc.stdout) == [
        "make --no-print-directory test",
        "docker build -t ghcr.io/mlnode/mlnode:1.4.0-rc2 .",
        "docker push ghcr.io/mlnode/mlnode:1.4.0-rc2",
        "git tag release/v1.4.0-rc2",
        "git push origin release/v1.4.0-rc2",
    ]


def test_release_latest_also_moves_latest_and_registry_is_a_variable() -> None:
    proc = make("release-latest", "VERSION=2.0.0", "DRY_RUN=1", "REGISTRY=registry.example", "IMAGE_ORG=acme")
    assert proc.returncode == 0, proc.stderr
    cmds = commands(proc.stdout)
    assert cmds[-2:] == ["docker tag registry.example/acme/mlnode:2.0.0 registry.example/acme/mlnode:latest",
                         "docker push registry.example/acme/mlnode:latest"]


@pytest.mark.parametrize("version", ["1.2", "v1.2.3", "1.2.3-gamma1", "1.2.3-rc", "1.2.3.4", "latest"])
def test_bad_versions_are_refused_before_any_work(version: str) -> None:
    for target in ("build-release", "release", "push-release"):
        proc = make(target, f"VERSION={version}", "DRY_RUN=1")
        assert proc.returncode != 0
        assert "is not X.Y.Z" in proc.stderr
        assert commands(proc.stdout) == []


@pytest.mark.parametrize("version", ["0.1.0", "10.20.30-alpha1", "1.0.0-beta12"])
def test_good_versions_build(version: str) -> None:
    proc = make("build-release", f"VERSION={version}", "DRY_RUN=1")
    assert commands(proc.stdout) == [f"docker build -t ghcr.io/mlnode/mlnode:{version} ."]


def test_unset_version_uses_git_describe() -> None:
    described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip() or "dev"
    proc = make("build-release", "DRY_RUN=1")
    assert commands(proc.stdout) == [f"docker build -t ghcr.io/mlnode/mlnode:{described} ."]


def test_container_targets_say_plainly_when_there_is_no_engine() -> None:
    probe = subprocess.run(["docker", "info"], capture_output=True, timeout=30) if _has_docker() else None
    if probe is not None and probe.returncode == 0:
        pytest.skip("a Docker engine is available here")
    proc = make("unit-tests")
    assert proc.returncode != 0
    assert "No Docker engine is available" in proc.stdout and "unit-tests-local" in proc.stdout


def _has_docker() -> bool:
    return any((Path(p) / "docker").exists() for p in os.environ.get("PATH", "").split(os.pathsep))


def test_readme_documents_every_variable_and_opens_with_the_two_commands() -> None:
    readme = (REPO / "README.md").read_text()
    head = "\n".join(readme.splitlines()[:10])
    assert "make run" in head and "make test" in head
    for var in config.VARIABLES:
        assert re.search(rf"\| `{var.name}` \|", readme), var.name
