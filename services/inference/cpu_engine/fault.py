"""The engine's test-only fault switch, read from ``MLNODE_ENGINE_FAULT``.

``hang_after:N`` -- after N completed generation requests (completions or chat) the engine stops
answering anything (``/health`` included) and its model thread stops stepping, so its iteration
counter freezes. It exists so the inference manager's health checks can be tested against a real
hung engine; nothing in production sets it.
"""

from __future__ import annotations

from node.errors import ConfigError

ENV_VAR = "MLNODE_ENGINE_FAULT"


def hang_after(value: str | None) -> int | None:
    """The N of ``hang_after:N``; None when the switch is unset or empty."""
    if not value:
        return None
    kind, _, count = value.partition(":")
    if kind != "hang_after" or not count.isdigit():
        raise ConfigError(f"{ENV_VAR} must be 'hang_after:N' with N >= 0, got {value!r}")
    return int(count)
