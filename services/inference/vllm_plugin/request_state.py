"""What one request asks of the sampler, carried from vLLM's API server to its workers in ``extra_args``.

The API server reads the network's fields (top level, or in ``vllm_xargs``) once, where the tokenizer
and the vocabulary are known (``SamplingParams.verify``), and replaces them by one resolved entry:
``extra_args["mlnode"] = {"forced": [ids] | None, "mode": "raw_logprobs" | "processed_logprobs"}``. The
workers only read that entry. Pure Python: imported by every engine process, tested without vLLM.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.inference.validation.request import DEFAULT_MODE, FIELDS, MODES, PROCESSED, Tokenize, resolve

KEY = "mlnode"
#: The mode of a request that names none; the launcher sets it from the node's setting (or the ``up``
#: request's ``--logprobs-mode``). The engine itself always runs ``--logprobs-mode processed_logprobs``.
DEFAULT_MODE_ENV = "MLNODE_LOGPROBS_MODE"


def default_mode(environ: Mapping[str, str] | None = None) -> str:
    """The engine's default mode; an unknown value stops the engine instead of serving other numbers."""
    value = (os.environ if environ is None else environ).get(DEFAULT_MODE_ENV) or DEFAULT_MODE
    if value not in MODES:
        raise RuntimeError(f"{DEFAULT_MODE_ENV} must be one of {', '.join(MODES)}, got {value!r}")
    return value


def network_fields(extra_args: Mapping[str, Any] | None,
                   top_level: Mapping[str, Any] | None) -> dict[str, Any]:
    """The network's fields of a request: ``vllm_xargs`` first, the top-level fields win."""
    fields = {k: v for k, v in (extra_args or {}).items() if k in FIELDS and v is not None}
    fields.update({k: v for k, v in (top_level or {}).items() if k in FIELDS and v is not None})
    return fields


def resolved_extra_args(extra_args: Mapping[str, Any] | None, *, tokenize: Tokenize, vocab_size: int,
                        mode: str) -> dict[str, Any]:
    """``extra_args`` with the network's fields replaced by the resolved entry (FieldError if refused)."""
    resolved = resolve(network_fields(extra_args, None), tokenize=tokenize, vocab_size=vocab_size,
                       default_mode=mode)
    out = {k: v for k, v in (extra_args or {}).items() if k not in FIELDS}
    out[KEY] = {"forced": None if resolved.forced is None else list(resolved.forced), "mode": resolved.mode}
    return out


@dataclass(frozen=True)
class RowRequest:
    """A request's wishes as a worker reads them."""

    forced: tuple[int, ...] | None
    mode: str

    @property
    def ordinary(self) -> bool:
        """Nothing to do beyond what the engine does anyway (free decoding, processed logprobs)."""
        return self.forced is None and self.mode == PROCESSED


def row_request(extra_args: Mapping[str, Any] | None, mode: str) -> RowRequest:
    """The resolved entry of ``extra_args`` (a request that bypassed the API server gets ``mode``)."""
    entry = (extra_args or {}).get(KEY)
    if not isinstance(entry, Mapping):
        return RowRequest(None, mode)
    forced = entry.get("forced")
    wanted = entry.get("mode")
    if forced is not None and not (isinstance(forced, list | tuple) and all(type(t) is int for t in forced)):
        raise ValueError(f"extra_args.{KEY}.forced must be a list of token ids")
    if wanted not in MODES:
        raise ValueError(f"extra_args.{KEY}.mode must be one of {', '.join(MODES)}")
    return RowRequest(None if forced is None else tuple(forced), str(wanted))
