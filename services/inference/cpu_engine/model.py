"""A Llama / Qwen3 decoder (HF ``LlamaForCausalLM`` / ``Qwen3ForCausalLM``) that runs on CPU.

Why one sequence at a time: a batched matmul picks different kernels for different batch sizes, so a
sequence's logits would depend (in the last bits) on what else is in the batch, and seeded sampling or
a validator's logprob replay would stop being reproducible. Per-sequence forwards with a KV cache whose
layout depends only on the sequence's own length give bit-identical logits for the same tokens, whatever
runs beside them. The projections are fused (q|k|v, gate|up) to keep the per-token op count small.

PoC v2 needs the other shape of work: many independent full-length prefills from ``inputs_embeds`` with
a hook after every layer and no cache, so :meth:`LlamaModel.body` runs a batch of those.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from node.errors import ConfigError

from .config import ModelConfig

_CACHE_CHUNK = 64


class KVCache:
    """Keys and values of one sequence, grown in fixed chunks so the layout is a function of length."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        self.layers = layers
        self.shape = (kv_heads, 0, head_dim)
        self.dtype = dtype
        self.length = 0
        self.keys: list[torch.Tensor] = [torch.empty(self.shape, dtype=dtype) for _ in range(layers)]
        self.values: list[torch.Tensor] = [torch.empty(self.shape, dtype=dtype) for _ in range(layers)]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]

    def reserve(self, extra: int) -> None:
        need = self.length + extra
        if need <= self.capacity:
            return
        cap = -(-need // _CACHE_CHUNK) * _CACHE_CHUNK
        kv_heads, _, head_dim = self.shape
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = torch.zeros((kv_heads, cap, head_dim), dtype=self.dtype)
                new[:, : self.length] = old[:, : self.length]
                store[i] = new


LayerHook = Callable[[int, torch.Tensor], torch.Tensor]


class _Layer:
    def __init__(
        self, w: Mapping[str, torch.Tensor], prefix: str, cfg: ModelConfig, dtype: torch.dtype
    ) -> None:
        def get(name: str) -> torch.Tensor:
            return w[f"{prefix}.{name}"].to(dtype).contiguous()

        # Qwen3: one (heads, head_dim) gain table for the q heads then the k heads, applied in one op.
        self.qk_norm: torch.Tensor | None = None
        if cfg.qk_norm:
            q_gain = get("self_attn.q_norm.weight").expand(cfg.num_attention_heads, -1)
            k_gain = get("self_attn.k_norm.weight").expand(cfg.num_key_value_heads, -1)
            self.qk_norm = torch.cat([q_gain, k_gain]).contiguous()

        self.ln_in = get("input_layernorm.weight")
        self.ln_post = get("post_attention_layernorm.weight")
        self.qkv = torch.cat([get(f"self_attn.{p}_proj.weight") for p in "qkv"]).contiguous()
        self.o = get("self_attn.o_proj.weight")
        self.gate_up = torch.cat([get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")]).contiguous()
        self.down = get("mlp.down_proj.weight")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF parameter name of a Llama (or Qwen3) checkpoint with its shape."""
    h, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes.update(
            {
                f"{p}.self_attn.q_proj.weight": (q, h),
                f"{p}.self_attn.k_proj.weight": (kv, h),
                f"{p}.self_attn.v_proj.weight": (kv, h),
                f"{p}.self_attn.o_proj.weight": (h, q),
                f"{p}.mlp.gate_proj.weight": (inter, h),
                f"{p}.mlp.up_proj.weight": (inter, h),
                f"{p}.mlp.down_proj.weight": (h, inter),
                f"{p}.input_layernorm.weight": (h,),
                f"{p}.post_attention_layernorm.weight": (h,),
            }
        )
        if cfg.qk_norm:
            shapes[f"{p}.self_attn.q_norm.weight"] = (hd,)
            shapes[f"{p}.self_attn.k_norm.weight"] = (hd,)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


class LlamaModel:
    """Inference-only Llama: ``forward(new_tokens, cache)`` -> float32 logits of the last position."""

    def __init__(
        self, cfg: ModelConfig, weights: Mapping[str, torch.Tensor], dtype: torch.dtype, max_len: int
    ) -> None:
        for name, shape in expected_shapes(cfg).items():
            if name not in weights:
                raise ConfigError(f"model weights: missing tensor {name}")
            if tuple(weights[name].shape) != shape:
                raise ConfigError(
                    f"model weights: {name} has shape {tuple(weights[name].shape)}, want {shape}"
                )
        self.cfg = cfg
        self.dtype = dtype
        self.max_len = max_len
        self.embed = weights["model.embed_tokens.weight"].to(dtype).contiguous()
        head = weights["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
        self.lm_head = head.to(dtype).contiguous()
        self.norm = weights["model.norm.weight"].to(dtype).contiguous()
        self.layers = [
            _Layer(weights, f"model.layers.{i}", cfg, dtype) for i in range(cfg.num_hidden_layers)
        ]
        self.n_q = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.group = self.n_q // self.n_kv
        self.hd = cfg.head_dim
        self.scale = self.hd**-0.5
        # Rotary tables in the HF "rotate half" layout; sin carries the sign of the rotated half so the
        # rotation is x * cos + swap_halves(x) * sin.
        # On the weights' device (the GPU benchmark script builds this model on CUDA).
        dev = self.embed.device
        inv_freq = 1.0 / (
            cfg.rope_theta ** (torch.arange(0, self.hd, 2, dtype=torch.float32, device=dev) / self.hd)
        )
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32, device=dev), inv_freq)
        self.cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(dtype)
        self.sin = torch.cat([-angles.sin(), angles.sin()], dim=-1).to(dtype)

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers), self.n_kv, self.hd, self.dtype)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)
        return weight * xf.to(self.dtype)

    def _rotate(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: _Layer) -> torch.Tensor:
        """q|k heads (``[..., heads, head_dim]``): Qwen3's per-head norm, then rotary (rotate-half form)."""
        if layer.qk_norm is not None:
            qk = self._rms(qk, layer.qk_norm)
        half = self.hd // 2
        swapped = torch.cat([qk[..., half:], qk[..., :half]], dim=-1)
        return qk * cos + swapped * sin

    @torch.inference_mode()
    def body(self, embeds: torch.Tensor, after_layer: LayerHook | None = None) -> torch.Tensor:
        """Final-norm hidden states ``[B, T, H]`` of ``B`` independent causal sequences given as
        ``inputs_embeds`` ``[B, T, H]`` at positions 0..T-1; ``after_layer(i, x)`` may replace the
        residual stream after decoder layer ``i``."""
        b, n, _ = embeds.shape
        if n == 0 or n > self.max_len:
            raise ValueError(f"cannot run {n} positions (max_len {self.max_len})")
        cos = self.cos[:n].unsqueeze(1)
        sin = self.sin[:n].unsqueeze(1)
        qk_width = (self.n_q + self.n_kv) * self.hd
        x = embeds.to(self.dtype)
        for li, layer in enumerate(self.layers):
            h = self._rms(x, layer.ln_in)
            qkv = F.linear(h, layer.qkv)
            qk = qkv[..., :qk_width].reshape(b, n, self.n_q + self.n_kv, self.hd)
            qk = self._rotate(qk, cos, sin, layer)
            q = qk[:, :, : self.n_q].transpose(1, 2)
            k = qk[:, :, self.n_q :].transpose(1, 2).repeat_interleave(self.group, dim=1)
            v = qkv[..., qk_width:].reshape(b, n, self.n_kv, self.hd).transpose(1, 2)
            v = v.repeat_interleave(self.group, dim=1)
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
            x = x + F.linear(att.transpose(1, 2).reshape(b, n, self.n_q * self.hd), layer.o)
            h = self._rms(x, layer.ln_post)
            gate, up = F.linear(h, layer.gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.down)
            if after_layer is not None:
                x = after_layer(li, x)
        return self._rms(x, self.norm)

    @torch.inference_mode()
    def forward(self, tokens: Sequence[int], cache: KVCache) -> torch.Tensor:
        n = len(tokens)
        start = cache.length
        if n == 0 or start + n > self.max_len:
            raise ValueError(f"cannot run {n} tokens at position {start} (max_len {self.max_len})")
        cache.reserve(n)
        end = start + n
        cos = self.cos[start:end].unsqueeze(1)
        sin = self.sin[start:end].unsqueeze(1)
        qk_width = (self.n_q + self.n_kv) * self.hd
        mask = None
        if n > 1:
            query_pos = torch.arange(start, end).unsqueeze(1)
            key_pos = torch.arange(end).unsqueeze(0)
            mask = torch.zeros((n, end), dtype=torch.float32).masked_fill_(key_pos > query_pos, float("-inf"))
        x = self.embed[torch.tensor(tokens, dtype=torch.long)]
        for li, layer in enumerate(self.layers):
            h = self._rms(x, layer.ln_in)
            qkv = F.linear(h, layer.qkv)
            qk = self._rotate(qkv[:, :qk_width].reshape(n, self.n_q + self.n_kv, self.hd), cos, sin, layer)
            v = qkv[:, qk_width:].reshape(n, self.n_kv, self.hd)
            keys, values = cache.keys[li], cache.values[li]
            keys[:, start:end] = qk[:, self.n_q :].transpose(0, 1)
            values[:, start:end] = v.transpose(0, 1)
            q = qk[:, : self.n_q].reshape(n, self.n_kv, self.group, self.hd).permute(1, 2, 0, 3)
            scores = torch.matmul(q, keys[:, :end].unsqueeze(1).transpose(-1, -2)).float() * self.scale
            if mask is not None:
                scores = scores + mask
            probs = torch.softmax(scores, dim=-1).to(self.dtype)
            att = torch.matmul(probs, values[:, :end].unsqueeze(1))
            att = att.permute(2, 0, 1, 3).reshape(n, self.n_q * self.hd)
            x = x + F.linear(att, layer.o)
            h = self._rms(x, layer.ln_post)
            gate, up = F.linear(h, layer.gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.down)
        cache.length = end
        last = self._rms(x[-1:], self.norm)
        return F.linear(last, self.lm_head)[0].float()
