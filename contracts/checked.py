"""Turning untrusted input into a contract's typed value, refused with one line that names the field.

msgspec does the checking (types, strictness, bounds, required and unknown fields, ``__post_init__``
rules); this module only rewords its :class:`msgspec.ValidationError` in the node's voice — ``params.dim
must be an integer, got number`` rather than ``Expected `int`, got `float` - at `$.params.dim```. The
gateway and the services call the same two functions, so a body refused at the edge and a bus payload
refused by a service read alike. Strict everywhere: an integer field refuses ``1.0`` and ``true``; a
number field takes a JSON integer.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from node.errors import InvalidRequest

T = TypeVar("T")
#: Builds the error a refused input raises (an InvalidRequest subclass, or a function choosing one).
Refuse = Callable[[str], InvalidRequest]

#: Phrases for the regular expressions contracts use, so a refusal says what was meant, not the regex.
PATTERN_PHRASES: dict[str, str] = {}

_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_TYPE = re.compile(r"^Expected `(?P<want>[^`]+)`, got `(?P<got>[^`]+)`$")
_BOUND = re.compile(r"^Expected `(?P<want>[^`]+)` (?P<op>>=|<=|>|<) (?P<limit>\S+)$")
_LENGTH = re.compile(r"^Expected `(?P<want>str|array|object)` of length (?P<op>>=|<=) (?P<limit>\d+)$")
_PATTERN = re.compile(r"^Expected `str` matching regex (?P<regex>.+)$", re.DOTALL)
_FIELD = re.compile(r"^Object (?P<how>missing required|contains unknown) field `(?P<name>[^`]*)`$")
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_JSON_NAMES = {"int": "integer", "float": "number", "str": "string", "bool": "boolean", "null": "null",
               "object": "object", "array": "array", "bytes": "string"}


def decode_json(raw: bytes, kind: type[T], *, refuse: Refuse = InvalidRequest) -> T:
    """The JSON body ``raw`` as a ``kind`` value; ``refuse`` carries the one-line reason otherwise."""
    try:
        return msgspec.json.decode(raw, type=kind, strict=True)
    except msgspec.ValidationError as exc:
        raise refuse(explain(exc, _parsed(raw), kind)) from None
    except msgspec.DecodeError as exc:
        raise refuse(f"request body is not valid JSON: {_where_broken(str(exc), raw)}") from None
    except RecursionError:
        raise refuse("request body nests too deeply to be a request") from None


def convert(value: Any, kind: type[T], *, where: str = "",
            refuse: Refuse = InvalidRequest) -> T:
    """``value`` (decoded JSON or msgpack: dicts, lists, numbers) checked into a ``kind`` value.

    ``where`` names ``value`` in refusals when it is a part of a body (``params``).
    """
    try:
        return msgspec.convert(value, kind, strict=True)
    except msgspec.ValidationError as exc:
        raise refuse(explain(exc, value, kind, where=where)) from None


def explain(error: msgspec.ValidationError, document: Any = None, kind: Any = None, *,
            where: str = "") -> str:
    """msgspec's reason for refusing ``document``, reworded with the field's name and the bad value."""
    match = _AT.match(str(error))
    assert match is not None  # the pattern matches any text
    what, path = match["what"], match["path"] or ""
    where, value = _locate(document, path, where)
    name = where or "request body"
    if m := _TYPE.match(what):
        wanted = " or ".join(_article(part.strip(), root=not where) for part in m["want"].split("|"))
        return f"{name} must be {wanted}, got {_JSON_NAMES.get(m['got'], m['got'])}"
    if m := _BOUND.match(what):
        if isinstance(value, float) and not math.isfinite(value):
            return f"{name} must be a finite number, got {_show(value)}"
        return f"{name} must be {m['op']} {_number(m['limit'])}, got {_show(value)}"
    if m := _LENGTH.match(what):
        return _length(name, m["want"], m["op"], int(m["limit"]), value)
    if m := _PATTERN.match(what):
        regex = _unquote(m["regex"].strip())
        meant = PATTERN_PHRASES.get(regex, f"a string matching {regex}")
        return f"{name} must be {meant}, got {_show(value)}"
    if m := _FIELD.match(what):
        field = _join(where, m["name"])
        return f"{field} is required" if m["how"] == "missing required" else f"{field} is not a known field"
    if what.startswith("Invalid enum value"):
        return f"{name} must be one of {_options(kind, path)}; got {_show(value)}"
    if what == "Number out of range":
        return f"{name} must be a finite number"
    return what  # a contract's own rule (``__post_init__``): its message already names the fields


def _where_broken(reason: str, raw: bytes) -> str:
    """msgspec's reason with the text where the JSON breaks (``NaN``, ``Infinity``, a stray quote)."""
    reason = reason.removeprefix("JSON is malformed: ")
    at = re.search(r"\(byte (\d+)\)", reason)
    if at is None:
        return reason
    near = raw[int(at[1]):int(at[1]) + 16].decode("utf-8", "replace")
    return f"{reason} near {near!r}"


