"""A real HTTP receiver standing in for the Network Node's callback endpoints.

It records every POST body by path, answers 200 with an empty body like the real client, and can be
told to refuse (503) or to drop connections for a while to simulate an outage.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    def __init__(self) -> None:
        self.bodies: dict[str, list[bytes]] = {}
        self.refused = 0
        self.status_when_down = 503
        self._down = threading.Event()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if receiver._down.is_set():
                    with receiver._lock:
                        receiver.refused += 1
                    self.send_response(receiver.status_when_down)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with receiver._lock:
                    receiver.bodies.setdefault(self.path, []).append(body)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/poc-batches"

    def down(self) -> None:
        self._down.set()

    def up(self) -> None:
        self._down.clear()

    def received(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            raw = list(self.bodies.get(f"/v1/poc-batches/{name}", []))
        return [json.loads(b) for b in raw]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
