"""Run the served model's body on given ``inputs_embeds``, outside vLLM's scheduler, with layer hooks.

PoC v2 (and diagnostics) need the final-norm hidden states of the *served* weights for inputs that are
not token ids, with a transform of the residual stream after every decoder layer. The engine's own
forward pass cannot do that: it reads paged KV caches through per-step attention metadata. So this walks
the model's own decoder layers (their norms, projections, q/k norms, rotary embedding, MLP or MoE run
unchanged) and swaps only the attention core for a plain causal SDPA over each sequence, reading and
writing no KV cache. It runs in the worker between engine steps (``collective_rpc``), so the batch being
served is not disturbed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: ``hook(global_layer_index, x)`` -> new ``x``; ``x`` is the residual stream ``[B, T, H]``.
LayerHook = Callable[[int, torch.Tensor], torch.Tensor]


def holds_final_norm() -> bool:
    """True on the one worker whose result carries the final-norm output: last PP rank, TP rank 0."""
    from vllm.distributed import get_pp_group, get_tp_group

    return bool(get_pp_group().is_last_rank and get_tp_group().rank_in_group == 0)


def _decoder(model: nn.Module) -> Any:
    body = getattr(model, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(body, "norm"):
        raise NotImplementedError(f"{type(model).__name__} has no decoder body (.model.layers/.norm)")
    return body


class _CausalCore:
    """Stands in for one vLLM ``Attention`` module: causal attention within each of ``batch`` sequences."""

    def __init__(self, attn: Any, batch: int, seq_len: int) -> None:
        self.heads = int(attn.num_heads)
        self.kv_heads = int(attn.num_kv_heads)
        self.head_dim = int(attn.head_size)
        impl = getattr(attn, "impl", None)
        self.scale = float(getattr(impl, "scale", self.head_dim**-0.5))
        if getattr(attn, "sliding_window", None) is not None:
            raise NotImplementedError("run_body does not support sliding-window attention")
        self.batch = batch
        self.seq_len = seq_len

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *_: Any,
                 **__: Any) -> torch.Tensor:
        b, t, d = self.batch, self.seq_len, self.head_dim
        q = query.reshape(b, t, self.heads, d).transpose(1, 2)
        k = key.reshape(b, t, self.kv_heads, d).transpose(1, 2)
        v = value.reshape(b, t, self.kv_heads, d).transpose(1, 2)
        if self.kv_heads != self.heads:
            group = self.heads // self.kv_heads
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return out.transpose(1, 2).reshape(b * t, self.heads * d)


@contextlib.contextmanager
def _plain_attention(layers: list[Any], batch: int, seq_len: int) -> Iterator[None]:
    """Route each layer's ``self_attn.attn`` call to :class:`_CausalCore` for the duration."""
    swapped: list[Any] = []
    try:
        for layer in layers:
            attn = layer.self_attn.attn
            attn.forward = _CausalCore(attn, batch, seq_len)  # instance attribute shadows the method
            swapped.append(attn)
        yield
    finally:
        for attn in swapped:
            del attn.forward


def run_body(model: nn.Module, inputs_embeds: torch.Tensor,
             layer_hook: LayerHook | None = None) -> torch.Tensor:
    """Final RMSNorm output ``[B, T, H]`` for ``inputs_embeds`` ``[B, T, H]`` at positions 0..T-1.

    ``layer_hook`` sees (and replaces) the residual stream after every decoder layer, the last included,
    before the final norm. Pipeline parallelism is not supported (the body must be whole on this rank).
    """
    body = _decoder(model)
    if inputs_embeds.dim() != 3:
        raise ValueError(f"inputs_embeds must be [batch, seq_len, hidden], got {tuple(inputs_embeds.shape)}")
    start = int(getattr(body, "start_layer", 0))
    end = int(getattr(body, "end_layer", len(body.layers)))
    if start != 0 or end != len(body.layers):
        raise NotImplementedError("run_body needs the whole model on one pipeline stage")
    batch, seq_len, hidden_size = inputs_embeds.shape
    layers: list[Any] = list(body.layers)
    positions = torch.arange(seq_len, device=inputs_embeds.device).repeat(batch)
    hidden = inputs_embeds.reshape(batch * seq_len, hidden_size)
    residual: torch.Tensor | None = None
    with torch.inference_mode(), _plain_attention(layers, batch, seq_len):
        for index, layer in enumerate(layers):
            hidden, residual = layer(positions, hidden, residual)
            if layer_hook is not None:
                stream = hidden + residual if residual is not None else hidden
                stream = layer_hook(index, stream.reshape(batch, seq_len, hidden_size))
                hidden, residual = stream.reshape(batch * seq_len, hidden_size), None
        if residual is None:
            out = body.norm(hidden)
        else:
            out, _ = body.norm(hidden, residual)
    return out.reshape(batch, seq_len, hidden_size)