def _unquote(text: str) -> str:
    """msgspec quotes the regex as a Python literal."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return value if isinstance(value, str) else text


def _parsed(raw: bytes) -> Any:
    """The body as plain JSON, only to quote a refused value (never decides anything)."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def _locate(document: Any, path: str, where: str = "") -> tuple[str, Any]:
    """The human name of msgspec's ``path`` (``.params.dim``, ``.nonces[3]``) and the value there."""
    value = document
    for key, index in _STEP.findall(path):
        if key:
            where = _join(where, key)
            value = value.get(key) if isinstance(value, dict) else None
        elif index == "...":
            # msgspec does not name a mapping's key; the first entry of an unexpected kind is the one.
            key, value = _odd_entry(value)
            where = _join(where, key) if key else f"{where or 'request body'} values"
        else:
            where = f"{where or 'request body'}[{index}]"
            value = value[int(index)] if isinstance(value, list) and int(index) < len(value) else None
    return where, value


def _odd_entry(mapping: Any) -> tuple[str, Any]:
    if not isinstance(mapping, dict) or len(mapping) != 1:
        return "", None
    ((key, value),) = mapping.items()
    return str(key), value


def _join(where: str, key: str) -> str:
    part = key if _IDENTIFIER.match(key) else repr(key)[:60]
    if not where:
        return part
    return f"{where}.{part}" if _IDENTIFIER.match(key) else f"{where}[{part}]"


def _article(kind: str, *, root: bool) -> str:
    name = _JSON_NAMES.get(kind, kind)
    if name == "null":
        return "null"
    if name == "object" and root:
        return "a JSON object"
    return ("an " if name[0] in "aeiou" else "a ") + name


def _length(name: str, kind: str, op: str, limit: int, value: Any) -> str:
    if kind == "str":
        if op == ">=":
            what = "a non-empty string" if limit == 1 else f"at least {limit} characters long"
            return f"{name} must be {what}"
        return f"{name} must be at most {limit} characters long"
    count = len(value) if isinstance(value, list | dict) else "too many"
    if op == "<=":
        return f"{name} has {count} entries; at most {limit} are allowed"
    return f"{name} must have at least {limit} entries"


def _options(kind: Any, path: str) -> str:
    """The allowed values of the enum at ``path`` of ``kind`` (msgspec's message does not list them)."""
    node: Any = msgspec.inspect.type_info(kind) if kind is not None else None
    for key, _index in _STEP.findall(path):
        node = _step(_plain(node), key)
    values: list[Any] = []
    for option in _alternatives(node):
        if isinstance(option, msgspec.inspect.LiteralType):
            values.extend(option.values)
        elif isinstance(option, msgspec.inspect.NoneType):
            values.append(None)
    shown = [v if isinstance(v, str) else json.dumps(v) for v in values]
    return ", ".join(shown) if shown else "the documented values"


def _plain(node: Any) -> Any:
    while isinstance(node, msgspec.inspect.Metadata):
        node = node.type
    return node


def _alternatives(node: Any) -> list[Any]:
    node = _plain(node)
    if isinstance(node, msgspec.inspect.UnionType):
        return [_plain(t) for t in node.types]
    return [node]


def _step(node: Any, key: str) -> Any:
    """The type one path step below ``node`` (a field of a Struct, an item of a list or mapping)."""
    for option in _alternatives(node):
        if key and isinstance(option, msgspec.inspect.StructType):
            for field in option.fields:
                if field.encode_name == key:
                    return field.type
        if not key and isinstance(option, msgspec.inspect.ListType | msgspec.inspect.SetType):
            return option.item_type
        if not key and isinstance(option, msgspec.inspect.DictType):
            return option.value_type
    return None


def _number(text: str) -> str:
    return text[:-2] if text.endswith(".0") else text


def _show(value: Any) -> str:
    """A short one-line rendering of a client value for an error message."""
    text = json.dumps(value) if isinstance(value, bool) or value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
