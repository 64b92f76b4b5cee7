"""Engine arguments the network's own deployments send with ``inference/up``: the policy must take them."""

from __future__ import annotations

#: The ``args`` of the network's published node configurations (gonka deploy/join/node-config*.json),
#: less ``--trust-remote-code`` (the operator's per-model decision, tested below).
NETWORK_CONFIGS = [
    ("Qwen/Qwen3-235B-A22B-Instruct-2507-FP8",
     ["--scheduling-policy", "priority", "--max-num-batched-tokens", "32768", "--tensor-parallel-size", "4",
      "--max-model-len", "240000"]),
    ("deepseek-ai/DeepSeek-V4-Flash-0731",
     ["--scheduling-policy", "priority", "--max-num-seqs", "640", "--compilation-config",
      '{"max_cudagraph_capture_size": 640}', "--revision", "7872f01b1d1fe23eabc4c98b48bffcef5a386062",
      "--tensor-parallel-size", "4", "--gpu-memory-utilization", "0.85", "--max-model-len", "400000",
      "--max-num-batched-tokens", "32768", "--kv-cache-dtype", "fp8", "--tokenizer-mode", "deepseek_v4",
      "--enable-auto-tool-choice", "--tool-call-parser", "deepseek_v4", "--reasoning-parser", "deepseek_v4"]),
    ("zai-org/GLM-5.3-Flash",
     ["--revision", "04c4e9e95c5da8862dced7e5056455116f83a7e0", "--tensor-parallel-size", "8",
      "--gpu-memory-utilization", "0.95", "--max-num-batched-tokens", "65536", "--disable-custom-all-reduce",
      "--kv-cache-dtype", "fp8", "--block-size", "2304", "--max-num-seqs", "256",
      "--no-enable-flashinfer-autotune", "--logprobs-mode", "processed_logprobs", "--enable-auto-tool-choice",
      "--tool-call-parser", "glm47", "--reasoning-parser", "glm45"]),
    ("moonshotai/Kimi-K2.6",
     ["--tensor-parallel-size", "8", "--enable-expert-parallel", "--mm-encoder-tp-mode", "data",
      "--enable-auto-tool-choice", "--tool-call-parser", "kimi_k2", "--reasoning-parser", "kimi_k2",
      "--attention-backend", "FLASHMLA", "--kv-cache-dtype", "fp8", "--gpu-memory-utilization", "0.90",
      "--max-model-len", "240000"]),
    ("MiniMaxAI/MiniMax-M2.7",
     ["--revision", "d494266a4affc0d2995ba1fa35c8481cbd84294b", "--tensor-parallel-size", "4",
      "--gpu-memory-utilization", "0.92", "--max-num-seqs", "128", "--max-model-len", "180000",
      "--kv-cache-dtype", "fp8", "--moe-backend", "triton", "--attention-backend", "FLASHINFER",
      "--enable-auto-tool-choice", "--tool-call-parser", "minimax_m2", "--reasoning-parser", "minimax_m2"]),
    # The contract's own example, a model override (--revision, --served-model-name), speculative decoding.
    ("Qwen/QwQ-32B",
     ["--quantization", "fp8", "--tensor-parallel-size", "4", "--pipeline-parallel-size", "2",
      "--kv-cache-dtype", "fp8", "--gpu-memory-utilization", "0.9"]),
    ("Qwen/Qwen3-32B-FP8", ["--revision", "main", "--served-model-name", "Qwen/Qwen3-32B-FP8"]),
    ("Qwen/Qwen3-32B", ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 5, '
                                                '"prompt_lookup_max": 4}']),
]
