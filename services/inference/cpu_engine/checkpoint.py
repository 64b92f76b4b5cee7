"""Model directories in the Hugging Face layout: make a tiny seeded one, or load one.

No model is ever downloaded: ``create_tiny`` builds a deterministic Llama or Qwen3 (weights drawn from a
seeded NumPy generator, so the same seed gives the same bytes on every machine) in exactly the layout
vLLM loads, which lets the same directory back both the CPU engine and a real vLLM. Its head_dim is 32 by
default because vLLM's CPU attention only has kernels for head sizes 32, 64, 80, 96, 112, 128, ...
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from node.errors import ConfigError
from node.logging import get_logger

from .chat_template import CHAT_TEMPLATE
from .config import ModelConfig, resolve_dtype
from .model import LlamaModel, expected_shapes
from .tokenizer import BOS, EOS, EOT, Tokenizer, special_token_names, tokenizer_json

log = get_logger(__name__)

TINY_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
TINY_FILES = frozenset(
    {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
)


def _dump(path: Path, doc: Any) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def create_tiny(
    path: Path,
    seed: int = 0,
    *,
    arch: str = "llama",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 32,
    intermediate: int = 128,
    vocab_size: int = 272,
    max_position_embeddings: int = 2048,
    rope_theta: float = 10000.0,
    rms_norm_eps: float = 1e-5,
) -> None:
    """Write a seeded ``arch`` ("llama" or "qwen3") model directory (config, safetensors, tokenizer
    files) to ``path``."""
    specials = special_token_names(vocab_size)
    if arch not in TINY_ARCHITECTURES:
        raise ConfigError(f"create_tiny: arch must be one of {', '.join(TINY_ARCHITECTURES)}, got {arch!r}")
    if heads % kv_heads:
        raise ConfigError("create_tiny: heads must be a multiple of kv_heads")
    ids = {name: 256 + i for i, name in enumerate(specials)}
    config = {
        "architectures": [TINY_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": rms_norm_eps,
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
        "bos_token_id": ids[BOS],
        "eos_token_id": [ids[EOS], ids[EOT]],
        "tie_word_embeddings": False,
        "use_cache": True,
    }
    if arch == "qwen3":
        config.update({"use_sliding_window": False, "sliding_window": None, "max_window_layers": layers})
    cfg = ModelConfig.from_dict(config)
    rng = np.random.default_rng(seed)
    tensors: dict[str, torch.Tensor] = {}
    # Sorted names make the draw order (and so the bytes) independent of dict construction order.
    for name, shape in sorted(expected_shapes(cfg).items()):
        if len(shape) == 1:
            values = np.ones(shape, dtype=np.float32)
        else:
            # 1/sqrt(fan_in) keeps activations O(1); the embedding is unit-variance and the head is
            # scaled up so logits spread over a few nats (clear greedy winners, non-uniform sampling).
            std = 1.0 if name.endswith("embed_tokens.weight") else shape[1] ** -0.5
            if name == "lm_head.weight":
                std *= 2.0
            values = (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)
        tensors[name] = torch.from_numpy(values)
    path.mkdir(parents=True, exist_ok=True)
    _dump(path / "config.json", config)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    _dump(path / "tokenizer.json", tokenizer_json(vocab_size))
    _dump(
        path / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOT,
            "pad_token": EOS,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": max_position_embeddings,
            "chat_template": CHAT_TEMPLATE,
            "added_tokens_decoder": {
                str(tid): {
                    "content": name,
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": True,
                }
                for name, tid in ids.items()
            },
        },
    )
    _dump(
        path / "generation_config.json",
        {"bos_token_id": ids[BOS], "eos_token_id": [ids[EOS], ids[EOT]], "do_sample": True},
    )


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors``, or of the shards a ``model.safetensors.index.json`` names."""
    single = path / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        raise ConfigError(f"model directory {path} has no model.safetensors")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"model.safetensors.index.json: unreadable weight_map: {exc}") from exc
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(load_file(str(path / shard)))
    return tensors


@dataclass
class LoadedModel:
    """Everything the engine needs from a model directory."""

    config: ModelConfig
    model: LlamaModel
    tokenizer: Tokenizer
    max_model_len: int


def load(path: Path, dtype: str = "auto", max_model_len: int | None = None) -> LoadedModel:
    """Load a model directory written by :func:`create_tiny` (or any HF Llama / Qwen3 one)."""
    cfg = ModelConfig.from_dir(path)
    limit = max_model_len or cfg.max_position_embeddings
    if limit > cfg.max_position_embeddings:
        raise ConfigError(
            f"--max-model-len {limit} exceeds the model's max_position_embeddings "
            f"{cfg.max_position_embeddings}"
        )
    tokenizer = Tokenizer.from_dir(path, cfg.eos_token_ids)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(
            f"tokenizer has {tokenizer.vocab_size} ids but config vocab_size is {cfg.vocab_size}"
        )
    model = LlamaModel(cfg, load_weights(path), resolve_dtype(dtype, cfg), limit)
    return LoadedModel(cfg, model, tokenizer, limit)


def load_or_synthesize(model: str, dtype: str, max_model_len: int | None, seed: int) -> LoadedModel:
    """Load ``model`` if it is a model directory; otherwise build a tiny model from ``seed``.

    The network names models by hub id (``Qwen/...``) and a CPU host never downloads them, so a name
    that is not a local directory gets a seeded stand-in served under that name (with room for the
    requested ``max_model_len``, so a client's ``--max-model-len 32768`` does not fail the launch).
    """
    path = Path(model)
    if (path / "config.json").is_file():
        return load(path, dtype, max_model_len)
    log.warning("model_synthesized", model=model, seed=seed, reason="not a local model directory")
    with tempfile.TemporaryDirectory(prefix="mlnode-tiny-") as tmp:
        create_tiny(Path(tmp), seed, max_position_embeddings=max(2048, max_model_len or 0))
        return load(Path(tmp), dtype, max_model_len)
