"""Typed reads from a client's JSON object, each value named by its dotted path.

The training request is loosely typed JSON (and ``train_env`` is all strings), so every read goes
through one place that checks the type, names the field in the error, and remembers which keys were
used: keys nobody read become notes for the client instead of silently vanishing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypeVar

from node.errors import InvalidRequest

_MISSING: Any = object()
_N = TypeVar("_N", int, float)


class Fields:
    """One JSON object under ``path``; reads record the keys they consume."""

    def __init__(self, data: Any, path: str, notes: list[str]) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise InvalidRequest(f"{path or 'request body'} must be an object")
        self._data: Mapping[str, Any] = data
        self.path = path
        self.notes = notes
        self._seen: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self._data and self._data[key] is not None

    def _get(self, key: str) -> Any:
        self._seen.add(key)
        value = self._data.get(key)
        return _MISSING if value is None else value

    def section(self, key: str) -> Fields:
        """A nested object; a missing one reads as empty so its defaults apply."""
        self._seen.add(key)
        return Fields(self._data.get(key), self.name(key), self.notes)

    def ignore(self, key: str, why: str = "") -> None:
        """Consume a key we accept but cannot honour, telling the client so."""
        self._seen.add(key)
        if key in self._data:
            suffix = f" ({why})" if why else ""
            self.notes.append(f"ignored: {self.name(key)}{suffix}")

    def finish(self) -> None:
        """Report keys nobody read: unknown keys are notes, never errors."""
        for key in self._data:
            if key not in self._seen:
                self.notes.append(f"ignored: {self.name(key)} (unknown key)")

    def integer(
        self, key: str, default: int, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        value = self._get(key)
        if value is _MISSING:
            return default
        return self._check_range(key, _as_int(value, self.name(key), "an integer"), minimum, maximum)

    def optional_integer(self, key: str, *, minimum: int | None = None) -> int | None:
        value = self._get(key)
        if value is _MISSING:
            return None
        return self._check_range(key, _as_int(value, self.name(key), "an integer"), minimum, None)

    def number(
        self,
        key: str,
        default: float,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        above: float | None = None,
        below: float | None = None,
    ) -> float:
        """A finite float; ``above``/``below`` are exclusive bounds, ``minimum``/``maximum`` inclusive."""
        value = self._get(key)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequest(f"{self.name(key)} must be a number")
        number = float(value)
        if not math.isfinite(number):
            raise InvalidRequest(f"{self.name(key)} must be a finite number")
        if above is not None and not number > above:
            raise InvalidRequest(f"{self.name(key)} must be > {above}, got {number}")
        if below is not None and not number < below:
            raise InvalidRequest(f"{self.name(key)} must be < {below}, got {number}")
        return self._check_range(key, number, minimum, maximum)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            raise InvalidRequest(f"{self.name(key)} must be a boolean")
        return value

    def string(self, key: str, default: str) -> str:
        value = self._get(key)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            raise InvalidRequest(f"{self.name(key)} must be a string")
        return value

    def strings(self, key: str) -> list[str]:
        """One string or a list of strings; missing reads as an empty list."""
        value = self._get(key)
        if value is _MISSING:
            return []
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise InvalidRequest(f"{self.name(key)} must be a string or a list of strings")
        return list(value)

    def env_integer(
        self, key: str, default: int | None, *, minimum: int | None = None, maximum: int | None = None
    ) -> int | None:
        """An integer sent as a string (the client sends every ``train_env`` value as one)."""
        value = self._get(key)
        if value is _MISSING:
            return default
        if isinstance(value, str):
            text = value.strip()
            try:
                number = int(text, 10)
            except ValueError:
                raise InvalidRequest(f"{self.name(key)} must be an integer string, got {value!r}") from None
        else:
            number = _as_int(value, self.name(key), "an integer string")
        return self._check_range(key, number, minimum, maximum)

    def env_string(self, key: str) -> str | None:
        value = self._get(key)
        if value is _MISSING:
            return None
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise InvalidRequest(f"{self.name(key)} must be a string")
        return str(value).strip()

    def _check_range(self, key: str, value: _N, minimum: _N | None, maximum: _N | None) -> _N:
        if minimum is not None and value < minimum:
            raise InvalidRequest(f"{self.name(key)} must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise InvalidRequest(f"{self.name(key)} must be <= {maximum}, got {value}")
        return value


def _as_int(value: Any, name: str, what: str) -> int:
    """Ints, and floats with no fraction (JSON encoders sometimes write 50.0); never bools."""
    if isinstance(value, bool):
        raise InvalidRequest(f"{name} must be {what}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise InvalidRequest(f"{name} must be {what}")
