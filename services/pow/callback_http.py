"""One POST of a sealed batch to the Network Node's callback, judged as delivered, retry, or dead.

Kept apart from the delivery loop so the rules that decide whether a batch is paid for (only 2xx counts;
only a 4xx other than 408/429 is a final refusal) sit in one small place, and so every request has the
same bounded cost: connect within ``connect_timeout_s`` and finish within about ``total_timeout_s``.
Every connection goes through the callback policy (:mod:`.callback_policy`): the sender dials only an
address it has resolved and checked itself.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import httpx

from services.pow.callback_policy import CallbackPolicy, GuardedTransport

RETRYABLE_4XX = frozenset({408, 429})
_REASON_BYTES = 300
_HEADERS = {"Content-Type": "application/json", "User-Agent": "mlnode-pow-outbox/1"}


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD = "dead"


@dataclass(frozen=True)
class SendResult:
    outcome: Outcome
    status: int | None
    reason: str
    retry_after_s: float | None = None


def classify(status: int) -> Outcome:
    """2xx is delivered; a 4xx other than 408/429 will never succeed; anything else may later."""
    if 200 <= status < 300:
        return Outcome.DELIVERED
    if 400 <= status < 500 and status not in RETRYABLE_4XX:
        return Outcome.DEAD
    return Outcome.RETRY


def safe_url(url: str) -> str:
    """The url without user:password, fit for logs."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "<unparseable url>"
    if parsed.userinfo:
        parsed = parsed.copy_with(username=None, password=None)
    return str(parsed)


class _Overdue(Exception):
    pass


class CallbackSender:
    """A thread-confined httpx client with the outbox's timeouts; not shared with anything else."""

    def __init__(self, policy: CallbackPolicy, *, connect_timeout_s: float = 5.0,
                 total_timeout_s: float = 30.0) -> None:
        self.connect_timeout_s = min(connect_timeout_s, total_timeout_s)
        self.total_timeout_s = total_timeout_s
        # Reads and writes get what is left after a full connect, so a silent peer costs <= total.
        rest = max(0.1, total_timeout_s - self.connect_timeout_s)
        self._timeout = httpx.Timeout(connect=self.connect_timeout_s, read=rest, write=rest,
                                      pool=self.connect_timeout_s)
        # Straight to the node's own Network Node: no proxy from the environment, no redirects (a
        # redirect could point anywhere), and only addresses the policy allows.
        self._client = httpx.Client(timeout=self._timeout, trust_env=False, follow_redirects=False,
                                    transport=GuardedTransport(policy))

    def post(self, target: str, body: bytes) -> SendResult:
        """POST ``body`` to ``target``; never raises for network trouble, it reports RETRY instead."""
        deadline = time.monotonic() + self.total_timeout_s
        try:
            with self._client.stream("POST", target, content=body, headers=_HEADERS) as response:
                status = response.status_code
                outcome = classify(status)
                if outcome is Outcome.DELIVERED:
                    # The receiver has acted on it; a slow or broken response body changes nothing.
                    return SendResult(outcome, status, f"HTTP {status}")
                detail = self._read_some(response, deadline)
                retry_after = _retry_after(response.headers.get("retry-after"))
                reason = f"HTTP {status}: {detail}" if detail else f"HTTP {status}"
                return SendResult(outcome, status, reason, retry_after)
        except _Overdue:
            return SendResult(Outcome.RETRY, None, f"no complete answer within {self.total_timeout_s:g}s")
        except httpx.HTTPError as exc:
            return SendResult(Outcome.RETRY, None, f"{type(exc).__name__}: {exc}".strip()[:_REASON_BYTES])

    @staticmethod
    def _read_some(response: httpx.Response, deadline: float) -> str:
        """Up to a few hundred bytes of an error body, for the log; stops at the deadline."""
        data = b""
        try:
            for chunk in response.iter_raw():
                data += chunk
                if len(data) >= _REASON_BYTES:
                    break
                if time.monotonic() > deadline:
                    raise _Overdue
        except httpx.HTTPError:
            pass
        return " ".join(data[:_REASON_BYTES].decode("utf-8", "replace").split())

    def close(self) -> None:
        self._client.close()


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is ignored: plain backoff then applies)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
