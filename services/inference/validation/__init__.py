"""Inference validation as the network does it (``../shared/spec/inference-validation.md``), engine-agnostic.

* :mod:`.request` -- the network's per-request fields (``logprobs_mode``, ``enforced_tokens`` in both
  forms, ``enforced_str``) parsed once for both engines, and the mode guessed from ``top_tokens``.
* :mod:`.compare` -- the validator's comparison of two answers (spec §4) and its 0.99 bar.
* :mod:`.network` -- the requests the Network Node sends: the executor's rewrite (§1) and the
  validator's replay (§3), as data; :mod:`.check` sends them to nodes (the ``mlnode validate`` tool).

Pure Python: the vLLM plugin imports this inside every engine process, so nothing here imports torch,
the bus or vLLM.
"""
