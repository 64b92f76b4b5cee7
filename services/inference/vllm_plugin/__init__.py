"""MLNode's vLLM plugin: enforced decoding and worker-extension hooks on stock vLLM (no fork).

vLLM finds it through the entry points of the ``mlnode`` distribution (``vllm.general_plugins`` and
``vllm.logits_processors``) and imports it in every engine process, so this package stays import-light:
nothing from the node's bus or gateway, and vLLM only in the modules that must subclass its classes.
"""

from __future__ import annotations

import logging

#: Worker extension class the node passes to vLLM as ``--worker-extension-cls``.
WORKER_EXTENSION = "services.inference.vllm_plugin.worker.MLNodeWorkerExtension"

log = logging.getLogger("mlnode.vllm_plugin")


def register() -> None:
    """``vllm.general_plugins`` hook: vLLM calls it once per process before the engine starts.

    Everything the plugin provides is wired by vLLM itself (the logits-processor entry point, the worker
    extension flag); this only records, in the engine's own log, which plugin build the engine runs.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        build = version("mlnode")
    except PackageNotFoundError:
        build = "unknown"
    log.info("mlnode vLLM plugin loaded: version=%s features=enforced_decoding,run_body", build)
