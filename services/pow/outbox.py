"""The durable outbox of PoC results waiting to reach the Network Node's callback URL.

The network pays for valid nonces only when they reach ``{url}/generated``, and a validator's verdict
counts only when it reaches ``{url}/validated``. The receiver may be down for minutes and the process may
be killed at any instant, so every result is written to disk before :meth:`Outbox.put` returns and leaves
the disk only once the receiver has answered 2xx (or refused it for good: the ``dead`` table).

Storage: one SQLite file in WAL mode with ``synchronous=FULL`` rather than a hand-written append-only
log. The outbox needs more than appends: merging rewrites several queued batches into one send unit,
delivery deletes from the head, dead-lettering moves rows between tables, and each of these must be
all-or-nothing across a ``kill -9``. SQLite gives atomic multi-row transactions, crash recovery of a torn
tail (the WAL), an fsync of the WAL on every commit (so ``put`` is durable when it returns), clean
SQLITE_FULL/IOERR errors that roll back without touching committed data, and a file operators can inspect
with the ``sqlite3`` shell. A log would need its own framing, checksums, tail repair and compaction.

Model: each url has its own FIFO queue (rows ordered by an AUTOINCREMENT id that is never reused). A
row is *open* until the sender picks it as the head of its url; :meth:`Outbox.next_unit` then *seals*
it: consecutive open ``generated`` rows with the same (public_key, block_hash, block_height, node_id)
are folded into the head row in one transaction, and from then on its bytes never change. A retry, even
after a restart, therefore sends exactly the same bytes, and the receiver can tell it is a repeat.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from node.errors import ConfigError, InvalidRequest, Unavailable
from node.files import fsync_dir
from node.logging import get_logger

log = get_logger(__name__)

Kind = Literal["generated", "validated"]
KINDS: tuple[str, ...] = ("generated", "validated")
SCHEMA_VERSION = 1
DEFAULT_MAX_MERGED_NONCES = 50_000
_GENERATED_FIELDS = ("public_key", "block_hash", "block_height", "nonces", "dist", "node_id")
_V2_KEY_FIELDS = ("public_key", "block_hash", "block_height", "node_id", "request_id")
_NOT_OURS = ("SQLITE_NOTADB", "SQLITE_CORRUPT")

_SCHEMA = """
CREATE TABLE queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ('generated', 'validated')),
    url TEXT NOT NULL,
    merge_key TEXT,
    body BLOB NOT NULL,
    members INTEGER NOT NULL DEFAULT 1,
    nonces INTEGER NOT NULL,
    sealed INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    last_error TEXT
);
CREATE INDEX queue_by_url ON queue (url, id);
CREATE TABLE dead (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    url TEXT NOT NULL,
    body BLOB NOT NULL,
    members INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    status INTEGER,
    reason TEXT,
    created REAL NOT NULL,
    dead_at REAL NOT NULL
);
CREATE TABLE counters (name TEXT PRIMARY KEY, value NOT NULL);
"""


@dataclass(frozen=True)
class Unit:
    """One sealed send unit: the exact bytes to POST, and the queue row they live in."""

    id: int
    kind: Kind
    url: str
    body: bytes
    members: int
    nonces: int
    attempts: int
    created: float

    @property
    def target(self) -> str:
        """The callback address; the url is used verbatim, exactly as the reference builds it."""
        return f"{self.url}/{self.kind}"


def encode_batch(kind: str, url: str, batch: Any) -> tuple[bytes, str | None, int]:
    """Check a batch and encode it as strict JSON; returns (body, merge key or None, nonce count).

    Strict JSON (no NaN/Infinity) because the receiver is a Go service whose decoder rejects them: a
    batch it cannot parse would be refused and lost, so the caller must learn about it at ``put`` time.
    """
    if kind not in KINDS:
        raise InvalidRequest(f"outbox kind must be 'generated' or 'validated', got {kind!r}")
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidRequest(f"url must be an http(s) URL with a host, got {url!r}")
    if not isinstance(batch, dict):
        raise InvalidRequest(f"batch must be a JSON object, got {type(batch).__name__}")
    v2 = kind == "generated" and "artifacts" in batch
    nonces = batch.get("artifacts" if v2 else "nonces", [])
    if not isinstance(nonces, list):
        raise InvalidRequest(f"batch.nonces must be a list, got {type(nonces).__name__}")
    merge_key: str | None = None
    if v2:
        # PoC v2 (pow-v2.md §4.2/4.3): artifacts instead of nonces+dist; a job's batch keeps its own
        # request_id, so only batches of the same loop (or the same job) fold together.
        merge_key = json.dumps(["v2", *(batch.get(f) for f in _V2_KEY_FIELDS)])
    elif kind == "generated":
        _check_generated(batch)
        merge_key = json.dumps(
            [batch["public_key"], batch["block_hash"], batch["block_height"], batch["node_id"]]
        )
    try:
        body = json.dumps(batch, separators=(",", ":"), allow_nan=False).encode()
    except ValueError as exc:
        raise InvalidRequest(f"batch holds NaN or infinity ({_first_non_finite(batch)}); "
                             "the receiver's JSON cannot carry it") from exc
    except TypeError as exc:
        raise InvalidRequest(f"batch is not JSON-serialisable: {exc}") from exc
    return body, merge_key, len(nonces)


def _check_generated(batch: dict[str, Any]) -> None:
    missing = [name for name in _GENERATED_FIELDS if name not in batch]
    if missing:
        raise InvalidRequest(f"generated batch lacks field(s): {', '.join(missing)}")
    for name in ("public_key", "block_hash"):
        if not isinstance(batch[name], str):
            raise InvalidRequest(f"batch.{name} must be a string, got {type(batch[name]).__name__}")
    for name in ("block_height", "node_id"):
        if not _is_int(batch[name]):
            raise InvalidRequest(f"batch.{name} must be an integer, got {batch[name]!r}")
    nonces, dist = batch["nonces"], batch["dist"]
    if not isinstance(dist, list) or len(dist) != len(nonces):
        raise InvalidRequest("batch.dist must be a list as long as batch.nonces")
    for i, nonce in enumerate(nonces):
        if not _is_int(nonce):
            raise InvalidRequest(f"batch.nonces[{i}] must be an integer, got {nonce!r}")
    for i, value in enumerate(dist):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequest(f"batch.dist[{i}] must be a number, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _first_non_finite(value: Any, where: str = "batch") -> str:
    """Name the first NaN/infinity so the error message points at the field."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} = {value}"
    if isinstance(value, dict):
        items: Iterator[tuple[str, Any]] = ((f"{where}.{k}", v) for k, v in value.items())
    elif isinstance(value, list | tuple):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(value))
    else:
        return ""
    for name, item in items:
        found = _first_non_finite(item, name)
        if found:
            return found
    return ""


