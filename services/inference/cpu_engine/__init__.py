"""The CPU inference engine: a real (tiny) Llama / Qwen3 transformer behind an OpenAI-style HTTP API.

It is what the ``inference`` service launches on machines without a GPU (laptops, CI, tests), through
the same launcher path as vLLM: same flags, same routes, same readiness signal (``GET /health`` 200).
It also answers vLLM's ``POST /collective_rpc`` for PoC v2 (``mlnode_poc_artifacts``, see ``poc_rpc``).
Run it with ``python -m services.inference.cpu_engine --model DIR --port P``.
"""
