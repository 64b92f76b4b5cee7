"""The four golden PoC v2 cases through the CPU engine's model body and the shared batch driver."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.inference.cpu_engine.checkpoint import LoadedModel, load
from services.inference.cpu_engine.poc_rpc import PocWorker
from services.inference.poc import batch, rng
from services.inference.poc.fingerprint import fingerprints
from tests.support.pocv2 import TINY_QWEN3, case, check_artifacts, golden, rpc_kwargs


@pytest.fixture(scope="module")
def qwen3() -> LoadedModel:
    return load(TINY_QWEN3)


def test_final_norm_hidden_state_of_the_first_nonce(qwen3: LoadedModel) -> None:
    c = golden()["cases"][0]
    inter = c["intermediates_first_nonce"]
    e = rng.nonce_inputs(c["block_hash"], c["public_key"], inter["nonce"], c["seq_len"], 64, stronger=False)
    hook = batch.Reflections(c["block_hash"], 4, 64, torch.float32, torch.device("cpu"))
    h = qwen3.model.body(e.unsqueeze(0), hook)[0, -1]
    torch.testing.assert_close(h[:8], torch.tensor(inter["last_hidden_first8"]), atol=1e-4, rtol=1e-4)
    assert abs(float(torch.linalg.vector_norm(h)) - inter["last_hidden_norm"]) < 1e-4


@pytest.mark.parametrize("name", [c["name"] for c in golden()["cases"]])
def test_golden_case(qwen3: LoadedModel, name: str) -> None:
    c = case(name)
    worker = PocWorker(qwen3.model, qwen3.max_model_len)
    req = worker.parse({"method": batch.METHOD, "kwargs": rpc_kwargs(c)})
    result = worker.compute(req)
    assert result["dropped"] == []
    worst = check_artifacts(c, result["artifacts"])
    print(f"{name}: worst L2 to vector_f16 {worst:.3g}")
    # Before fp16 rounding: the float32 fingerprints themselves.
    nonces = list(c["nonces"])
    hook = batch.Reflections(c["block_hash"], 4, 64, torch.float32, torch.device("cpu"))
    embeds = batch.make_inputs(req, nonces, 64, torch.float32, torch.device("cpu"))
    last = qwen3.model.body(embeds, hook)[:, -1]
    f32 = fingerprints(last, c["block_hash"], c["public_key"], nonces, c["k_dim"]).numpy()
    want = np.asarray([a["vector_f32"] for a in c["artifacts"]], dtype=np.float32)
    assert np.max(np.abs(f32 - want)) <= golden()["tolerances"]["max_abs_vs_vector_f32"]


def test_body_and_the_cached_chat_path_agree(qwen3: LoadedModel) -> None:
    """The PoC body (batched, no cache) and the chat forward (KV cache) are the same Qwen3."""
    model = qwen3.model
    ids = qwen3.tokenizer.encode("<|im_start|>user\nhello there<|im_end|>\n")
    logits = model.forward(ids, model.new_cache())
    hidden = model.body(model.embed[torch.tensor(ids)].unsqueeze(0))[0, -1]
    torch.testing.assert_close(hidden @ model.lm_head.T, logits, atol=1e-4, rtol=1e-4)
