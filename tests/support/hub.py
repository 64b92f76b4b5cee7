"""A local stand-in for the Hugging Face hub's HTTP API, for real huggingface_hub clients (``HF_ENDPOINT``).

The real hub is not reachable here. This serves what ``snapshot_download`` asks for, as the hub does:
``GET /api/models/{repo}/revision/{rev}`` (the commit), ``GET /api/models/{repo}/tree/{rev}`` (the
listing, with LFS sha256s), and ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` (``X-Repo-Commit``,
``ETag``, ``Range`` for resumed downloads), with the hub's ``X-Error-Code`` for a missing repo, revision
or file. Faults on demand: the next GETs of a file answer 500, or one GET sends part of a file and then
hangs until released (a stalled download) or drops the connection.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    #: commit -> path -> content
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)


@dataclass
class Stall:
    """Send ``after`` bytes of ``path``'s next GET, then hold the connection until ``release`` (a hung
    transfer) or, with ``drop``, close it (a connection lost mid-file)."""

    path: str
    after: int
    drop: bool = False
    release: threading.Event = field(default_factory=threading.Event)
    hit: threading.Event = field(default_factory=threading.Event)


class Hub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Range header)
        self.failures: dict[str, int] = {}
        self.stalls: list[Stall] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: object) -> None:
                pass

            def do_GET(self) -> None:
                hub._handle(self, "GET")

            def do_HEAD(self) -> None:
                hub._handle(self, "HEAD")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        for stall in self.stalls:
            stall.release.set()
        self.server.shutdown()
        self.server.server_close()

    # -- content ---------------------------------------------------------------------------------
    def add(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        """A commit of ``files`` on ``branch``; returns its hash."""
        digest = hashlib.sha1(repo_id.encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        commit = digest.hexdigest()
        repo = self.repos.setdefault(repo_id, Repo())
        repo.commits[commit] = dict(files)
        repo.refs[branch] = commit
        return commit

    def add_dir(self, repo_id: str, folder: Path, branch: str = "main") -> str:
        return self.add(repo_id, {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()},
                        branch)

    def fail_next(self, path: str, times: int = 1) -> None:
        with self._lock:
            self.failures[path] = self.failures.get(path, 0) + times

    def stall(self, path: str, after: int, drop: bool = False) -> Stall:
        stall = Stall(path, after, drop)
        with self._lock:
            self.stalls.append(stall)
        return stall

    def count(self, method: str, pattern: str) -> int:
        with self._lock:
            return sum(1 for m, p, _ in self.requests if m == method and re.search(pattern, p))

    def ranges(self, pattern: str) -> list[str]:
        with self._lock:
            return [r for m, p, r in self.requests if m == "GET" and re.search(pattern, p) and r]

    # -- HTTP ------------------------------------------------------------------------------------
    def _handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        path = urlsplit(req.path).path
        with self._lock:
            self.requests.append((method, path, req.headers.get("Range") or ""))
        api = re.fullmatch(r"/api/models/(.+)/(revision|tree)/([^/]+)(?:/.*)?", path)
        if api:
            self._api(req, api[1], api[2], unquote(api[3]))
            return
        resolve = re.fullmatch(r"/(.+)/resolve/([^/]+)/(.+)", path)
        if resolve:
            self._file(req, method, resolve[1], unquote(resolve[2]), unquote(resolve[3]))
            return
        self._error(req, 404, "", "not found")

    def _lookup(self, req: BaseHTTPRequestHandler, repo_id: str,
                revision: str) -> tuple[str, dict[str, bytes]] | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(req, 404, "RepoNotFound", "Repository not found")
            return None
        commit = repo.refs.get(revision, revision)
        if commit not in repo.commits:
            self._error(req, 404, "RevisionNotFound", "Invalid rev id")
            return None
        return commit, repo.commits[commit]

    def _api(self, req: BaseHTTPRequestHandler, repo_id: str, what: str, revision: str) -> None:
        found = self._lookup(req, repo_id, revision)
        if found is None:
            return
        commit, files = found
        if what == "revision":
            body: object = {"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                            "siblings": [{"rfilename": p} for p in sorted(files)]}
        else:
            body = [self._entry(p, data) for p, data in sorted(files.items())]
        self._json(req, body)

    @staticmethod
    def _entry(path: str, data: bytes) -> dict[str, object]:
        entry: dict[str, object] = {"type": "file", "path": path, "size": len(data), "oid": git_sha1(data)}
        if path.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _file(self, req: BaseHTTPRequestHandler, method: str, repo_id: str, revision: str, name: str) -> None:
        found = self._lookup(req, repo_id, revision)
        if found is None:
            return
        commit, files = found
        if name not in files:
            self._error(req, 404, "EntryNotFound", "Entry not found", commit)
            return
        data = files[name]
        etag = hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else git_sha1(data)
        if method == "GET":
            with self._lock:
                failing = self.failures.get(name, 0)
                if failing:
                    self.failures[name] = failing - 1
            if failing:
                self._error(req, 500, "", "Internal Error (injected)", commit)
                return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", req.headers.get("Range") or "")
        if method == "GET" and match and int(match[1]) < len(data):
            start = int(match[1])
        req.send_response(206 if start else 200)
        req.send_header("X-Repo-Commit", commit)
        req.send_header("ETag", f'"{etag}"')
        req.send_header("Accept-Ranges", "bytes")
        req.send_header("Content-Length", str(len(data) - start))
        if start:
            req.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        req.end_headers()
        if method == "HEAD":
            return
        stall = self._take_stall(name)
        body = data[start:]
        if stall is None:
            req.wfile.write(body)
            return
        req.wfile.write(body[: stall.after])
        req.wfile.flush()
        stall.hit.set()
        if not stall.drop:
            stall.release.wait(120)
        req.close_connection = True

    def _take_stall(self, name: str) -> Stall | None:
        with self._lock:
            for stall in self.stalls:
                if stall.path == name and not stall.hit.is_set():
                    return stall
        return None

    @staticmethod
    def _json(req: BaseHTTPRequestHandler, body: object) -> None:
        raw = json.dumps(body).encode()
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(raw)))
        req.end_headers()
        req.wfile.write(raw)

    @staticmethod
    def _error(req: BaseHTTPRequestHandler, status: int, code: str, message: str, commit: str = "") -> None:
        raw = json.dumps({"error": message}).encode()
        req.send_response(status)
        if code:
            req.send_header("X-Error-Code", code)
        req.send_header("X-Error-Message", message)
        if commit:
            req.send_header("X-Repo-Commit", commit)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(raw)))
        req.end_headers()
        req.wfile.write(raw)
