"""PoC v2 where only a GPU can show it: CUDA's ``topk(sorted=False)`` order against the spec's rule (the
CPU path implements the rule, the CUDA path calls topk as the network does, so they must agree), and
the golden cases computed with inputs, reflections and fingerprints on the device. Skipped, with the
reason, where CUDA is not available."""

from __future__ import annotations

import pytest
import torch

from services.inference.cpu_engine.checkpoint import load_weights
from services.inference.cpu_engine.config import ModelConfig
from services.inference.cpu_engine.model import LlamaModel
from services.inference.poc import batch, pick
from tests.support.pocv2 import TINY_QWEN3, check_artifacts, golden

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs CUDA: torch.cuda.is_available() is False"),
]

BLOCK_HASH = "9F3CA1A1B2B2C3C3D4D4E5E5F6F6A7A7B8B8C9C9D0D0E1E1F2F2A3A3B4B4C5C5"
PUBLIC_KEY = "02" + "5e" * 32
CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("hidden", [64, 4096, 5120, 8192])
@pytest.mark.parametrize("k", [12, 64])
def test_cuda_topk_order_is_the_spec_rule_on_pick_scores(hidden: int, k: int) -> None:
    scores = pick.pick_scores(BLOCK_HASH, PUBLIC_KEY, list(range(512)), hidden, k, CUDA)
    on_device = pick.pick_indices(scores, k).cpu()
    rule = pick.spec_order(scores.cpu(), k)
    assert torch.equal(on_device, rule), int((on_device != rule).any(dim=1).sum())


def test_cuda_topk_order_is_the_spec_rule_with_many_ties() -> None:
    tied = torch.randint(0, 40, (512, 4096), generator=torch.Generator().manual_seed(0))
    assert torch.equal(pick.pick_indices(tied.to(CUDA), 12).cpu(), pick.spec_order(tied, 12))


def test_golden_pick_indices_on_cuda() -> None:
    doc = golden()["rng"]
    for entry in doc["pick_indices"]:
        scores = pick.pick_scores(doc["block_hash"], doc["public_key"], [entry["nonce"]], entry["dim"],
                                  entry["k"], CUDA)
        assert pick.pick_indices(scores, entry["k"])[0].tolist() == entry["indices_cuda_order"], entry


@pytest.mark.parametrize("name", [c["name"] for c in golden()["cases"]])
def test_golden_case_computed_on_the_device(name: str) -> None:
    c = next(c for c in golden()["cases"] if c["name"] == name)
    cfg = ModelConfig.from_dir(TINY_QWEN3)
    weights = {n: t.to(CUDA) for n, t in load_weights(TINY_QWEN3).items()}
    model = LlamaModel(cfg, weights, torch.float32, cfg.max_position_embeddings)
    req = batch.PocRequest(c["block_hash"], c["public_key"], tuple(c["nonces"]), c["seq_len"], c["k_dim"],
                           c["poc_stronger_rng"])
    result = batch.run(req, lambda e, hook: model.body(e, hook)[:, -1], layers=cfg.num_hidden_layers,
                       hidden=cfg.hidden_size, dtype=torch.float32, device=CUDA, batch_size=8)
    assert result["dropped"] == []
    worst = check_artifacts(c, result["artifacts"])
    print(f"{name} on {torch.cuda.get_device_name(CUDA)}: worst L2 {worst:.3g}")
