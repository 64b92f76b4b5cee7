"""The subset of a Hugging Face Llama / Qwen3 ``config.json`` the CPU engine understands, checked on load.

Qwen3 is a Llama with a per-head RMSNorm on q and k before the rotary embedding (``qk_norm``). Anything
we cannot compute faithfully (rope scaling, biases, sliding windows, another architecture) is refused
with a ConfigError naming the field, rather than silently serving a model that differs from what vLLM
would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from node.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}

# model_type -> whether attention normalises q and k per head before the rotary embedding.
ARCHITECTURES: dict[str, bool] = {"llama": False, "qwen3": True}


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    torch_dtype: str
    tie_word_embeddings: bool
    qk_norm: bool = False
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, doc: Any) -> ModelConfig:
        if not isinstance(doc, dict):
            raise ConfigError("config.json must hold a JSON object")
        model_type = doc.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ConfigError(
                f"config.json: model_type must be one of {', '.join(ARCHITECTURES)}, got {model_type!r}"
            )
        if doc.get("rope_scaling") is not None:
            raise ConfigError("config.json: rope_scaling is not supported by the CPU engine")
        rope = doc.get("rope_parameters")
        if rope is not None and (not isinstance(rope, dict) or rope.get("rope_type", "default") != "default"):
            raise ConfigError("config.json: only rope_parameters.rope_type 'default' is supported")
        if doc.get("use_sliding_window"):
            raise ConfigError("config.json: use_sliding_window is not supported by the CPU engine")
        for flag in ("attention_bias", "mlp_bias"):
            if doc.get(flag):
                raise ConfigError(f"config.json: {flag} is not supported by the CPU engine")
        if doc.get("hidden_act", "silu") != "silu":
            raise ConfigError("config.json: hidden_act must be 'silu'")

        def positive_int(key: str, default: int | None = None) -> int:
            value = doc.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config.json: {key} must be a positive integer, got {value!r}")
            return value

        def positive_float(key: str, default: float) -> float:
            value = doc.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"config.json: {key} must be a positive number, got {value!r}")
            return float(value)

        hidden = positive_int("hidden_size")
        heads = positive_int("num_attention_heads")
        kv_heads = positive_int("num_key_value_heads", heads)
        if heads % kv_heads:
            raise ConfigError("config.json: num_attention_heads must be a multiple of num_key_value_heads")
        head_dim = positive_int("head_dim", hidden // heads if hidden % heads == 0 else None)
        if head_dim % 2:
            raise ConfigError("config.json: head_dim must be even (rotary embeddings)")
        dtype = str(doc.get("torch_dtype") or doc.get("dtype") or "float32")
        theta = float((rope or {}).get("rope_theta", 10000.0))
        eos = doc.get("eos_token_id")
        eos_ids = tuple(e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int))
        return cls(
            hidden_size=hidden,
            intermediate_size=positive_int("intermediate_size"),
            num_hidden_layers=positive_int("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=positive_int("vocab_size"),
            max_position_embeddings=positive_int("max_position_embeddings"),
            rms_norm_eps=positive_float("rms_norm_eps", 1e-6),
            rope_theta=positive_float("rope_theta", theta),
            torch_dtype=dtype,
            tie_word_embeddings=bool(doc.get("tie_word_embeddings", False)),
            qk_norm=ARCHITECTURES[model_type],
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_dir(cls, path: Path) -> ModelConfig:
        try:
            doc = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"config.json: cannot read {path / 'config.json'}: {exc}") from exc
        return cls.from_dict(doc)


def resolve_dtype(requested: str, cfg: ModelConfig) -> torch.dtype:
    """``auto`` means the checkpoint's own dtype (float32 when it names one we do not know)."""
    if requested == "auto":
        return DTYPES.get(cfg.torch_dtype, torch.float32)
    if requested not in DTYPES:
        raise ConfigError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {requested!r}")
    return DTYPES[requested]
