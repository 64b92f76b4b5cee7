"""Is a serving engine alive? Judged by observed progress, not by ``/health`` alone.

An engine can answer ``/health`` while its model loop is stuck, and a saturated engine can be slow to
answer ``/health`` while it works flat out. So every poll reads ``/health`` and ``/metrics`` and
compares the engine's progress counters (model steps, prompt and generated tokens, finished requests)
with the previous poll:

* **unresponsive**: neither ``/health`` answered nor a counter moved for the hang window;
* **stalled**: requests are running but no counter moved for the hang window.

Either one means hung, and the instance is restarted. A busy engine whose counters move is never hung,
however slowly it answers. The window is the setting ``engine_hang_s`` (``MLNODE_ENGINE_HANG_SECONDS``,
default 60 s); the poll interval and probe timeout scale with it (a tenth and a quarter of it, within
sane bounds) so that tests can use a short window and still see a hang detected within it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

#: Counters that move whenever an engine makes progress (CPU engine and vLLM names).
PROGRESS_COUNTERS = (
    "mlnode_engine_iterations_total",
    "vllm:iteration_tokens_total_count",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
)
RUNNING_GAUGE = "vllm:num_requests_running"


@dataclass(frozen=True)
class Timing:
    """How often to poll, how long one probe may take, and the hang window."""

    hang_s: float
    poll_s: float
    probe_timeout_s: float

    @classmethod
    def for_window(cls, hang_s: float) -> Timing:
        return cls(hang_s, min(5.0, max(0.25, hang_s / 10)), min(10.0, max(0.5, hang_s / 4)))


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> metric name -> sum of its samples over all label sets."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        brace = line.find("{")
        if brace >= 0:
            close = line.rfind("}")
            if close < brace:
                continue
            name, rest = line[:brace], line[close + 1 :]
        else:
            name, _, rest = line.partition(" ")
        fields = rest.split()
        if not name or not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        if math.isfinite(value):
            totals[name] = totals.get(name, 0.0) + value
    return totals


@dataclass(frozen=True)
class Observation:
    """One poll of one instance: did ``/health`` answer 200, and what ``/metrics`` said (None: nothing)."""

    health_ok: bool
    metrics: Mapping[str, float] | None
    #: The ``/metrics`` text as the engine wrote it, and when it was read (Unix time).
    text: str = ""
    at: float = 0.0


class Liveness:
    """Judges one serving instance from successive observations (times from a monotonic clock)."""

    def __init__(self, timing: Timing, now: float) -> None:
        self.timing = timing
        self.last_alive = now
        self.last_progress = now
        self.running = 0.0
        self.reason = ""
        self._counters: tuple[float, ...] | None = None
        self._metrics_fresh = False
        #: The engine's own counters from its last answered ``/metrics`` (passed through to ours).
        self.last_metrics: dict[str, float] = {}
        #: That answer's text and when it was read (relayed into the network's metrics).
        self.last_text = ""
        self.last_text_at = 0.0

    def observe(self, obs: Observation, now: float) -> None:
        moved = False
        self._metrics_fresh = obs.metrics is not None
        if obs.metrics is not None:
            self.last_metrics = dict(obs.metrics)
            if obs.text:
                self.last_text, self.last_text_at = obs.text, obs.at
            counters = tuple(obs.metrics.get(name, 0.0) for name in PROGRESS_COUNTERS)
            moved = self._counters is not None and counters != self._counters
            self._counters = counters
            self.running = obs.metrics.get(RUNNING_GAUGE, 0.0)
            if moved or self.running <= 0:
                self.last_progress = now
        if obs.health_ok or moved:
            self.last_alive = now

    def hung(self, now: float) -> bool:
        """True once the instance was unresponsive or stalled for the whole hang window."""
        window = self.timing.hang_s
        if now - self.last_alive >= window:
            self.reason = f"no answer from /health and no progress for {now - self.last_alive:.1f} s"
            return True
        # Stalled needs fresh counters: /metrics failing while /health answers is unknown, not hung.
        if self._metrics_fresh and self.running > 0 and now - self.last_progress >= window:
            self.reason = (
                f"{self.running:g} requests running but no progress for {now - self.last_progress:.1f} s"
            )
            return True
        return False

    def healthy(self, now: float) -> bool:
        """Fit to receive requests: it answered or progressed within the last few polls."""
        return now - self.last_alive <= 3 * self.timing.poll_s + self.timing.probe_timeout_s
