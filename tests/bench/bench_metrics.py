"""What a ``GET /metrics`` scrape costs on a real node, and what a down or frozen service adds to it.

The scrape asks every service with a short deadline and shows a silent one's last answer, so a stopped
(``mlnode ctl stop pow``) or frozen (SIGSTOP: alive, answering nothing) service must not hold it: the
README promises a scrape under a second either way (tests/integration/test_metrics.py asserts what the
scrape shows; the time is measured here). The baseline is the same node with every service up.

Run: ``python -m tests.bench.bench_metrics`` (or ``make bench`` for every section).
"""

from __future__ import annotations

import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

from tests.bench.report import print_table
from tests.support.node import Node
from tests.support.waiting import wait_until

SCRAPES = 20
BAR_S = 1.0


def _scrapes(node: Node) -> list[float]:
    took = []
    for _ in range(SCRAPES):
        began = time.monotonic()
        assert node.api("GET", "/metrics", timeout=30).status == 200
        took.append(time.monotonic() - began)
    return took


def run() -> None:
    with tempfile.TemporaryDirectory() as root:
        node = Node(Path(root)).start()
        try:
            _scrapes(node)  # every service has answered once: its last values exist
            rows = {"every service up": _scrapes(node)}
            pid = node.pid("pow")
            os.kill(pid, signal.SIGSTOP)
            try:
                rows["pow frozen (SIGSTOP)"] = _scrapes(node)
            finally:
                os.kill(pid, signal.SIGCONT)
            node.ctl("stop", "pow")
            wait_until(lambda: node.pid("pow") == 0, 30)
            rows["pow stopped (mlnode ctl stop pow)"] = _scrapes(node)
            node.ctl("start", "pow")
        finally:
            node.stop()
    base = statistics.median(rows["every service up"])
    print_table(f"metrics: GET /metrics, {SCRAPES} scrapes each (promise: under {BAR_S:g} s)",
                ("while", "median", "worst", "median / all up"),
                [(label, f"{statistics.median(xs):.3f} s", f"{max(xs):.3f} s",
                  f"{statistics.median(xs) / base:.2f}") for label, xs in rows.items()])


if __name__ == "__main__":
    run()
