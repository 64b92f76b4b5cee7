"""Secrets out of logs, error bodies and status: which flags and variables carry one, and scrubbing.

A secret reaches the node in an engine flag the operator allowed (``--api-key``, ``--hf-token``), in an
environment variable the engines get (``HF_TOKEN``), or in a URL's userinfo. Wherever such a thing is
written down -- a log line, the engine's log header, a failed start's 503, a status answer -- it goes
through here first. Names are judged by their words, so ``--hf-token`` is a secret and
``--max-num-batched-tokens`` is not.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MASK = "[redacted]"
#: A flag whose last word is one of these carries a secret (``--api-key``, ``--hf-token``).
_SECRET_FLAG = re.compile(r"(?:^|-)(?:key|token|secret|password|passwd|credentials?|auth)$")
#: An environment variable with one of these words (``HF_TOKEN``, ``AWS_SECRET_ACCESS_KEY``).
_SECRET_ENV = re.compile(
    r"(?:^|_)(?:TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?|AUTH)(?:_|$)")
#: Log fields whose values are command lines or engine argument lists.
_ARGV_FIELDS = frozenset({"argv", "args", "additional_args", "command", "cmd"})
#: Log field names that are secrets themselves.
_SECRET_FIELD = re.compile(
    r"secret|private|password|passwd|token_value|authorization|api_key|api_token|hf_token")
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")
#: Shorter values are not scrubbed from free text (they would blank out ordinary words).
_MIN_SECRET_CHARS = 4


def flag_name(arg: str) -> str:
    """``--hf_token=x`` -> ``--hf-token`` (vLLM treats underscores in long names as dashes)."""
    name = arg.split("=", 1)[0]
    return "--" + name[2:].replace("_", "-") if name.startswith("--") else name


def is_secret_flag(arg: str) -> bool:
    name = flag_name(arg)
    return name.startswith("-") and _SECRET_FLAG.search(name.lstrip("-")) is not None


def is_secret_env(name: str) -> bool:
    return _SECRET_ENV.search(name.upper()) is not None


def _is_flag(arg: str) -> bool:
    return arg.startswith("-") and len(arg) > 1 and not arg[1].isdigit()


def redact_args(args: Iterable[str]) -> list[str]:
    """``args`` with every value of a secret flag masked (``--api-key=x``, ``--api-key x y``)."""
    out: list[str] = []
    masking = False
    for arg in args:
        if _is_flag(arg):
            masking = False
            if is_secret_flag(arg):
                if "=" in arg:
                    out.append(arg.split("=", 1)[0] + "=" + MASK)
                    continue
                masking = True
            out.append(redact_url(arg))
        elif masking:
            out.append(MASK)
        else:
            out.append(redact_url(arg))
    return out


def secret_values(args: Iterable[str] = (), env: Mapping[str, str] | None = None) -> set[str]:
    """The secret values ``args`` and ``env`` carry, for :func:`scrub` to remove from free text."""
    found: set[str] = set()
    plain = list(args)
    masked = redact_args(plain)
    for original, shown in zip(plain, masked, strict=True):
        if original != shown:
            value = original.split("=", 1)[1] if shown.endswith("=" + MASK) else original
            found.add(value)
    for name, value in (env or {}).items():
        if is_secret_env(name):
            found.add(value)
    return {v for v in found if len(v) >= _MIN_SECRET_CHARS}


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each of ``secrets`` (and any URL password) replaced by the mask."""
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= _MIN_SECRET_CHARS:
            text = text.replace(secret, MASK)
    return _USERINFO.sub(lambda m: m["scheme"] + MASK + "@", text)


def redact_url(text: str) -> str:
    """A URL without its userinfo (``http://user:pw@host`` -> ``http://[redacted]@host``)."""
    if "://" not in text or "@" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return _USERINFO.sub(lambda m: m["scheme"] + MASK + "@", text)
    if "@" not in parts.netloc:
        return text
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, f"{MASK}@{host}", parts.path, parts.query, parts.fragment))


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: (MASK if is_secret_env(k) else v) for k, v in env.items()}


def redact_field(key: str, value: Any) -> Any:
    """One structured-log field as it may be written."""
    if _SECRET_FIELD.search(key.lower()):
        return MASK
    if key in _ARGV_FIELDS and isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return redact_args(value)
    if isinstance(value, str):
        return redact_url(value)
    return value
