"""PoC v2 (pow-v2.md): rounds driven over the engines that serve the model.

pow owns the rounds (nonce assignment, job queues, validation and its statistical test, callbacks
through the durable outbox); the forward pass runs inside the engines, reached through their
``/collective_rpc`` method ``mlnode_poc_artifacts``.
"""
