"""create_tiny writes a deterministic HF Llama directory that load() (and vLLM) can read."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from node.errors import ConfigError, InvalidRequest
from services.inference.cpu_engine.chat_template import CHAT_TEMPLATE, render_chat
from services.inference.cpu_engine.checkpoint import TINY_FILES, create_tiny, load, load_or_synthesize
from tests.support.pocv2 import TINY_QWEN3

# sha256 of model.safetensors for seed 0: pins "same seed -> same bytes" across machines and versions.
SEED0_WEIGHTS_SHA256 = "f5c0b8afdc9646c45ae33125437833d0ddba6871c9cd8a078bd11185a47d3ae6"


def _digest(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_same_seed_same_bytes_and_exact_file_set(tmp_path: Path) -> None:
    create_tiny(tmp_path / "a", seed=0)
    create_tiny(tmp_path / "b", seed=0)
    create_tiny(tmp_path / "c", seed=1)
    a, b, c = (_digest(tmp_path / n) for n in "abc")
    assert set(a) == TINY_FILES
    assert a == b
    assert a["model.safetensors"] == SEED0_WEIGHTS_SHA256
    assert c["model.safetensors"] != a["model.safetensors"]
    assert c["config.json"] == a["config.json"]


def test_layout_is_hugging_face_llama(tmp_path: Path) -> None:
    create_tiny(tmp_path, seed=3, hidden=32, layers=3, heads=4, kv_heads=1, head_dim=8, intermediate=48)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (32, 3, 1)
    assert config["tie_word_embeddings"] is False
    assert (
        config["vocab_size"] == 272 and config["bos_token_id"] == 256 and config["eos_token_id"] == [257, 258]
    )
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert tuple(f.get_slice("model.layers.2.self_attn.k_proj.weight").get_shape()) == (8, 32)
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(3):
        p = f"model.layers.{i}"
        expected |= {f"{p}.self_attn.{x}_proj.weight" for x in "qkvo"}
        expected |= {f"{p}.mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        expected |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"}
    assert names == expected
    tok_doc = json.loads((tmp_path / "tokenizer.json").read_text())
    assert tok_doc["model"]["type"] == "BPE" and tok_doc["model"]["merges"] == []
    assert len(tok_doc["model"]["vocab"]) == 256
    assert tok_doc["pre_tokenizer"]["type"] == "ByteLevel" and tok_doc["decoder"]["type"] == "ByteLevel"
    tok_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == CHAT_TEMPLATE
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [257, 258]


def test_chats_render_the_models_template() -> None:
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "héllo"},
                                             {"type": "text", "text": "🙂"}]}]
    rendered = render_chat(messages, CHAT_TEMPLATE, special={"bos_token": "<|begin_of_text|>"})
    assert rendered == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>"
                        "<|start_header_id|>user<|end_header_id|>\n\nhéllo\n🙂<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_a_template_cannot_reach_the_host() -> None:
    """The template is rendered in Jinja's sandbox: no dunder access, no imports, no file reads."""
    hostile = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(InvalidRequest, match="chat template"):
        render_chat([{"role": "user", "content": "x"}], hostile)
    with pytest.raises(InvalidRequest, match="no chat template"):
        render_chat([{"role": "user", "content": "x"}], None)


def test_load_checks_the_directory(tmp_path: Path) -> None:
    create_tiny(tmp_path, seed=0)
    loaded = load(tmp_path, "auto", max_model_len=256)
    assert loaded.max_model_len == 256
    assert loaded.tokenizer.vocab_size == 272
    with pytest.raises(ConfigError, match="max-model-len"):
        load(tmp_path, "auto", max_model_len=4096)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"missing tensor model\.layers\.2"):
        load(tmp_path)


def test_a_hub_name_gets_a_seeded_stand_in() -> None:
    loaded = load_or_synthesize("Qwen/Qwen2.5-7B-Instruct", "auto", 4096, seed=0)
    assert loaded.max_model_len == 4096
    assert loaded.config.hidden_size == 64


def test_default_tiny_models_fit_every_engine(tmp_path: Path) -> None:
    """vLLM's CPU attention has no kernel below head_dim 32: the defaults must use one it has."""
    for arch, architecture in (("llama", "LlamaForCausalLM"), ("qwen3", "Qwen3ForCausalLM")):
        create_tiny(tmp_path / arch, seed=0, arch=arch)
        config = json.loads((tmp_path / arch / "config.json").read_text())
        assert config["architectures"] == [architecture] and config["model_type"] == arch
        assert config["head_dim"] in (32, 64, 80, 96, 112, 128)
    with safe_open(str(tmp_path / "qwen3" / "model.safetensors"), framework="pt") as f:
        assert tuple(f.get_slice("model.layers.1.self_attn.q_norm.weight").get_shape()) == (32,)
        assert tuple(f.get_slice("model.layers.1.self_attn.k_norm.weight").get_shape()) == (32,)
    loaded = load(tmp_path / "qwen3")
    assert loaded.config.qk_norm and not load(tmp_path / "llama").config.qk_norm
    with pytest.raises(ConfigError, match="arch"):
        create_tiny(tmp_path / "x", arch="gpt2")


def test_the_golden_qwen3_checkpoint_loads(tmp_path: Path) -> None:
    loaded = load(TINY_QWEN3)
    cfg = loaded.config
    assert (cfg.hidden_size, cfg.head_dim, cfg.rope_theta, cfg.qk_norm) == (64, 32, 1e6, True)
    tok = loaded.tokenizer
    assert tok.eos_token_id == 2 and tok.extra_stop_ids == () and tok.bos_token is None
    prompt = render_chat([{"role": "user", "content": "hi"}], tok.chat_template)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
