"""Constrained field types several contracts share; each states its rule where the schema can show it."""

from __future__ import annotations

from typing import Annotated

import msgspec

from contracts.checked import PATTERN_PHRASES

INT64_MAX = 2**63 - 1
#: The largest finite double: bounds that make a number field refuse inf and nan (msgpack carries them).
FLOAT_MAX = 1.7976931348623157e308

#: A JSON integer that fits an int64 and is not negative.
Count = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
#: A JSON integer >= 1.
Positive = Annotated[int, msgspec.Meta(ge=1, le=INT64_MAX)]
#: A number > 0 (JSON integers accepted where floats are meant).
PositiveNumber = Annotated[float, msgspec.Meta(gt=0, le=FLOAT_MAX)]
#: A finite number.
Finite = Annotated[float, msgspec.Meta(ge=-FLOAT_MAX, le=FLOAT_MAX)]
#: A string with at least one character.
Text = Annotated[str, msgspec.Meta(min_length=1)]

#: An http(s) URL in printable ASCII with a host of URL characters (what the sender's client parses).
URL_BODY = r"[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9._~%!$&'()*+,;=:@\[\]-]+(?:[/?#][\x21-\x7e]*)?"
HTTP_URL = rf"^{URL_BODY}$"
PATTERN_PHRASES[HTTP_URL] = "an http(s) URL"
#: An http(s) URL with a host (callback bases). Where it may point is the node's callback policy.
HttpUrl = Annotated[str, msgspec.Meta(pattern=HTTP_URL, description=(
    "An http(s) URL with a host, in printable ASCII. Refused when it resolves to this node's own ports, "
    "loopback (unless MLNODE_CALLBACK_ALLOW_LOOPBACK), link-local, unspecified or multicast addresses, "
    "or a host outside MLNODE_CALLBACK_HOSTS when that is set."))]

NO_NUL = r"^[^\x00]*$"
PATTERN_PHRASES[NO_NUL] = "a string without NUL characters"
#: Text handed to another program's command line: NUL cannot be passed there.
Argument = Annotated[str, msgspec.Meta(pattern=NO_NUL)]

WORD = r"^[^\x00]*[^\s\x00][^\x00]*$"
PATTERN_PHRASES[WORD] = "a non-empty string (not only spaces, no NUL characters)"
#: A name handed to another program: not blank, no NUL.
Name = Annotated[str, msgspec.Meta(pattern=WORD)]

#: A Hugging Face repo id (``name`` or ``org/name``, no ``--`` or ``..``), or an absolute directory.
_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
HUB_ID = rf"(?!.*(?:--|\.\.))(?:{_HUB_PART}/)?{_HUB_PART}"
MODEL_NAME = rf"^(?:/[^\x00]*|{HUB_ID})$"
PATTERN_PHRASES[MODEL_NAME] = "a Hugging Face repo id (org/name) or an absolute directory"
#: What ``inference/up`` may name as a model (the directory must also be under MLNODE_MODEL_ROOTS).
ModelName = Annotated[str, msgspec.Meta(pattern=MODEL_NAME, description=(
    "A Hugging Face repo id (`name` or `org/name`) or an absolute directory under MLNODE_MODEL_ROOTS."))]
