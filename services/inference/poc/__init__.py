"""PoC v2 (prefill scheme, ``shared/spec/pow-v2.md`` §5): the math every engine shares.

Engines only run their model body on ``inputs_embeds`` with a per-layer hook; everything that turns a
nonce into inputs and a hidden state into a fingerprint lives here, once. ``seeds`` and ``codec`` are
stdlib/numpy only, so pow's validation can import them without torch; the rest is torch.
"""
