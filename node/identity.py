"""CURVE identities: the node's long-term keypair and the node-local keys of its processes.

Keys are Curve25519 keypairs (the curve CurveZMQ uses), stored as small JSON files with mode 0600 in a
0700 directory. A key is created once, under an exclusive lock so that racing processes agree, and is
never silently replaced: a file that exists but cannot be read, is corrupt, or is readable by others
stops the process with a :class:`~node.errors.KeyFileError` that says what to do.

Layout under ``MLNODE_STATE_DIR/keys``:

- ``node.key`` — the long-term identity, published by ``GET /api/v1/identity``, used on peer links.
- ``local/<role>.key`` — one per local process role (gateway, pow, inference, train, cli); the local
  bus admits exactly these public keys.
- ``public.json`` — every public half, rewritten from the key files whenever they are ensured.

Each program holds only what it needs (:func:`role_keys`): its own local keypair and the public halves
of the others; only ``train`` (peer links) holds the identity's secret. The network-facing gateway never
opens a secret key file but its own. :func:`ensure_node_keys` (``mlnode up``, before any program
starts) is the one place that creates keys.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from nacl.public import PrivateKey
from zmq.utils import z85  # the encoding ZeroMQ's CURVE options take; no socket is opened here

from node.errors import KeyFileError
from node.files import atomic_file, locked

LOCAL_ROLES = ("gateway", "pow", "inference", "train", "cli")
_FORMAT = "mlnode-curve-key/1"


@dataclass(frozen=True)
class KeyPair:
    """A CURVE keypair; ``public``/``secret`` are the 40-character Z85 texts ZeroMQ expects. A pair with
    an empty ``secret`` is another party's public key only."""

    public: str
    secret: str = ""

    @property
    def has_secret(self) -> bool:
        return bool(self.secret)

    @property
    def public_hex(self) -> str:
        return z85_decode(self.public).hex()

    def __repr__(self) -> str:  # never print the secret half
        return f"KeyPair(public={self.public!r})"

    @classmethod
    def generate(cls) -> KeyPair:
        sk = PrivateKey.generate()
        return cls(public=z85_encode(bytes(sk.public_key)), secret=z85_encode(bytes(sk)))


def public_from_text(text: str) -> str:
    """Normalise a public key given as Z85 (40 chars) or hex (64 chars) to Z85; ValueError if neither."""
    text = text.strip()
    if len(text) == 64:
        raw = bytes.fromhex(text)
    elif len(text) == 40:
        raw = z85_decode(text)
    else:
        raise ValueError("a CURVE public key is 40 Z85 characters or 64 hex characters")
    if len(raw) != 32:
        raise ValueError("a CURVE public key is 32 bytes")
    return z85_encode(raw)


def z85_encode(data: bytes) -> str:
    """Z85 text of ``data`` (a multiple of 4 bytes), as key files and APIs print it."""
    return z85.encode(data).decode("ascii")


def z85_decode(text: str) -> bytes:
    """The bytes of Z85 ``text``; ValueError for anything that is not Z85 (pyzmq raises a zoo)."""
    try:
        return z85.decode(text.encode("ascii"))
    except (KeyError, ValueError, UnicodeError, struct.error) as exc:
        raise ValueError(f"not Z85 text ({type(exc).__name__})") from None


def _locked(directory: Path) -> AbstractContextManager[None]:
    return locked(directory / ".lock")


def _read(path: Path) -> KeyPair:
    try:
        st = path.stat()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise KeyFileError(
            f"key file {path} is accessible by other users (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run: chmod 600 {path}"
        )
    try:
        doc = json.loads(path.read_text("utf-8"))
        if doc.get("format") != _FORMAT:
            raise ValueError("unknown format")
        public, secret = str(doc["public"]), str(doc["secret"])
        derived = z85_encode(bytes(PrivateKey(z85_decode(secret)).public_key))
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise KeyFileError(
            f"key file {path} is corrupt ({type(exc).__name__}); restore it from backup or move it away "
            "to create a new identity"
        ) from None
    if derived != public:
        raise KeyFileError(f"key file {path} is corrupt: its public key does not match its secret key")
    return KeyPair(public=public, secret=secret)


def _write_new(path: Path, pair: KeyPair) -> None:
    doc = {"format": _FORMAT, "public": pair.public, "secret": pair.secret, "created": time.time()}
    with atomic_file(path, exclusive=True) as fh:  # fails if someone else created it: never replace a key
        fh.write(json.dumps(doc).encode())


