"""PoC v2 on a GPU host: CUDA ``topk`` order vs the spec's rule, normals/s, nonces/s vs plain prefill.

Run on the device machine:   python scripts/gpu_pocv2_bench.py --out "$OUT"
Rehearse on a CPU:           python scripts/gpu_pocv2_bench.py --device cpu --shape tiny --seconds 3

Stages (each prints as it finishes; a JSON summary goes to ``--out``, so a run cut short still reports):

1. ``pick_order``: for many nonces, CUDA's ``torch.topk(-scores, k, sorted=False)`` (what the network
   calls, what our code calls on CUDA) against the spec's rule (§5.5), at H = 64 and 4096, plus score
   vectors built with ties; and the golden pick indices. On CPU it runs the same comparison, where
   ``topk`` is not the reference: the count is informational there.
2. ``golden``: the four golden cases through the shared PoC code on this device (tiny Qwen3, float32).
3. ``normals``: the input generator's normals/s on the device (1024 x 4096 per nonce, MainNet).
4. ``nonces``: a randomly initialised Qwen3 of a shape that fits (``--shape``), bf16 on CUDA: PoC v2
   nonces/s (inputs on the device, reflections, fingerprint) against a plain prefill of the same
   batch and length through the same model body (token embeddings, no hooks), alternated per round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.inference.cpu_engine.checkpoint import load  # noqa: E402
from services.inference.cpu_engine.config import ModelConfig  # noqa: E402
from services.inference.cpu_engine.model import LlamaModel, expected_shapes  # noqa: E402
from services.inference.poc import batch, pick, rng  # noqa: E402
from services.inference.poc.codec import decode_f16, l2  # noqa: E402

GOLDEN = ROOT.parent / "shared" / "golden"
BLOCK_HASH = "9F3CA1A1B2B2C3C3D4D4E5E5F6F6A7A7B8B8C9C9D0D0E1E1F2F2A3A3B4B4C5C5"
PUBLIC_KEY = "02" + "5e" * 32
# Qwen3 shapes (q/k norm, GQA, head_dim 128); "8b" is Qwen3-8B's body, "moe-proxy" a dense stand-in at
# MainNet's hidden size (Qwen3-235B-A22B: H 4096, 94 layers, 64 q / 4 kv heads) cut to layers that fit.
SHAPES: dict[str, dict[str, Any]] = {
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=151936),
    "mainnet-h": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=24,
                      num_attention_heads=64, num_key_value_heads=4, head_dim=128, vocab_size=151936),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=512),
}
RESULTS: dict[str, Any] = {}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage(name: str, fn: Callable[[], Any]) -> None:
    t0 = time.perf_counter()
    try:
        RESULTS[name] = fn()
    except Exception as exc:  # one failed stage must not hide the others
        RESULTS[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
    print(f"== {name} ({time.perf_counter() - t0:.1f} s): {json.dumps(RESULTS[name], default=str)[:2000]}",
          flush=True)


def pick_order(device: torch.device, nonces: int) -> dict[str, Any]:
    out: dict[str, Any] = {"topk_is_reference": device.type == "cuda"}
    for hidden in (64, 4096):
        scores = pick.pick_scores(BLOCK_HASH, PUBLIC_KEY, list(range(nonces)), hidden, 12, device)
        same = int((pick.cuda_order(scores, 12) == pick.spec_order(scores, 12)).all(dim=1).sum())
        out[f"H{hidden}_same"] = f"{same}/{nonces}"
    gen = torch.Generator().manual_seed(0)
    tied = torch.randint(0, 40, (nonces, 4096), generator=gen).to(device)  # many ties at the k-th score
    same = int((pick.cuda_order(tied, 12) == pick.spec_order(tied, 12)).all(dim=1).sum())
    out["with_ties_same"] = f"{same}/{nonces}"
    golden = json.loads((GOLDEN / "pow_v2.json").read_text())["rng"]
    ok = 0
    for entry in golden["pick_indices"]:
        scores = pick.pick_scores(golden["block_hash"], golden["public_key"], [entry["nonce"]], entry["dim"],
                                  entry["k"], device)
        ok += pick.pick_indices(scores, entry["k"])[0].tolist() == entry["indices_cuda_order"]
    out["golden_pick_same"] = f"{ok}/{len(golden['pick_indices'])}"
    return out


def golden_cases(device: torch.device) -> dict[str, Any]:
    loaded = load(GOLDEN / "pocv2-tiny-qwen3")
    weights = {n: t.to(device) for n, t in _weights_of(loaded.model).items()}
    model = LlamaModel(loaded.config, weights, torch.float32, loaded.max_model_len)
    doc = json.loads((GOLDEN / "pow_v2.json").read_text())
    out: dict[str, Any] = {}
    for c in doc["cases"]:
        req = batch.PocRequest(c["block_hash"], c["public_key"], tuple(c["nonces"]), c["seq_len"], c["k_dim"],
                               c["poc_stronger_rng"])
        res = batch.run(req, lambda e, h: model.body(e, h)[:, -1], layers=4, hidden=64, dtype=torch.float32,
                        device=device, batch_size=8)
        got = {a["nonce"]: decode_f16(a["vector_b64"]) for a in res["artifacts"]}
        dists = [l2(got[a["nonce"]], torch.tensor(a["vector_f16"]).numpy()) for a in c["artifacts"]]
        out[c["name"]] = {"worst_l2": max(dists), "dropped": res["dropped"], "pass": max(dists) <= 2e-3}
    return out


def _weights_of(model: LlamaModel) -> dict[str, torch.Tensor]:
    """The HF-named tensors back from a loaded model (re-split the fused projections)."""
    cfg = model.cfg
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    w = {"model.embed_tokens.weight": model.embed, "model.norm.weight": model.norm,
         "lm_head.weight": model.lm_head}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}"
        qw, kw, vw = layer.qkv.split([q, kv, kv])
        gate, up = layer.gate_up.chunk(2)
        w.update({f"{p}.self_attn.q_proj.weight": qw, f"{p}.self_attn.k_proj.weight": kw,
                  f"{p}.self_attn.v_proj.weight": vw, f"{p}.self_attn.o_proj.weight": layer.o,
                  f"{p}.mlp.gate_proj.weight": gate, f"{p}.mlp.up_proj.weight": up,
                  f"{p}.mlp.down_proj.weight": layer.down, f"{p}.input_layernorm.weight": layer.ln_in,
                  f"{p}.post_attention_layernorm.weight": layer.ln_post})
        if layer.qk_norm is not None:
            w[f"{p}.self_attn.q_norm.weight"] = layer.qk_norm[0]
            w[f"{p}.self_attn.k_norm.weight"] = layer.qk_norm[-1]
    return w


def normals(device: torch.device, seconds: float) -> dict[str, Any]:
    count = 1024 * 4096
    rng.inputs_legacy("warm", count, device)
    sync(device)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        rng.inputs_stronger(f"bench_nonce{done}", count, device)
        done += 1
    sync(device)
    elapsed = time.perf_counter() - t0
    return {"normals_per_s": done * count / elapsed, "nonces_of_inputs_per_s": done / elapsed}


def random_qwen3(shape: str, device: torch.device, dtype: torch.dtype, max_len: int) -> LlamaModel:
    doc = {"model_type": "qwen3", "max_position_embeddings": max_len, "rms_norm_eps": 1e-6,
           "rope_theta": 1e6, "tie_word_embeddings": True, **SHAPES[shape]}
    cfg = ModelConfig.from_dict(doc)
    gen = torch.Generator(device=device).manual_seed(0)
    weights: dict[str, torch.Tensor] = {}
    for name, dims in expected_shapes(cfg).items():
        if len(dims) == 1:
            weights[name] = torch.ones(dims, dtype=dtype, device=device)
        else:
            std = 1.0 if "embed" in name else dims[1] ** -0.5
            draw = torch.randn(dims, generator=gen, device=device, dtype=torch.float32)
            weights[name] = (draw * std).to(dtype)
    return LlamaModel(cfg, weights, dtype, max_len)


def nonces(device: torch.device, shape: str, seq_len: int, batch_size: int, rounds: int) -> dict[str, Any]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_qwen3(shape, device, dtype, seq_len)
    cfg = model.cfg
    req = batch.PocRequest(BLOCK_HASH, PUBLIC_KEY, tuple(range(batch_size)), seq_len, 12, True)

    def poc_round(first: int) -> float:
        r = batch.PocRequest(req.block_hash, req.public_key, tuple(range(first, first + batch_size)), seq_len,
                             12, True)
        sync(device)
        t0 = time.perf_counter()
        res = batch.run(r, lambda e, h: model.body(e, h)[:, -1], layers=cfg.num_hidden_layers,
                        hidden=cfg.hidden_size, dtype=dtype, device=device, batch_size=batch_size)
        sync(device)
        assert len(res["artifacts"]) + len(res["dropped"]) == batch_size
        return time.perf_counter() - t0

    gen = torch.Generator(device=device).manual_seed(1)

    def prefill_round() -> float:
        ids = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=gen, device=device)
        sync(device)
        t0 = time.perf_counter()
        out = model.body(model.embed[ids])[:, -1]
        out.float().cpu()
        sync(device)
        return time.perf_counter() - t0

    poc_round(10**6)
    prefill_round()
    poc_s, pre_s = [], []
    for i in range(rounds):
        poc_s.append(poc_round(i * batch_size))
        pre_s.append(prefill_round())
    ratios = [p / q for p, q in zip(pre_s, poc_s, strict=True)]
    return {"shape": shape, "dtype": str(dtype), "seq_len": seq_len, "batch": batch_size,
            "poc_nonces_per_s": batch_size * rounds / sum(poc_s),
            "plain_prefill_seqs_per_s": batch_size * rounds / sum(pre_s),
            "ratio_median": statistics.median(ratios), "rounds": rounds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--pick-nonces", type=int, default=2000)
    ap.add_argument("--out", default=None, help="directory for pocv2_bench.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; rehearse with --device cpu --shape tiny", file=sys.stderr)
        return 2
    RESULTS["env"] = {"torch": torch.__version__, "device": str(device),
                      "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    torch.set_grad_enabled(False)
    stage("pick_order", lambda: pick_order(device, args.pick_nonces))
    stage("golden", lambda: golden_cases(device))
    stage("normals", lambda: normals(device, args.seconds))
    stage("nonces", lambda: nonces(device, args.shape, args.seq_len, args.batch, args.rounds))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "pocv2_bench.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