class Outbox:
    """A durable, thread-safe FIFO per callback url; see the module docstring for the model."""

    def __init__(self, path: Path, *, max_merged_nonces: int = DEFAULT_MAX_MERGED_NONCES) -> None:
        if max_merged_nonces < 1:
            raise ConfigError(f"max_merged_nonces must be >= 1, got {max_merged_nonces}")
        self.path = Path(path)
        self.max_merged_nonces = max_merged_nonces
        self._lock = threading.RLock()
        self._closed = False
        self._conn = self._open()

    # --- opening -------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        path = self.path
        if path.is_dir():
            raise ConfigError(f"outbox path {path} is a directory, expected a database file")
        for ancestor in (path.parent, *path.parent.parents):
            if ancestor.exists():
                if not ancestor.is_dir():
                    raise ConfigError(f"outbox {path}: {ancestor} is a file, not a directory")
                break
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise Unavailable(
                f"outbox {path}: cannot create state dir {path.parent}: {exc.strerror}"
            ) from exc
        created = not path.exists()
        if created:  # the node's own file (mode 0600); SQLite gives its -wal and -shm files the same
            with contextlib.suppress(FileExistsError):
                os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 10000")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ConfigError(f"outbox {path}: SQLite refused WAL mode (got {mode!r})")
            conn.execute("PRAGMA synchronous = FULL")
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise ConfigError(f"outbox {path} is corrupt ({check}); move it aside for inspection")
            self._ensure_schema(conn)
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            name = getattr(exc, "sqlite_errorname", "")
            if name in _NOT_OURS:
                raise ConfigError(
                    f"outbox {path} is not a valid outbox database ({exc}); move it aside for inspection"
                ) from exc
            raise Unavailable(f"outbox {path} cannot be opened for writing: {exc} ({name})") from exc
        except ConfigError:
            if conn is not None:
                conn.close()
            raise
        if created:  # the new file's directory entry survives a crash right after creation
            with contextlib.suppress(OSError):
                fsync_dir(path.parent)
        return conn

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if version != 0 or tables:
            raise ConfigError(
                f"outbox {self.path} has schema version {version} (expected {SCHEMA_VERSION}) "
                "or foreign tables; move it aside for inspection"
            )
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # --- transactions --------------------------------------------------------------------------

    @contextmanager
    def _tx(self, what: str) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction under the lock; SQLite errors become Unavailable naming ``what``."""
        with self._lock:
            if self._closed:
                raise Unavailable(f"outbox {self.path} is closed; cannot {what}")
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                name = getattr(exc, "sqlite_errorname", "")
                raise Unavailable(
                    f"outbox {self.path}: cannot {what}: {exc} ({name}); is the state dir full or read-only?"
                ) from exc
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error as exc:  # the failed COMMIT may have rolled back already
            log.warning("outbox_rollback_failed", path=str(self.path), error=str(exc))

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            if self._closed:
                raise Unavailable(f"outbox {self.path} is closed")
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise Unavailable(f"outbox {self.path}: cannot read: {exc}") from exc

    @staticmethod
    def _bump(conn: sqlite3.Connection, name: str, by: float) -> None:
        conn.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )

    @staticmethod
    def _set(conn: sqlite3.Connection, name: str, value: float) -> None:
        conn.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    # --- producer side -------------------------------------------------------------------------

    def put(self, kind: Kind, url: str, batch: dict[str, Any]) -> int:
        """Queue one batch for ``{url}/{kind}``; it is on disk (fsynced) when this returns its id."""
        body, merge_key, nonces = encode_batch(kind, url, batch)
        with self._tx("store batch") as conn:
            cur = conn.execute(
                "INSERT INTO queue (kind, url, merge_key, body, nonces, created) VALUES (?, ?, ?, ?, ?, ?)",
                (kind, url, merge_key, body, nonces, time.time()),
            )
            row_id = cur.lastrowid
        assert row_id is not None
        return row_id

    # --- sender side ---------------------------------------------------------------------------

    def pending_urls(self) -> list[str]:
        """Urls with something pending, the one whose head is oldest first."""
        rows = self._read("SELECT url FROM queue GROUP BY url ORDER BY min(id)")
        return [row[0] for row in rows]

    def next_unit(self, url: str) -> Unit | None:
        """The head of ``url``'s queue, sealed (merged and frozen on disk) before it is returned."""
        with self._tx("seal the next batch") as conn:
            head = conn.execute(
                "SELECT id, kind, merge_key, body, members, nonces, sealed, attempts, created "
                "FROM queue WHERE url = ? ORDER BY id LIMIT 1",
                (url,),
            ).fetchone()
            if head is None:
                return None
            head_id, kind, _key, body, members, nonces, sealed, attempts, created = head
            if not sealed:
                if kind == "generated":
                    body, members, nonces = self._merge_into_head(conn, url, head)
                conn.execute(
                    "UPDATE queue SET sealed = 1, body = ?, members = ?, nonces = ? WHERE id = ?",
                    (body, members, nonces, head_id),
                )
        return Unit(head_id, kind, url, bytes(body), members, nonces, attempts, created)

    def _merge_into_head(
        self, conn: sqlite3.Connection, url: str, head: tuple[Any, ...]
    ) -> tuple[bytes, int, int]:
        """Fold the open generated rows right behind the head (same key) into it; delete them."""
        head_id, _kind, merge_key, body, members, nonces = head[:6]
        taken: list[tuple[int, bytes]] = []
        total = nonces
        rows = conn.execute(
            "SELECT id, kind, merge_key, body, members, nonces, sealed FROM queue "
            "WHERE url = ? AND id > ? ORDER BY id",
            (url, head_id),
        )
        for row_id, kind, key, row_body, row_members, row_nonces, sealed in rows:
            mergeable = kind == "generated" and key == merge_key and not sealed
            if not mergeable or total + row_nonces > self.max_merged_nonces:
                break
            taken.append((row_id, row_body))
            members += row_members
            total += row_nonces
        rows.close()
        if not taken:
            return bytes(body), members, nonces
        merged = json.loads(body)
        for _row_id, row_body in taken:
            part = json.loads(row_body)
            if "artifacts" in merged:
                merged["artifacts"].extend(part["artifacts"])
            else:
                merged["nonces"].extend(part["nonces"])
                merged["dist"].extend(part["dist"])
        conn.execute("DELETE FROM queue WHERE url = ? AND id > ? AND id <= ?", (url, head_id, taken[-1][0]))
        merged_body = json.dumps(merged, separators=(",", ":"), allow_nan=False).encode()
        return merged_body, members, total

    def mark_delivered(self, unit: Unit) -> None:
        """The receiver answered 2xx: forget the unit and count it."""
        with self._tx("record a delivery") as conn:
            gone = conn.execute("DELETE FROM queue WHERE id = ?", (unit.id,)).rowcount
            if gone:
                self._bump(conn, "delivered", unit.members)
                self._bump(conn, "sends", 1)
                self._set(conn, "last_success_ts", time.time())

    def record_failure(self, unit: Unit, reason: str) -> int:
        """Count one failed attempt of ``unit``; returns how many attempts it has had in total."""
        with self._tx("record a failed send") as conn:
            conn.execute(
                "UPDATE queue SET attempts = attempts + 1, last_error = ? WHERE id = ?",
                (reason[:500], unit.id),
            )
            self._bump(conn, "failures", 1)
            row = conn.execute("SELECT attempts FROM queue WHERE id = ?", (unit.id,)).fetchone()
        return int(row[0]) if row else unit.attempts + 1

    def dead_letter(self, unit: Unit, status: int | None, reason: str) -> None:
        """The receiver refused the unit for good: keep it in ``dead`` for the operator, off the queue."""
        with self._tx("dead-letter a batch") as conn:
            moved = conn.execute(
                "INSERT INTO dead (id, kind, url, body, members, attempts, status, reason, created, dead_at) "
                "SELECT id, kind, url, body, members, attempts + 1, ?, ?, created, ? FROM queue WHERE id = ?",
                (status, reason[:2000], time.time(), unit.id),
            ).rowcount
            if moved:
                conn.execute("DELETE FROM queue WHERE id = ?", (unit.id,))
                self._bump(conn, "dead", unit.members)

    # --- inspection ----------------------------------------------------------------------------

    def pending_count(self) -> int:
        """Batches (as put, before merging) not yet delivered or dead-lettered."""
        return int(self._read("SELECT coalesce(sum(members), 0) FROM queue")[0][0])

    def pending_through(self, last_id: int) -> int:
        """Pending send units whose position is at or before ``last_id`` (what a flush waits for)."""
        return int(self._read("SELECT count(*) FROM queue WHERE id <= ?", (last_id,))[0][0])

    def last_id(self) -> int:
        """The highest id ever handed out (ids are never reused), 0 for a fresh outbox."""
        rows = self._read("SELECT seq FROM sqlite_sequence WHERE name = 'queue'")
        return int(rows[0][0]) if rows else 0

    def dead_ids(self, through: int) -> set[int]:
        """Ids of dead-lettered units at or before ``through``."""
        return {row[0] for row in self._read("SELECT id FROM dead WHERE id <= ?", (through,))}

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest dead-lettered units, for an operator to inspect or replay by hand."""
        rows = self._read(
            "SELECT id, kind, url, body, members, attempts, status, reason, created, dead_at "
            "FROM dead ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        names = ("id", "kind", "url", "body", "members", "attempts", "status", "reason", "created", "dead_at")
        return [dict(zip(names, row, strict=True)) for row in rows]

    def dead_count(self) -> int:
        """How many dead letters the outbox holds (deliveries, not batches)."""
        return int(self._read("SELECT count(*) FROM dead")[0][0])

    def stats(self) -> dict[str, Any]:
        """Counters for metrics; counts are batches as put, and survive restarts."""
        with self._lock:
            pending, oldest, units = self._read(
                "SELECT coalesce(sum(members), 0), min(created), count(*) FROM queue"
            )[0]
            dead_letters = self.dead_count()
            counters = dict(self._read("SELECT name, value FROM counters"))
        last_success = counters.get("last_success_ts")
        return {
            "pending": int(pending),
            "pending_units": int(units),
            "delivered": int(counters.get("delivered", 0)),
            "sends": int(counters.get("sends", 0)),
            "failures": int(counters.get("failures", 0)),
            "dead": int(counters.get("dead", 0)),
            "dead_letters": dead_letters,
            "oldest_age_s": max(0.0, time.time() - oldest) if oldest is not None else 0.0,
            "last_success_ts": float(last_success) if last_success is not None else None,
        }

    def close(self) -> None:
        """Close the database; everything pending stays on disk for the next open."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()
