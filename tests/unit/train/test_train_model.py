"""The seeded tiny Llama: deterministic init, causal, GQA, shapes known without allocation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from services.train.config import ModelConfig
from services.train.model import (
    Block,
    TinyLlama,
    apply_rotary,
    build_model,
    count_parameters,
    parameter_shapes,
    rotary_tables,
)
from services.train.vocab import VOCAB_SIZE


def _block(model: TinyLlama) -> Block:
    block = model.blocks[0]
    assert isinstance(block, Block)
    return block


CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, seed=3)


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_same_seed_same_weights_and_the_global_rng_is_untouched() -> None:
    rng_before = torch.get_rng_state()
    a, b = build_model(CFG), build_model(CFG)
    assert torch.equal(torch.get_rng_state(), rng_before)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name
    c = build_model(ModelConfig(**{**CFG.__dict__, "seed": 4}))
    assert not torch.equal(a.embed.weight, c.embed.weight)


def test_init_scales() -> None:
    model = build_model(ModelConfig(dim=64, n_layers=8, n_heads=4, n_kv_heads=4, ffn_hidden=128))
    assert torch.equal(model.norm.weight, torch.ones(64))
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert _block(model).attn.wo.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)


def test_logits_shape_and_initial_loss_near_uniform() -> None:
    model = build_model(CFG)
    tokens = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(0))
    assert model(tokens[:, :-1]).shape == (3, 16, VOCAB_SIZE)
    assert model.loss(tokens).item() == pytest.approx(math.log(VOCAB_SIZE), abs=0.1)


def test_future_tokens_do_not_change_earlier_logits() -> None:
    model = build_model(CFG)
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    changed = tokens.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 256
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.equal(a[0, :7], b[0, :7])
    assert not torch.allclose(a[0, 7:], b[0, 7:])


def test_attention_matches_a_written_out_gqa_reference() -> None:
    model = build_model(CFG)
    attn = _block(model).attn
    x = torch.randn(2, 9, CFG.dim, generator=torch.Generator().manual_seed(2))
    cos, sin = rotary_tables(9, CFG.head_dim, CFG.rope_theta, x.device)
    with torch.no_grad():
        got = attn(x, cos, sin)
        q = apply_rotary(attn.wq(x).view(2, 9, 4, 8).transpose(1, 2), cos, sin)
        k = apply_rotary(attn.wk(x).view(2, 9, 2, 8).transpose(1, 2), cos, sin).repeat_interleave(2, dim=1)
        v = attn.wv(x).view(2, 9, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(8)
        scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
        ref = attn.wo((F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(2, 9, 32))
    assert torch.allclose(got, ref, atol=1e-6)


def test_rotary_preserves_norms_and_rotates_by_position() -> None:
    cos, sin = rotary_tables(5, 8, 10000.0, torch.device("cpu"))
    x = torch.randn(1, 1, 5, 8, generator=torch.Generator().manual_seed(3))
    y = apply_rotary(x, cos, sin)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-6)
    assert torch.equal(y[..., 0, :], x[..., 0, :])  # position 0 is not rotated
    assert not torch.allclose(y[..., 1, :], x[..., 1, :])


def test_parameter_shapes_match_the_real_model_without_allocating() -> None:
    shapes = parameter_shapes(CFG)
    real = [(n, tuple(p.shape)) for n, p in build_model(CFG).named_parameters()]
    assert shapes == real
    assert ("blocks.0.attn.wk.weight", (16, 32)) in shapes  # 2 kv heads of 8
    assert count_parameters(CFG) == sum(p.numel() for p in build_model(CFG).parameters())
    big = ModelConfig(dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, ffn_hidden=5632)
    per_layer = 2 * 2048 * 2048 + 2 * 2048 * 1024 + 3 * 2048 * 5632 + 2 * 2048
    # ~756M parameters counted on the meta device: no memory is allocated.
    assert count_parameters(big) == 16 * per_layer + 2 * VOCAB_SIZE * 2048 + 2048


def test_training_is_deterministic() -> None:
    def train() -> list[torch.Tensor]:
        model = build_model(CFG)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        tokens = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(5))
        for _ in range(3):
            model.loss(tokens).backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(train(), train(), strict=True))
