"""The CPU inference engine: a real (tiny) Llama transformer behind an OpenAI-style HTTP API.

It is what the ``inference`` service launches on machines without a GPU (laptops, CI, tests), through
the same launcher path as vLLM: same flags, same routes, same readiness signal (``GET /health`` 200).
Run it with ``python -m services.inference.cpu_engine --model DIR --port P``.
"""
