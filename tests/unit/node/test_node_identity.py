"""Keys: created once with private modes, never replaced, refused when corrupt or too open."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest
import zmq

from node import identity
from node.errors import KeyFileError


def test_created_once_private_and_stable(tmp_path: Path) -> None:
    keys = identity.ensure_node_keys(tmp_path / "keys")
    again = identity.ensure_node_keys(tmp_path / "keys")
    assert keys == again
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    for path in [tmp_path / "keys" / "node.key", *(tmp_path / "keys" / "local").glob("*.key")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert set(keys.local) == set(identity.LOCAL_ROLES)
    # A valid CurveZMQ keypair: libzmq derives the same public key from the secret.
    assert zmq.curve_public(keys.identity.secret.encode()).decode() == keys.identity.public
    assert keys.identity.secret not in repr(keys)


def test_racing_processes_agree_on_one_key(tmp_path: Path) -> None:
    results: list[identity.KeyPair] = []
    threads = [threading.Thread(target=lambda: results.append(identity.load_or_create(tmp_path / "k")))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.public for r in results}) == 1


@pytest.mark.parametrize("content", ["", "{garbage", json.dumps({"format": "mlnode-curve-key/1"}),
                                     json.dumps({"format": "other", "public": "x", "secret": "y"})])
def test_corrupt_file_is_an_error_and_left_alone(tmp_path: Path, content: str) -> None:
    path = tmp_path / "node.key"
    path.write_text(content)
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match="corrupt"):
        identity.load_or_create(path)
    assert path.read_text() == content


def test_mismatched_halves_are_corrupt(tmp_path: Path) -> None:
    a, b = identity.KeyPair.generate(), identity.KeyPair.generate()
    path = tmp_path / "node.key"
    path.write_text(json.dumps({"format": "mlnode-curve-key/1", "public": a.public, "secret": b.secret}))
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match="does not match"):
        identity.load(path)


def test_too_open_file_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    identity.load_or_create(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        identity.load(path)


def test_public_key_text_forms() -> None:
    pair = identity.KeyPair.generate()
    assert identity.public_from_text(pair.public) == pair.public
    assert identity.public_from_text(pair.public_hex) == pair.public
    with pytest.raises(ValueError):
        identity.public_from_text("short")
    assert identity.z85_decode(identity.z85_encode(b"\x00\x01\x02\x03")) == b"\x00\x01\x02\x03"
    for bad in ("~" * 40, "#" * 40, "abc"):
        with pytest.raises(ValueError):
            identity.z85_decode(bad)


def test_a_program_holds_only_its_own_secret(tmp_path: Path) -> None:
    """``role_keys``: the gateway gets its own keypair and the others' public halves; only train (peer
    links) gets the identity's secret; the gateway reads no other key file at all."""
    keys_dir = tmp_path / "keys"
    full = identity.ensure_node_keys(keys_dir)
    gateway = identity.role_keys(keys_dir, "gateway")
    assert gateway.local["gateway"] == full.local["gateway"]
    assert all(not pair.has_secret and pair.public == full.local[role].public
               for role, pair in gateway.local.items() if role != "gateway")
    assert not gateway.identity.has_secret and gateway.identity.public == full.identity.public
    train = identity.role_keys(keys_dir, "train", with_identity=True)
    assert train.identity == full.identity and not train.local["pow"].has_secret
    # Ruin every other secret key file: the gateway never opens them.
    for path in [keys_dir / "node.key", *(keys_dir / "local").glob("*.key")]:
        if path.name != "gateway.key":
            path.write_text("{garbage")
    assert identity.role_keys(keys_dir, "gateway").local["pow"].public == full.local["pow"].public


def test_the_gateway_never_creates_keys(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="mlnode up"):
        identity.role_keys(tmp_path / "keys", "gateway")
    assert not (tmp_path / "keys" / "node.key").exists()
    pow_keys = identity.role_keys(tmp_path / "keys", "pow")  # a service started alone creates them once
    assert pow_keys.local["pow"].has_secret and not pow_keys.identity.has_secret
    assert (tmp_path / "keys" / "public.json").stat().st_mode & 0o077 == 0
