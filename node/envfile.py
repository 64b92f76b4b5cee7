"""``.env`` support: ``KEY=VALUE`` lines, ``#`` comments, optional quotes, ``export`` prefixes.

Values already in the environment win, so an operator's explicit setting beats the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping
from pathlib import Path

from node.errors import ConfigError

_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")


def parse(text: str, source: str = ".env") -> dict[str, str]:
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise ConfigError(f"{source}:{number}: expected KEY=VALUE, got {stripped[:60]!r}")
        key, value = match.groups()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key] = value
    return values


def apply(path: Path, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Load ``path`` if it exists into ``environ`` (default ``os.environ``) without overriding."""
    env = os.environ if environ is None else environ
    if not path.is_file():
        return {}
    values = parse(path.read_text("utf-8"), str(path))
    for key, value in values.items():
        env.setdefault(key, value)
    return values
