"""The Llama forward pass: matches a plain reference implementation, and its outputs are pinned."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from services.inference.cpu_engine.checkpoint import LoadedModel, create_tiny, load, load_weights
from services.inference.cpu_engine.config import ModelConfig


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    create_tiny(path, seed=0)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> LoadedModel:
    return load(tiny_dir)


def _reference_logits(w: dict[str, torch.Tensor], cfg: ModelConfig, ids: list[int]) -> torch.Tensor:
    """HF LlamaForCausalLM written out head by head in float64, no cache: logits at every position."""
    w = {k: v.double() for k, v in w.items()}
    hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    n = len(ids)

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], dim=-1)

    inv_freq = torch.tensor(
        [1.0 / cfg.rope_theta ** (2 * i / hd) for i in range(hd // 2)], dtype=torch.float64
    )
    angles = torch.outer(torch.arange(n, dtype=torch.float64), inv_freq)
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None, :]
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None, :]
    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(n, nh, hd)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(n, nkv, hd)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(n, nkv, hd)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        heads = []
        for head in range(nh):
            kv = head // (nh // nkv)
            scores = q[:, head] @ k[:, kv].T / math.sqrt(hd)
            scores = scores.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
            heads.append(torch.softmax(scores, -1) @ v[:, kv])
        x = x + torch.cat(heads, -1) @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gate = torch.nn.functional.silu(h @ w[p + "mlp.gate_proj.weight"].T)
        x = x + (gate * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    return rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


def test_incremental_decoding_matches_the_reference(tiny_dir: Path, tiny: LoadedModel) -> None:
    ids = tiny.tokenizer.encode("The quick brown fox 🦊 jumps", add_special_tokens=True)
    expected = _reference_logits(load_weights(tiny_dir), tiny.config, ids)
    cache = tiny.model.new_cache()
    got = [tiny.model.forward(ids[:5], cache)]
    got += [tiny.model.forward([t], cache) for t in ids[5:]]
    for pos, logits in zip(range(4, len(ids)), got, strict=True):
        torch.testing.assert_close(logits.double(), expected[pos], atol=1e-4, rtol=1e-4)


def test_kv_cache_growth_keeps_results(tiny: LoadedModel) -> None:
    ids = [256] + [ord("a") + i % 26 for i in range(150)]  # crosses two cache chunks
    cache = tiny.model.new_cache()
    tiny.model.forward(ids[:1], cache)
    for t in ids[1:-1]:
        tiny.model.forward([t], cache)
    last_step = tiny.model.forward(ids[-1:], cache)
    whole = tiny.model.forward(ids, tiny.model.new_cache())
    torch.testing.assert_close(last_step, whole, atol=1e-5, rtol=1e-5)
    assert cache.length == len(ids) and cache.capacity == 192


def test_model_output_is_pinned(tiny: LoadedModel) -> None:
    ids = tiny.tokenizer.encode("Hello", add_special_tokens=True)
    cache = tiny.model.new_cache()
    logits = tiny.model.forward(ids, cache)
    pinned = [1.4647382497787476, 0.8745797276496887, -2.066620111465454, -2.7906346321105957]
    torch.testing.assert_close(logits[:4], torch.tensor(pinned), atol=1e-4, rtol=1e-4)
    greedy = []
    for _ in range(8):
        greedy.append(int(logits.argmax()))
        logits = tiny.model.forward(greedy[-1:], cache)
    assert greedy == [12, 139, 69, 93, 8, 21, 145, 202]


def test_float16_runs_close_to_float32(tiny_dir: Path, tiny: LoadedModel) -> None:
    half = load(tiny_dir, "float16")
    ids = tiny.tokenizer.encode("Hello", add_special_tokens=True)
    full = tiny.model.forward(ids, tiny.model.new_cache())
    low = half.model.forward(ids, half.model.new_cache())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full, atol=5e-2, rtol=5e-2)
