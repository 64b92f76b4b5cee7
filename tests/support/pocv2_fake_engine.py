"""A small real HTTP engine that answers the PoC RPC, for unit tests of pow's round logic only.

Integration tests use the real CPU engine. The fake's vectors are a function of (block_hash,
public_key, nonce), so a test can predict them; a test may also give it vectors to answer (the golden
honest ones, for the validation case).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def fake_vector(block_hash: str, public_key: str, nonce: int, k_dim: int = 12) -> str:
    digest = hashlib.sha256(f"{block_hash}|{public_key}|{nonce}".encode()).digest()
    values = [(b - 128) / 256.0 for b in digest[:k_dim]]
    return base64.b64encode(struct.pack(f"<{k_dim}e", *values)).decode()


class FakeEngine:
    """Answers ``POST /collective_rpc`` like a two-rank engine (rank 1 holds the result)."""

    def __init__(self, known: dict[int, str] | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.known = dict(known or {})
        self.refuse: int | None = None  # answer this status instead of computing
        self.drop: set[int] = set()  # nonces reported as non-finite
        self.gate = threading.Event()  # cleared: calls wait until set (lets a test hold a batch)
        self.gate.set()
        self._lock = threading.Lock()
        engine = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                engine.gate.wait()
                with engine._lock:
                    engine.calls.append(body)
                status, answer = engine.answer(body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if self.refuse is not None:
            return self.refuse, {"detail": "refused by the test"}
        kw = body["kwargs"]
        artifacts = [{"nonce": n, "vector_b64": self.known.get(n) or fake_vector(
            kw["block_hash"], kw["public_key"], n, kw["k_dim"])} for n in kw["nonces"] if n not in self.drop]
        dropped = [n for n in kw["nonces"] if n in self.drop]
        return 200, {"results": [None, {"artifacts": artifacts, "dropped": dropped}]}

    def nonces(self) -> list[int]:
        with self._lock:
            return [n for call in self.calls for n in call["kwargs"]["nonces"]]

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()
