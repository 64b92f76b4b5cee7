"""Everything the plugin changes inside stock vLLM, in one table, checked against the vLLM it was written for.

Stock vLLM has no numeric token strings, no per-request ``logprobs_mode`` and no ``enforced_tokens``
(spec §0). Rather than fork it, the plugin replaces six functions at engine start, in every engine
process (``register`` runs in the API server, the engine core and each worker):

* the two request models' ``to_sampling_params``: the network's top-level fields reach ``extra_args``;
* ``SamplingParams.verify``: those fields are resolved once, with the tokenizer and vocabulary at hand,
  and a value that can never be served becomes a 400 naming the field;
* the logprob token text (``LogprobsProcessor``'s ``convert_ids_list_to_tokens`` and the serving layer's
  ``_get_decoded_token``): the decimal token id, as the network's engine writes it;
* the V1 ``Sampler.forward``: see :mod:`.sampler`.

Each replacement is written against the code of the versions in :data:`SUPPORTED_VLLM`. An engine of
any other version refuses to start, with a message naming its version, and so does one whose targets
are missing or take other parameters: a changed vLLM must fail loudly, never serve numbers a validator
would reject.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: The vLLM releases the replacements were written against (the local part, ``+cpu``/``+cu129``, ignored).
SUPPORTED_VLLM = ("0.32.0",)
_INSTALLED = "__mlnode_patched__"


class IncompatibleVLLM(RuntimeError):
    """The running vLLM is not one the plugin was written for."""


def vllm_version() -> str:
    import vllm

    return str(vllm.__version__)


def check_version(version: str) -> None:
    release = version.split("+", 1)[0]
    if release not in SUPPORTED_VLLM:
        raise IncompatibleVLLM(
            f"the MLNode vLLM plugin was written for vLLM {', '.join(SUPPORTED_VLLM)} and this engine runs "
            f"vLLM {version}: refusing to start rather than serve logprobs validators would reject "
            f"(install vLLM {SUPPORTED_VLLM[-1]}, or an MLNode release written for {version})")


@dataclass(frozen=True)
class Patch:
    """One replaced attribute: ``owner`` is ``module`` or ``module:Class``."""

    owner: str
    name: str
    #: The original's parameter names, in order: the replacement was written for exactly these.
    parameters: tuple[str, ...]
    replace: Callable[[Any], Any]

    def _owner(self) -> Any:
        module, _, cls = self.owner.partition(":")
        target: Any = importlib.import_module(module)
        return getattr(target, cls) if cls else target

    def install(self) -> None:
        owner = self._owner()
        original = inspect.getattr_static(owner, self.name, None)
        if original is None:
            raise IncompatibleVLLM(f"vLLM has no {self.owner}.{self.name}, which the MLNode plugin replaces")
        if getattr(original, _INSTALLED, False):
            return
        function = original.__func__ if isinstance(original, staticmethod | classmethod) else original
        found = tuple(inspect.signature(function).parameters)
        if found != self.parameters:
            raise IncompatibleVLLM(f"vLLM's {self.owner}.{self.name} takes {found}, the MLNode plugin was "
                                   f"written for {self.parameters}")
        replacement = self.replace(function)
        setattr(replacement, _INSTALLED, True)
        if isinstance(original, staticmethod):
            replacement = staticmethod(replacement)
            setattr(replacement, _INSTALLED, True)
        setattr(owner, self.name, replacement)


# -- the replacements ----------------------------------------------------------------------------------

def _with_network_fields(original: Callable[..., Any]) -> Callable[..., Any]:
    """``to_sampling_params``: the request's top-level network fields join ``extra_args``."""
    from services.inference.vllm_plugin.request_state import network_fields

    @functools.wraps(original)
    def to_sampling_params(self: Any, *args: Any, **kwargs: Any) -> Any:
        params = original(self, *args, **kwargs)
        fields = network_fields(params.extra_args, self.model_extra)
        if fields:
            params.extra_args = {**(params.extra_args or {}), **fields}
        return params

    return to_sampling_params


def _resolving(original: Callable[..., Any]) -> Callable[..., Any]:
    """``SamplingParams.verify``: the network's fields resolved into the one entry workers read."""
    from vllm.exceptions import VLLMValidationError

    from services.inference.validation.request import FieldError
    from services.inference.vllm_plugin.request_state import default_mode, resolved_extra_args

    mode = default_mode()

    @functools.wraps(original)
    def verify(self: Any, model_config: Any, speculative_config: Any, structured_outputs_config: Any,
               tokenizer: Any) -> None:
        original(self, model_config, speculative_config, structured_outputs_config, tokenizer)

        def tokenize(text: str) -> list[int]:
            if tokenizer is None:
                raise FieldError("enforced_tokens", "text needs the model's tokenizer (skip_tokenizer_init)")
            return list(tokenizer.encode(text, add_special_tokens=False))

        try:
            self.extra_args = resolved_extra_args(self.extra_args, tokenize=tokenize,
                                                  vocab_size=model_config.get_vocab_size(), mode=mode)
        except FieldError as exc:
            raise VLLMValidationError(str(exc), parameter=exc.param) from None

    return verify


def _token_id_strings(_original: Callable[..., Any]) -> Callable[..., Any]:
    """``convert_ids_list_to_tokens`` as the logprobs processor uses it: decimal ids, not text."""

    def convert_ids_list_to_tokens(_tokenizer: Any, token_ids: list[int]) -> list[str]:
        return [str(t) for t in token_ids]

    return convert_ids_list_to_tokens


def _token_id_string(_original: Callable[..., Any]) -> Callable[..., Any]:
    """``_get_decoded_token``: the decimal id for every request (vLLM's ``token_id:N`` included)."""

    def _get_decoded_token(_logprob: Any, token_id: int, _tokenizer: Any,
                           return_as_token_id: bool = False) -> str:
        return str(token_id)

    return _get_decoded_token


def _network_sampler(original: Callable[..., Any]) -> Callable[..., Any]:
    from services.inference.vllm_plugin.sampler import network_forward

    return network_forward(original)


PATCHES: tuple[Patch, ...] = (
    Patch("vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest", "to_sampling_params",
          ("self", "max_tokens", "default_sampling_params"), _with_network_fields),
    Patch("vllm.entrypoints.openai.completion.protocol:CompletionRequest", "to_sampling_params",
          ("self", "max_tokens", "default_sampling_params"), _with_network_fields),
    Patch("vllm.sampling_params:SamplingParams", "verify",
          ("self", "model_config", "speculative_config", "structured_outputs_config", "tokenizer"),
          _resolving),
    Patch("vllm.v1.engine.logprobs", "convert_ids_list_to_tokens", ("tokenizer", "token_ids"),
          _token_id_strings),
    Patch("vllm.entrypoints.generate.base.serving:GenerateBaseServing", "_get_decoded_token",
          ("logprob", "token_id", "tokenizer", "return_as_token_id"), _token_id_string),
    Patch("vllm.v1.sample.sampler:Sampler", "forward",
          ("self", "logits", "sampling_metadata", "predict_bonus_token", "logprobs_mode_override"),
          _network_sampler),
)


def install(version: str | None = None) -> None:
    """Check the version, then install every patch (idempotent: a process that loads plugins twice)."""
    check_version(version or vllm_version())
    for patch in PATCHES:
        patch.install()