def load_or_create(path: Path) -> KeyPair:
    """Return the keypair stored at ``path``, creating it (0600) only when no file exists."""
    with _locked(path.parent):
        if path.exists() or path.is_symlink():
            return _read(path)
        pair = KeyPair.generate()
        _write_new(path, pair)
        return pair


def load(path: Path) -> KeyPair:
    """Read an existing keypair; a missing file is an error (nothing is created)."""
    return _read(path)


@dataclass(frozen=True)
class NodeKeys:
    """Every key a process of this node needs: the identity and all local roles' keypairs."""

    identity: KeyPair
    local: dict[str, KeyPair]

    def local_publics(self) -> set[str]:
        return {pair.public for pair in self.local.values()}


def ensure_node_keys(keys_dir: Path) -> NodeKeys:
    """Create (first start) or load the node identity and the local role keys; (re)write public.json."""
    os.makedirs(keys_dir, mode=0o700, exist_ok=True)
    os.chmod(keys_dir, 0o700)
    identity = load_or_create(keys_dir / "node.key")
    local_dir = keys_dir / "local"
    os.makedirs(local_dir, mode=0o700, exist_ok=True)
    os.chmod(local_dir, 0o700)
    local = {role: load_or_create(local_dir / f"{role}.key") for role in LOCAL_ROLES}
    keys = NodeKeys(identity=identity, local=local)
    _write_publics(keys_dir, keys)
    return keys


_PUBLIC_FORMAT = "mlnode-public-keys/1"


def _write_publics(keys_dir: Path, keys: NodeKeys) -> None:
    doc = {"format": _PUBLIC_FORMAT, "identity": keys.identity.public,
           "local": {role: pair.public for role, pair in keys.local.items()}}
    path = keys_dir / "public.json"
    try:
        if json.loads(path.read_text("utf-8")) == doc:
            return
    except (OSError, ValueError):
        pass
    with _locked(keys_dir), atomic_file(path) as fh:
        fh.write(json.dumps(doc).encode())


def _read_publics(keys_dir: Path) -> tuple[str, dict[str, str]]:
    path = keys_dir / "public.json"
    try:
        doc = json.loads(path.read_text("utf-8"))
        if doc.get("format") != _PUBLIC_FORMAT:
            raise ValueError("unknown format")
        identity = public_from_text(str(doc["identity"]))
        local = {role: public_from_text(str(doc["local"][role])) for role in LOCAL_ROLES}
    except FileNotFoundError:
        raise KeyFileError(f"{path} is missing: start the node with `mlnode up`, which creates the keys "
                           "before any program starts") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise KeyFileError(f"{path} is unreadable or corrupt ({type(exc).__name__}); `mlnode up` "
                           "rewrites it from the key files") from None
    return identity, local


#: Programs that never create keys (and so never read another program's secret): the network-facing one.
NEVER_CREATES = frozenset({"gateway"})


def role_keys(keys_dir: Path, role: str, *, with_identity: bool = False) -> NodeKeys:
    """What the program ``role`` holds: its own keypair, the others' public halves, and the identity's
    secret only when ``with_identity`` (peer links). Reads no other secret key file -- except, for a
    program other than the gateway started on a state directory no ``mlnode up`` has prepared, the one
    time it creates the keys (and then keeps only its own)."""
    if role not in LOCAL_ROLES:
        raise KeyFileError(f"{role!r} is not a local role ({', '.join(LOCAL_ROLES)})")
    if role not in NEVER_CREATES and not (keys_dir / "public.json").exists():
        ensure_node_keys(keys_dir)
    identity_public, publics = _read_publics(keys_dir)
    own = load(keys_dir / "local" / f"{role}.key")
    if own.public != publics[role]:
        raise KeyFileError(f"{keys_dir / 'public.json'} does not match {role}.key: run `mlnode up`, "
                           "which rewrites it from the key files")
    local = {name: own if name == role else KeyPair(public) for name, public in publics.items()}
    identity = load(keys_dir / "node.key") if with_identity else KeyPair(identity_public)
    if identity.public != identity_public:
        raise KeyFileError(f"{keys_dir / 'public.json'} does not match node.key: run `mlnode up`")
    return NodeKeys(identity=identity, local=local)
