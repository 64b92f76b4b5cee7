"""Cooperative cancellation of PoC compute.

A stop must release the compute within moments, but a model build or a CPU batch takes seconds to
minutes. Long loops (pool chunks, layers built, layers evaluated) call :func:`check` with the round's
stop signal and unwind with :class:`Cancelled`, which the runner treats as a normal end, not a failure.
"""

from __future__ import annotations

from services.pow.inputs import StopSignal


class Cancelled(Exception):
    """The work's round was stopped: a control-flow signal raised inside compute, caught by the runner."""


def check(signal: StopSignal | None) -> None:
    """Raise :class:`Cancelled` when ``signal`` is set (None: never cancelled)."""
    if signal is not None and signal.is_set():
        raise Cancelled
