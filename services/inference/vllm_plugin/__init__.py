"""MLNode's vLLM plugin: the network's inference validation and worker-extension hooks on stock vLLM.

vLLM finds it through the entry points of the ``mlnode`` distribution (``vllm.general_plugins`` and
``vllm.logits_processors``) and imports it in every engine process, so this package stays import-light:
nothing from the node's bus or gateway, and vLLM only in the modules that must subclass or patch its
classes (:mod:`.patches` lists every change it makes inside vLLM).
"""

from __future__ import annotations

import logging

#: Worker extension class the node passes to vLLM as ``--worker-extension-cls``.
WORKER_EXTENSION = "services.inference.vllm_plugin.worker.MLNodeWorkerExtension"

log = logging.getLogger("vllm.mlnode_plugin")


def register() -> None:
    """``vllm.general_plugins`` hook: vLLM calls it once per process before the engine starts.

    It installs the plugin's replacements inside vLLM after checking the vLLM version they were written
    for; an unknown version raises, which fails the engine's start with the message (vLLM does not catch
    exceptions of a general plugin). The rest is wired by vLLM itself (the logits-processor entry point,
    the worker extension flag).
    """
    from importlib.metadata import PackageNotFoundError, version

    from services.inference.vllm_plugin import patches

    try:
        build = version("mlnode")
    except PackageNotFoundError:
        build = "unknown"
    running = patches.vllm_version()
    patches.install(running)
    log.info("mlnode vLLM plugin loaded: version=%s vllm=%s features=validation,run_body", build, running)
