"""The ``inference/up`` request as the engines need it: the contract's body with its defaults applied.

The body itself is declared (and checked) once, in :mod:`contracts.inference`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from contracts.checked import convert
from contracts.inference import DTYPES, InferenceUp

__all__ = ["DTYPES", "UpRequest", "parse_up_request"]


@dataclass(frozen=True)
class UpRequest:
    model: str
    dtype: str = "auto"
    additional_args: tuple[str, ...] = ()

    @classmethod
    def of(cls, body: InferenceUp) -> UpRequest:
        """null dtype means auto, null additional_args means none."""
        args = tuple(body.additional_args or ())
        return cls(model=body.model, dtype=body.dtype or "auto", additional_args=args)

    @property
    def served_names(self) -> tuple[str, ...]:
        """The names the engine answers to: ``--served-model-name`` values (several allowed), else model."""
        args = self.additional_args
        for i, arg in enumerate(args):
            if arg.startswith("--served-model-name="):
                return (arg.split("=", 1)[1],)
            if arg == "--served-model-name":
                names = []
                for value in args[i + 1:]:
                    if value.startswith("--"):
                        break
                    names.append(value)
                return tuple(names) or (self.model,)
        return (self.model,)

    def to_wire(self) -> dict[str, Any]:
        return {"model": self.model, "dtype": self.dtype, "additional_args": list(self.additional_args)}


def parse_up_request(body: Any) -> UpRequest:
    """A body as JSON values (a remembered request, the autostart one) checked by the contract."""
    return UpRequest.of(convert(body, InferenceUp))
